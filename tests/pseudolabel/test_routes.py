"""Stage 1 in the oracle world: with exact fakes it reproduces the true label maps."""

from __future__ import annotations

import numpy as np
import pytest

from fmbseg.config import AutoMaskConfig, MergeConfig, PseudoLabelConfig
from fmbseg.masks import IGNORE_LABEL
from fmbseg.models.vocabulary import VocabularyEncoder
from fmbseg.oracle.fakes import FakeClip, FakeSam
from fmbseg.oracle.scenes import OracleWorld, make_scene
from fmbseg.pseudolabel.merge import merge_image
from fmbseg.pseudolabel.routes import ROUTE_AUTOMATIC, ROUTE_POINTS, pseudolabel_image

WORLD = OracleWorld()
# The paper's geometry: the short side is four crops long, crops overlap by half.
CONFIG = PseudoLabelConfig(
    short_side=256, crop_stride=32, automask=AutoMaskConfig(points_per_side=16)
)


def label_scene(scene, clip, sam, config=CONFIG, fraction=1.0, vocabulary=None, image_classes=None):
    names = list(vocabulary or WORLD.class_names)
    text = VocabularyEncoder(clip).embed(names)
    result = pseudolabel_image(scene.image, clip, sam, text, config, 8, image_classes)
    height, width = scene.labels.shape
    label_map, _ = merge_image(
        height,
        width,
        [m.route for m in result.masks],
        [int(m.mask.sum()) for m in result.masks],
        [m.class_id for m in result.masks],
        [m.mask for m in result.masks],
        MergeConfig(route_12_fraction=fraction),
        "scene",
    )
    return result, label_map


def correct_and_labelled(
    label_map: np.ndarray, truth: np.ndarray, names=WORLD.class_names
) -> tuple[int, int]:
    """Pixels labelled with their true class, and pixels labelled at all."""
    to_world = np.array(
        [WORLD.class_names.index(n) if n in WORLD.class_names else -99 for n in names]
    )
    labelled = label_map != IGNORE_LABEL
    predicted = to_world[label_map[labelled].astype(int)]
    return int((predicted == truth[labelled]).sum()), int(labelled.sum())


def accuracy(
    label_map: np.ndarray, truth: np.ndarray, names=WORLD.class_names
) -> tuple[float, float]:
    """Pixel accuracy on pseudo-labelled pixels, and the labelled share of the image."""
    correct, labelled = correct_and_labelled(label_map, truth, names)
    return correct / labelled, labelled / truth.size


SIZES = [(128, 128), (96, 160), (161, 97), (37, 53), (300, 200)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_zero_noise_reproduces_the_true_label_map(height: int, width: int) -> None:
    """Pooled over scenes; the residual errors are 1.2 masks of classes too small to win any
    crop's vote (the method names a mask only among detected classes)."""
    correct = labelled = total = 0
    for seed in range(6):
        scene = make_scene(WORLD, height, width, seed=seed + height)
        _, label_map = label_scene(scene, FakeClip(WORLD), FakeSam(WORLD))
        right, marked = correct_and_labelled(label_map, scene.labels)
        correct, labelled, total = correct + right, labelled + marked, total + scene.labels.size
    assert correct / labelled >= 0.95
    assert labelled / total >= 0.9  # every 1.2 mask kept: nearly every pixel is labelled


def test_each_route_alone_is_right_where_it_labels() -> None:
    scene = make_scene(WORLD, 128, 128, seed=4)
    for route in (ROUTE_POINTS, ROUTE_AUTOMATIC):
        config = CONFIG.model_copy(update={"routes": (route,)})
        result, label_map = label_scene(scene, FakeClip(WORLD), FakeSam(WORLD), config)
        assert {m.route for m in result.masks} == {route}
        assert accuracy(label_map, scene.labels)[0] >= 0.95


def test_sam_embeds_each_image_once_for_both_routes() -> None:
    sam = FakeSam(WORLD)
    result, _ = label_scene(make_scene(WORLD, 128, 128, seed=1), FakeClip(WORLD), sam)
    assert {m.route for m in result.masks} == {ROUTE_POINTS, ROUTE_AUTOMATIC}
    assert sam.embed_calls == 1


def test_accuracy_degrades_gracefully_with_noise() -> None:
    scenes = [make_scene(WORLD, 128, 128, seed=s) for s in range(4)]
    mean_accuracy = []
    for noise in (0.0, 0.5, 1.5):
        scores = [
            accuracy(
                label_scene(
                    s,
                    FakeClip(WORLD, noise=noise, seed=7),
                    FakeSam(WORLD, erode=1, merge_probability=0.2, seed=3),
                )[1],
                s.labels,
            )[0]
            for s in scenes
        ]
        mean_accuracy.append(np.mean(scores))
    assert mean_accuracy[0] >= 0.9
    assert mean_accuracy[1] >= 0.7
    assert mean_accuracy[2] <= mean_accuracy[0]


def test_a_vocabulary_of_one_class() -> None:
    scene = make_scene(WORLD, 96, 96, seed=2, shapes=(1, 2))
    name = WORLD.class_names[scene.background]
    result, label_map = label_scene(scene, FakeClip(WORLD), FakeSam(WORLD), vocabulary=[name])
    assert result.present == [0]
    labelled = label_map != IGNORE_LABEL
    assert (scene.labels[labelled] == scene.background).mean() >= 0.5


def test_a_vocabulary_of_200_classes_with_absent_ones() -> None:
    distractors = [f"thing number {i}" for i in range(200 - WORLD.num_classes)]
    vocabulary = list(WORLD.class_names) + distractors
    scene = make_scene(WORLD, 128, 128, seed=9)
    result, label_map = label_scene(scene, FakeClip(WORLD), FakeSam(WORLD), vocabulary=vocabulary)
    assert set(result.present) <= set(scene.present)
    assert label_map[label_map != IGNORE_LABEL].max() < WORLD.num_classes
    assert accuracy(label_map, scene.labels, vocabulary)[0] >= 0.95


def test_image_level_labels_replace_detection() -> None:
    scene = make_scene(WORLD, 128, 128, seed=6)
    given = [scene.present[0]]
    result, label_map = label_scene(scene, FakeClip(WORLD), FakeSam(WORLD), image_classes=given)
    assert result.present == given
    assert set(np.unique(label_map)) <= {given[0], IGNORE_LABEL}


def test_no_present_class_means_no_masks_and_no_sam_call() -> None:
    sam = FakeSam(WORLD)
    scene = make_scene(WORLD, 64, 64, seed=1)
    result, label_map = label_scene(scene, FakeClip(WORLD), sam, image_classes=[])
    assert result.masks == [] and sam.embed_calls == 0
    assert (label_map == IGNORE_LABEL).all()
