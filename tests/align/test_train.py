"""Specification of Stage 2 training (fmbseg.align.train) on an easy oracle problem: FakeEncoder
features of procedural scenes, their true labels as pseudo-labels, FakeClip text embeddings.

Training must learn (patches end next to their class's text embedding), be deterministic, resume
from a kill to the very same weights, and fine-tune from a trained module on a new vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fmbseg.align.train as train_module
from fmbseg.align.features import FeatureShards, run_cache_features
from fmbseg.align.module import AlignmentModule, load_module
from fmbseg.align.train import run_train
from fmbseg.config import Params
from fmbseg.errors import InputError, WeightsError
from fmbseg.masks import IGNORE_LABEL
from fmbseg.models.vocabulary import VocabularyEncoder
from fmbseg.oracle.fakes import FakeClip, FakeEncoder
from fmbseg.oracle.scenes import UNKNOWN, OracleWorld, make_scene
from fmbseg.pseudolabel.merge import label_map_path, write_label_map

WORLD = OracleWorld()
OTHER_WORLD = OracleWorld(class_names=("car", "tree", "water", "building", "boat"), seed=3)
EPOCHS = 10
STEPS_PER_EPOCH = 6  # 24 images in shards of 10, 10, 4; batches of 4 cross shard boundaries


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids OpenMP synchronisation dominating on 2 shared cores (and
    bit-identity is only promised for the same thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cache_features(root: Path, world: OracleWorld, count: int) -> Path:
    """Scenes, a merge folder of their true labels, and the oracle encoder's feature cache."""
    for i in range(count):
        scene = make_scene(world, 40, 48, seed=i)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(root / "images" / f"{i:03d}.png")
        labels = np.where(scene.labels == UNKNOWN, IGNORE_LABEL, scene.labels).astype(np.uint16)
        write_label_map(label_map_path(root / "merged", f"{i:03d}"), labels)
    run = {"pseudolabel_run": {"vocabulary": list(world.class_names)}}
    (root / "merged" / "run.json").write_text(json.dumps(run), encoding="utf-8")
    # One cached entry per image (the square geometry), which the step counts below assume.
    features_params = Params.model_validate(
        {"features": {"image_size": 32, "images_per_shard": 10, "geometry": "square"}}
    )
    encoder = FakeEncoder(world, patch_size=8)
    run_cache_features(
        features_params,
        root / "images",
        root / "merged",
        root / "features",
        encoder=encoder,
        show_progress=False,
    )
    return root / "features"


def params(**train: Any) -> Params:
    section = {"epochs": EPOCHS, "batch_size": 4, "heads": 4, "mlp_ratio": 2.0, "lr": 0.1, **train}
    return Params.model_validate({"train": section})


class TextOnlyClip(FakeClip):
    """The oracle CLIP, refusing image input: training may only use the text encoder."""

    def __init__(self, world: OracleWorld = WORLD) -> None:
        super().__init__(world, embed_dim=16)

    def encode_images(self, images: torch.Tensor) -> Any:
        raise AssertionError("training must not encode images with CLIP")


class NoClip(TextOnlyClip):
    """Fails on any use: a resumed run must reuse the stored text embeddings."""

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise AssertionError("text embeddings were recomputed")


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cache_features(tmp_path_factory.mktemp("a"), WORLD, 24)


