"""Sliding windows, stitching and point placement: the geometry that classic bugs break."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmbseg.config import PseudoLabelConfig
from fmbseg.errors import ConfigError
from fmbseg.oracle.fakes import FakeClip
from fmbseg.oracle.scenes import OracleWorld, labels_at_points, make_scene, patch_majority
from fmbseg.pseudolabel.dense import (
    dense_clip_features,
    detect_present_classes,
    mean_embeddings_under_masks,
    plan_windows,
    top_patch_points,
)

WORLD = OracleWorld()


@pytest.mark.parametrize(("height", "width"), [(64, 64), (37, 53), (100, 31), (480, 640)])
@pytest.mark.parametrize("stride", [8, 32, 64])
def test_windows_tile_the_resized_image_on_the_patch_grid(
    height: int, width: int, stride: int
) -> None:
    windows = plan_windows(height, width, short_side=96, crop=64, stride=stride, patch=8)
    rh, rw = windows.resized_size
    assert rh % 8 == 0 and rw % 8 == 0 and min(rh, rw) >= 64
    covered = np.zeros((rh, rw), dtype=int)
    for top, left in windows.offsets:
        assert top % 8 == 0 and left % 8 == 0
        assert top + 64 <= rh and left + 64 <= rw
        covered[top : top + 64, left : left + 64] += 1
    assert covered.min() >= 1


def test_short_side_sets_the_scale_and_aspect_is_kept() -> None:
    windows = plan_windows(300, 450, short_side=224, crop=224, stride=112, patch=16)
    assert windows.resized_size == (224, 336)
    assert plan_windows(10, 12, short_side=224, crop=224, stride=112, patch=16).resized_size == (
        224,
        272,
    )


def test_stride_off_the_patch_grid_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"crop_stride: 100 \(and the crop 224\) must be positive multiples"
    ):
        plan_windows(100, 100, short_side=224, crop=224, stride=100, patch=16)


def test_patch_centres_map_back_to_original_pixels_with_x_along_width() -> None:
    windows = plan_windows(50, 100, short_side=64, crop=64, stride=32, patch=8)
    assert windows.resized_size == (64, 128)  # scale 1.28 in both directions
    centres = windows.patch_centres_xy(np.array([0, 7]), np.array([15, 0]))
    np.testing.assert_allclose(
        centres, [[(15.5 * 8) / 1.28, 4 / 1.28], [4 / 1.28, (7.5 * 8) / 1.28]]
    )


def dense_labels(scene, clip: FakeClip, config: PseudoLabelConfig) -> tuple[np.ndarray, np.ndarray]:
    """The class each stitched patch embedding is closest to, and the truth on the same grid."""
    features = dense_clip_features(scene.image, clip, config, batch_size=3)
    text = clip.encode_text([f"a photo of a {n}." for n in WORLD.class_names])
    predicted = (features.patch_map @ text.T).argmax(-1).numpy()
    resized = np.asarray(
        torch.nn.functional.interpolate(
            torch.from_numpy(scene.labels)[None, None].float(),
            size=features.windows.resized_size,
            mode="nearest",
        )[0, 0].long()
    )
    truth, share = patch_majority(resized, clip.patch_size)
    return predicted[share == 1.0], truth[share == 1.0]


@pytest.mark.parametrize(("height", "width", "stride"), [(96, 160, 16), (53, 37, 32), (40, 200, 8)])
def test_stitched_patch_map_matches_the_true_labels_patch_for_patch(
    height: int, width: int, stride: int
) -> None:
    """Any x/y swap, off-by-a-patch crop offset or overlap mistake misplaces whole patches."""
    scene = make_scene(WORLD, height, width, seed=height * width)
    config = PseudoLabelConfig(short_side=96, crop_stride=stride)
    predicted, truth = dense_labels(scene, FakeClip(WORLD), config)
    assert len(truth) > 20
    assert (predicted == truth).all()


def test_presence_counts_crop_votes() -> None:
    text = torch.eye(4)
    crops = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1, 0]])
    assert detect_present_classes(crops, text, min_crops=1) == [0, 2]
    assert detect_present_classes(crops, text, min_crops=2) == [0]


def test_absent_classes_get_no_votes() -> None:
    scene = make_scene(WORLD, 128, 128, seed=3)
    clip = FakeClip(WORLD)
    features = dense_clip_features(
        scene.image, clip, PseudoLabelConfig(short_side=128, crop_stride=32), 4
    )
    text = clip.encode_text([f"a photo of a {n}." for n in WORLD.class_names])
    present = detect_present_classes(features.crop_embeddings, text, 1)
    assert present and set(present) <= set(scene.present)


@pytest.mark.parametrize(("height", "width"), [(90, 150), (150, 90), (33, 47)])
def test_top_points_land_on_their_class_in_original_coordinates(height: int, width: int) -> None:
    scene = make_scene(WORLD, height, width, seed=11)
    clip = FakeClip(WORLD)
    features = dense_clip_features(
        scene.image, clip, PseudoLabelConfig(short_side=96, crop_stride=16), 4
    )
    text = clip.encode_text([f"a photo of a {n}." for n in WORLD.class_names])
    for class_id in scene.present:
        points = top_patch_points(features, text[class_id], 5)
        assert points.shape == (5, 2)
        assert (points[:, 0] < width).all() and (points[:, 1] < height).all()
        assert (labels_at_points(scene.labels, points) == class_id).mean() >= 0.8


def test_mean_embedding_under_a_mask_is_its_class() -> None:
    scene = make_scene(WORLD, 120, 90, seed=5)
    clip = FakeClip(WORLD)
    features = dense_clip_features(
        scene.image, clip, PseudoLabelConfig(short_side=96, crop_stride=16), 4
    )
    text = clip.encode_text([f"a photo of a {n}." for n in WORLD.class_names])
    masks = [scene.labels == k for k in scene.present]
    means = mean_embeddings_under_masks(features, masks, chunk=2)
    assert torch.allclose(means.norm(dim=1), torch.ones(len(masks)))
    assert (means @ text.T).argmax(1).tolist() == list(scene.present)
