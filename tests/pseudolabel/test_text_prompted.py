"""Route sam3 in the oracle world, with a SAM 3 double that answers each class name with the
class's true region, and end to end through ``fmbseg`` with the real (tiny, random-init) SAM 3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fmbseg.config import MergeConfig, PseudoLabelConfig, TextPromptedRouteConfig
from fmbseg.models.base import TextDetection, TextPromptedSegmenter
from fmbseg.models.vocabulary import VocabularyEncoder
from fmbseg.oracle.fakes import FakeClip, FakeSam
from fmbseg.oracle.scenes import OracleWorld, make_scene, write_scene_folder
from fmbseg.pseudolabel.merge import image_generator, select_masks
from fmbseg.pseudolabel.routes import (
    ROUTE_POINTS,
    ROUTE_TEXT,
    pseudolabel_image,
    route_text_prompted,
)

WORLD = OracleWorld()
NAMES = list(WORLD.class_names)
SCENE = make_scene(WORLD, 96, 128, seed=3)
IN_SCENE = sorted({int(c) for c in np.unique(SCENE.labels) if c >= 0})


class TrueRegionSam3:
    """SAM 3's role answered from the scene's true label map: a prompt naming a class in the
    scene gets that class's pixels as one instance, scored 0.9; other prompts get nothing."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self.embed_calls = 0
        self.prompted: list[str] = []
        self.provenance = None

    def embed_image(self, image: np.ndarray) -> object:
        self.embed_calls += 1
        return image.shape[:2]

    def segment_prompts(self, embedding, prompts, score_threshold, mask_threshold):
        self.prompted += prompts
        return [
            TextDetection(index, self.labels == NAMES.index(name), 0.9, 0.95)
            for index, name in enumerate(prompts)
            if (self.labels == NAMES.index(name)).any() and score_threshold < 0.9
        ]