@pytest.fixture(scope="module")
def reference(features: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run: the result every other run is compared with."""
    out = tmp_path_factory.mktemp("reference")
    run_train(params(), features, out, text=TextOnlyClip(), show_progress=False)
    return out


def accuracy(module: AlignmentModule, features: Path, text: torch.Tensor) -> float:
    """Share of labelled patches whose nearest text embedding is their class's."""
    correct = total = 0
    for shard in FeatureShards(features):
        with torch.no_grad():
            predicted = (module(shard.features) @ text.T).argmax(-1)
        labelled = shard.labels >= 0
        correct += int((predicted[labelled] == shard.labels[labelled]).sum())
        total += int(labelled.sum())
    return correct / total


def test_training_pulls_patches_onto_their_class_text_embedding(
    features: Path, reference: Path
) -> None:
    metrics = json.loads((reference / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["epochs"] == EPOCHS and metrics["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert metrics["final_loss"] < 0.6 * metrics["first_epoch_loss"]
    text = load_file(reference / "text_embeddings.safetensors")["text_embeddings"]
    trained, _ = load_module(reference / "module.safetensors")
    untrained = AlignmentModule(32, 16, heads=4, mlp_ratio=2.0)
    assert accuracy(trained.eval(), features, text) > 0.9
    assert accuracy(untrained, features, text) < 0.5


def test_run_writes_loss_curve_metrics_module_and_one_checkpoint(reference: Path) -> None:
    rows = (reference / "loss.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "step,epoch,loss" and len(rows) == 1 + EPOCHS * STEPS_PER_EPOCH
    assert rows[-1].startswith(f"{EPOCHS * STEPS_PER_EPOCH},{EPOCHS},")
    assert (reference / "loss.png").read_bytes().startswith(b"\x89PNG")  # readable offline
    record = json.loads((reference / "module.json").read_text(encoding="utf-8"))
    assert record["text_embeddings"] == "text_embeddings.safetensors"
    assert record["vocabulary"] == list(WORLD.class_names) and record["encoder"] == "oracle"
    checkpoint_files = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert checkpoint_files == [f"epoch_{EPOCHS:03d}.safetensors", "latest.json"]


def test_text_embeddings_are_the_frozen_text_encoders_prompt_averages(reference: Path) -> None:
    stored = load_file(reference / "text_embeddings.safetensors")["text_embeddings"]
    expected = VocabularyEncoder(
        FakeClip(WORLD, embed_dim=16), params().pseudolabel.templates
    ).embed(WORLD.class_names)
    assert torch.equal(stored, expected)


def test_two_runs_give_identical_weights_and_losses(
    features: Path, reference: Path, tmp_path: Path
) -> None:
    run_train(params(), features, tmp_path, text=TextOnlyClip(), show_progress=False)
    assert (tmp_path / "module.safetensors").read_bytes() == (
        reference / "module.safetensors"
    ).read_bytes()
    assert (tmp_path / "loss.csv").read_bytes() == (reference / "loss.csv").read_bytes()


class Killed(Exception):
    """Stands for the process dying."""


def _kill_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    real = train_module.get_loss

    def get_loss(name: str) -> Any:
        loss_fn, calls = real(name), []

        def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append(1)
            if len(calls) == step:
                raise Killed
            return loss_fn(*args, **kwargs)

        return counting

    monkeypatch.setattr(train_module, "get_loss", get_loss)


@pytest.mark.parametrize("where", ["after epoch 2's checkpoint", "in the middle of epoch 3"])
def test_killed_run_resumes_to_the_uninterrupted_result(
    features: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    with monkeypatch.context() as patch:
        if where.startswith("after"):

            def on_epoch(record: dict[str, Any]) -> None:
                if record["epoch"] == 2:
                    raise Killed

            kwargs: dict[str, Any] = {"on_epoch": on_epoch}
        else:
            _kill_at_step(patch, 2 * STEPS_PER_EPOCH + 3)
            kwargs = {}
        with pytest.raises(Killed):
            run_train(
                params(), features, tmp_path, text=TextOnlyClip(), show_progress=False, **kwargs
            )
    assert (
        json.loads((tmp_path / "checkpoints" / "latest.json").read_text(encoding="utf-8"))["epoch"]
        == 2
    )
    assert not (tmp_path / "module.safetensors").exists()

    epochs_run: list[int] = []
    run_train(
        params(),
        features,
        tmp_path,
        text=NoClip(),
        show_progress=False,
        on_epoch=lambda r: epochs_run.append(r["epoch"]),
    )
    assert epochs_run == list(range(3, EPOCHS + 1))
    assert (tmp_path / "module.safetensors").read_bytes() == (
        reference / "module.safetensors"
    ).read_bytes()
    assert (tmp_path / "loss.csv").read_bytes() == (reference / "loss.csv").read_bytes()


def test_a_finished_run_reruns_without_training_again(features: Path, reference: Path) -> None:
    before = (reference / "module.safetensors").read_bytes()
    epochs_run: list[int] = []
    run_train(
        params(),
        features,
        reference,
        text=NoClip(),
        show_progress=False,
        on_epoch=lambda r: epochs_run.append(r["epoch"]),
    )
    assert epochs_run == [] and (reference / "module.safetensors").read_bytes() == before


def test_rerun_with_other_params_into_the_same_folder_is_refused(
    features: Path, reference: Path
) -> None:
    with pytest.raises(InputError, match="holds a training run made with other train"):
        run_train(params(lr=0.05), features, reference, text=TextOnlyClip(), show_progress=False)


@pytest.mark.parametrize("loss", ["cross_entropy", "supcon"])
def test_ablation_losses_train_too(features: Path, tmp_path: Path, loss: str) -> None:
    metrics = run_train(
        params(loss=loss, epochs=3), features, tmp_path, text=TextOnlyClip(), show_progress=False
    )
    assert (
        np.isfinite(metrics["final_loss"]) and metrics["final_loss"] < metrics["first_epoch_loss"]
    )


# --- per-dataset fine-tuning ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cache_features(tmp_path_factory.mktemp("b"), OTHER_WORLD, 16)


def test_init_from_starts_at_the_trained_weights_with_the_new_vocabulary(
    reference: Path, other_features: Path, tmp_path: Path
) -> None:
    frozen = params(
        init_from=str(reference / "module.safetensors"), epochs=1, lr=0.0, weight_decay=0.0
    )
    run_train(frozen, other_features, tmp_path, text=TextOnlyClip(OTHER_WORLD), show_progress=False)
    start, _ = load_module(reference / "module.safetensors")
    after, info = load_module(tmp_path / "module.safetensors")
    for (name, a), b in zip(start.state_dict().items(), after.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert info.vocabulary == OTHER_WORLD.class_names
    text = load_file(tmp_path / "text_embeddings.safetensors")["text_embeddings"]
    expected = VocabularyEncoder(FakeClip(OTHER_WORLD, embed_dim=16)).embed(OTHER_WORLD.class_names)
    assert torch.equal(text, expected)


def test_fine_tuning_learns_the_new_vocabulary(
    reference: Path, other_features: Path, tmp_path: Path
) -> None:
    tuned = params(init_from=str(reference / "module.safetensors"))
    run_train(tuned, other_features, tmp_path, text=TextOnlyClip(OTHER_WORLD), show_progress=False)
    text = load_file(tmp_path / "text_embeddings.safetensors")["text_embeddings"]
    module, _ = load_module(tmp_path / "module.safetensors")
    assert accuracy(module.eval(), other_features, text) > 0.9


def test_init_from_with_another_architecture_names_file_and_expected_one(
    reference: Path, other_features: Path, tmp_path: Path
) -> None:
    source = reference / "module.safetensors"
    with pytest.raises(WeightsError) as caught:
        run_train(
            params(init_from=str(source), heads=8),
            other_features,
            tmp_path,
            text=TextOnlyClip(OTHER_WORLD),
            show_progress=False,
        )
    assert str(source) in str(
        caught.value
    ) and "expected (in_dim=32, text_dim=16, depth=1, heads=8" in str(caught.value)


def test_init_from_a_missing_file_is_a_weights_error(other_features: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="nowhere.safetensors: train.init_from module not found"):
        run_train(
            params(init_from=str(tmp_path / "nowhere.safetensors")),
            other_features,
            tmp_path / "out",
            text=TextOnlyClip(OTHER_WORLD),
            show_progress=False,
        )