class NoClip:
    """Stands where CLIP would be, to show that a route did not need it."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"CLIP was used ({name})")


def config(routes: tuple[str, ...], **sam3: object) -> PseudoLabelConfig:
    return PseudoLabelConfig(
        short_side=256, crop_stride=32, routes=routes, sam3=TextPromptedRouteConfig(**sam3)
    )


def text_embeddings() -> object:
    return VocabularyEncoder(FakeClip(WORLD)).embed(NAMES)


def test_the_route_names_each_detection_with_its_candidate_class() -> None:
    sam3 = TrueRegionSam3(SCENE.labels)
    assert isinstance(sam3, TextPromptedSegmenter)
    absent = next(c for c in range(len(NAMES)) if c not in IN_SCENE)
    candidates = [IN_SCENE[-1], absent, IN_SCENE[0]]
    masks = route_text_prompted(SCENE.image, sam3, NAMES, candidates, TextPromptedRouteConfig())
    assert sam3.embed_calls == 1 and sam3.prompted == [NAMES[c] for c in candidates]
    assert sorted(m.class_id for m in masks) == sorted({IN_SCENE[0], IN_SCENE[-1]})
    for labelled in masks:
        assert labelled.route == ROUTE_TEXT and labelled.score == 0.9
        assert np.array_equal(labelled.mask, SCENE.labels == labelled.class_id)


def test_over_the_whole_vocabulary_sam3_alone_decides_what_is_present() -> None:
    sam3 = TrueRegionSam3(SCENE.labels)
    result = pseudolabel_image(
        SCENE.image, NoClip(), FakeSam(WORLD), text_embeddings(), config(("sam3",), candidates="all"),
        8, sam3=sam3, class_names=NAMES,
    )  # fmt: skip
    assert sam3.prompted == NAMES
    assert result.present == IN_SCENE
    assert sorted(m.class_id for m in result.masks) == IN_SCENE
    assert set(result.seconds) == {"clip", "route_sam3"}


def test_with_clip_votes_only_the_classes_clip_found_are_prompted() -> None:
    sam3 = TrueRegionSam3(SCENE.labels)
    clip = FakeClip(WORLD)
    result = pseudolabel_image(
        SCENE.image, clip, FakeSam(WORLD), text_embeddings(), config(("sam3",)), 8,
        sam3=sam3, class_names=NAMES,
    )  # fmt: skip
    assert sam3.prompted and set(sam3.prompted) == {NAMES[c] for c in result.present}
    assert len(sam3.prompted) < len(NAMES)


def test_sam3s_classes_can_replace_clips_vote_for_route_1_1() -> None:
    only = IN_SCENE[:1]  # SAM 3 finds one class: route 1.1 prompts SAM for it alone
    labels = np.where(SCENE.labels == only[0], only[0], -1)
    result = pseudolabel_image(
        SCENE.image, FakeClip(WORLD), FakeSam(WORLD), text_embeddings(),
        config(("1.1", "sam3"), present_from="sam3"), 8,
        sam3=TrueRegionSam3(labels), class_names=NAMES,
    )  # fmt: skip
    assert result.present == only
    assert {m.class_id for m in result.masks if m.route == ROUTE_POINTS} == set(only)


def test_merge_paints_by_priority_and_keeps_sam3s_fraction() -> None:
    routes = ["1.2", "sam3", "1.1", "1.2", "sam3"]
    areas = [50, 40, 30, 20, 10]
    rng = lambda: image_generator(0, "image")  # noqa: E731
    default = select_masks(routes, areas, MergeConfig(route_12_fraction=1.0), rng())
    assert [routes[i] for i in default] == ["1.2", "1.2", "sam3", "sam3", "1.1"]  # 1.1 on top
    on_top = MergeConfig(route_12_fraction=1.0, priority=("sam3", "1.1", "1.2"))
    assert [routes[i] for i in select_masks(routes, areas, on_top, rng())][-2:] == ["sam3"] * 2
    none = MergeConfig(route_12_fraction=1.0, sam3_fraction=0.0)
    assert ROUTE_TEXT not in [routes[i] for i in select_masks(routes, areas, none, rng())]
    # route 1.2's draws come first, so adding sam3 masks never changes which 1.2 masks are kept
    half = MergeConfig(route_12_fraction=0.5)
    automatic = [i for i in select_masks(routes, areas, half, rng()) if routes[i] == "1.2"]
    without_sam3 = [r for r in routes if r != "sam3"]
    kept = select_masks(without_sam3, [50, 30, 20], half, rng())
    assert [areas[i] for i in automatic] == [
        [50, 30, 20][i] for i in kept if without_sam3[i] == "1.2"
    ]


def test_fmbseg_pseudolabel_with_the_sam3_route_runs_to_trained_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-S pseudolabel.routes=[sam3]`` with the real SAM 3 architecture, tiny and random-init,
    then merge, cache-features and train (oracle CLIP, SAM and encoder)."""
    pytest.importorskip("transformers.models.sam3")
    from fmbseg.cli import main
    from fmbseg.models.sam3 import TINY_SAM3

    write_scene_folder(WORLD, 2, tmp_path / "scenes", seed=4, sizes=((64, 80),))
    (tmp_path / "classes.txt").write_text("\n".join(NAMES), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    settings = [
        "models.clip.backend=oracle", "models.sam.backend=oracle", "models.encoder.backend=oracle",
        "pseudolabel.routes=[sam3]", "pseudolabel.sam3.candidates=all",
        "pseudolabel.sam3.score_threshold=0.2", "models.sam3.allow_random_init=true",
        f"models.sam3.overrides={json.dumps(TINY_SAM3)}", "pseudolabel.short_side=64",
        "pseudolabel.crop_stride=32", "features.image_size=64", "train.epochs=1", "train.heads=2",
    ]  # fmt: skip
    options = [part for setting in settings for part in ("-S", setting)]
    assert main(["-q", "pseudolabel", *options, "--images", "scenes/images",
                 "--vocabulary", "classes.txt", "--out", "pl"]) == 0  # fmt: skip
    import pyarrow.parquet as pq

    table = pq.read_table(next((tmp_path / "pl" / "shards").glob("*.parquet"))).to_pydict()
    assert table["route"] and set(table["route"]) == {ROUTE_TEXT}
    run = json.loads((tmp_path / "pl" / "run.json").read_text())
    assert "sam3" in json.dumps(run)
    assert main(["-q", "merge", *options, "--pseudolabels", "pl", "--out", "merged"]) == 0
    summary = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert summary["masks_kept"]["sam3"] > 0 and summary["mean_labelled_fraction"] > 0
    assert main(["-q", "cache-features", *options, "--images", "scenes/images",
                 "--labels", "merged", "--out", "features"]) == 0  # fmt: skip
    assert main(["-q", "train", *options, "--features", "features", "--out", "model"]) == 0
    assert (tmp_path / "model" / "module.safetensors").is_file()


def test_the_sam3_teacher_config_distils_sam3_into_dinov3_in_clip_ls_text_space() -> None:
    from fmbseg.config import load_params

    params = load_params(Path(__file__).resolve().parents[2] / "configs" / "sam3-teacher.yaml")
    assert (
        params.pseudolabel.routes[0] == ROUTE_TEXT and params.pseudolabel.sam3.candidates == "all"
    )
    assert params.models.encoder.model.startswith("vit_large_patch16_dinov3")
    assert (params.models.text.backend, params.models.clip.model) == ("clip", "ViT-L-14")
    assert params.features.image_size % 16 == 0
    models = params.models
    assert not any(
        m.allow_random_init for m in (models.clip, models.sam, models.sam3, models.encoder)
    )
