"""The oracle world's scenes: exact, decodable label maps of any size, deterministic per seed."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from fmbseg.oracle.scenes import (
    AMBIGUOUS,
    DEFAULT_CLASSES,
    IGNORE_PNG,
    UNKNOWN,
    OracleWorld,
    connected_regions,
    interior_point,
    labels_at_points,
    make_scene,
    mask_iou,
    palette_separation,
    patch_majority,
    read_labels,
    write_scene_folder,
)

WORLD = OracleWorld()
SIZES = [(37, 53), (53, 37), (64, 64), (1, 1), (2, 9), (101, 64)]


def _nested(labels: np.ndarray) -> list[int]:
    """Regions off the frame whose outside neighbours all belong to one other region."""
    ids, _ = connected_regions(labels)
    on_frame = set(np.concatenate([ids[0], ids[-1], ids[:, 0], ids[:, -1]]).tolist())
    nested = []
    for region in range(ids.max() + 1):
        mask = ids == region
        hosts = np.unique(ids[ndimage.binary_dilation(mask) & ~mask])
        if region not in on_frame and len(hosts) == 1:
            nested.append(region)
    return nested


def _touching_shape_pairs(labels: np.ndarray, background: int) -> set[tuple[int, int]]:
    """Pairs of different non-background classes that share an edge."""
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        edge = (a != b) & (a != background) & (b != background)
        pairs |= {tuple(sorted(p)) for p in zip(a[edge].tolist(), b[edge].tolist())}
    return pairs


@pytest.mark.parametrize(("height", "width"), SIZES)
@pytest.mark.parametrize("unknown_background", [False, True])
def test_every_pixel_decodes_to_its_label(
    height: int, width: int, unknown_background: bool
) -> None:
    for seed in range(4):
        scene = make_scene(WORLD, height, width, seed, unknown_background=unknown_background)
        assert scene.image.shape == (height, width, 3) and scene.image.dtype == np.uint8
        assert scene.labels.shape == (height, width) and scene.labels.dtype == np.int32
        np.testing.assert_array_equal(WORLD.decode(scene.image), scene.labels)
        # texture stays well inside the tolerance, so nothing is ambiguous either
        np.testing.assert_array_equal(WORLD.decode(scene.image, WORLD.tolerance), scene.labels)
        assert scene.present == tuple(sorted(set(np.unique(scene.labels).tolist()) - {UNKNOWN}))


def test_texture_is_present_but_small() -> None:
    scene = make_scene(WORLD, 96, 128, 0)
    base = WORLD.colours[np.where(scene.labels == UNKNOWN, WORLD.num_classes, scene.labels)]
    offset = np.linalg.norm(scene.image.astype(float) - base, axis=-1)
    assert offset.max() > 1.0, "no class is textured"
    assert offset.max() <= WORLD.texture_norm + 0.87


@pytest.mark.parametrize(("height", "width"), [(23, 71), (150, 90), (64, 64)])
def test_decode_after_nearest_resize(height: int, width: int) -> None:
    scene = make_scene(WORLD, 48, 80, 3)
    rows = (np.arange(height) * 48 / height).astype(int)
    cols = (np.arange(width) * 80 / width).astype(int)
    resized = scene.image[rows][:, cols]
    np.testing.assert_array_equal(WORLD.decode(resized), scene.labels[rows][:, cols])


def test_blends_of_two_classes_never_decode_as_a_third() -> None:
    rng = np.random.default_rng(0)
    colours = WORLD.colours.astype(float)
    weights = np.linspace(0, 1, 41)[:, None]
    for a in range(len(colours)):
        for b in range(len(colours)):
            if a == b:
                continue
            shifts = rng.standard_normal((2, 3))
            shifts *= WORLD.texture_norm / np.linalg.norm(shifts, axis=1, keepdims=True)
            blend = weights * (colours[a] + shifts[0]) + (1 - weights) * (colours[b] + shifts[1])
            decoded = WORLD.nearest(blend)
            index = np.where(decoded[1] > WORLD.tolerance, -9, decoded[0])
            assert set(index.tolist()) <= {a, b, -9}, (a, b)
    assert palette_separation(WORLD.colours) == pytest.approx(WORLD.separation)


def test_unblend_reads_a_wide_ramp_as_its_two_ends() -> None:
    cat, dog = WORLD.class_id("cat"), WORLD.class_id("dog")
    t = np.linspace(0, 1, 101)[:, None]
    ramp = t * WORLD.colours[cat] + (1 - t) * WORLD.colours[dog]
    assert not set(WORLD.nearest(ramp)[0].tolist()) <= {cat, dog}  # plain nearest names a third
    index, clean = WORLD.unblend(ramp)
    sure = np.abs(t[:, 0] - 0.5) > 0.02
    np.testing.assert_array_equal(index[sure], np.where(t[sure, 0] > 0.5, cat, dog))
    assert clean[[0, -1]].all() and not clean[50]
    scene = make_scene(WORLD, 30, 40, 0)
    np.testing.assert_array_equal(WORLD.unblend(scene.image)[0], WORLD.nearest(scene.image)[0])


def test_bilinear_upsampling_decodes_to_a_neighbouring_label_or_ambiguous() -> None:
    scene = make_scene(WORLD, 40, 56, 7)
    image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].double()
    up = torch.nn.functional.interpolate(
        image, size=(100, 140), mode="bilinear", align_corners=False
    )
    decoded = WORLD.decode(up[0].permute(1, 2, 0).numpy(), WORLD.tolerance)
    # the 2x2 source pixels each output pixel blends
    y = np.clip((np.arange(100) + 0.5) * 40 / 100 - 0.5, 0, 39)
    x = np.clip((np.arange(140) + 0.5) * 56 / 140 - 0.5, 0, 55)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, 39), np.minimum(x0 + 1, 55)
    corners = np.stack([scene.labels[np.ix_(r, c)] for r in (y0, y1) for c in (x0, x1)])
    two_at_most = np.array([[len(set(v)) <= 2 for v in row] for row in corners.transpose(1, 2, 0)])
    ok = (decoded == AMBIGUOUS) | (corners == decoded).any(0)
    assert ok[two_at_most].all()
    assert (decoded == AMBIGUOUS).mean() < 0.1  # blends are a thin line, not the picture


def test_nested_and_touching_regions_occur_across_seeds() -> None:
    scenes = [make_scene(WORLD, 96, 128, seed) for seed in range(20)]
    with_nested = sum(bool(_nested(s.labels)) for s in scenes)
    with_touching = sum(bool(_touching_shape_pairs(s.labels, s.background)) for s in scenes)
    assert with_nested >= 16 and with_touching >= 10, (with_nested, with_touching)
    plain = [make_scene(WORLD, 96, 128, seed, nest=False, shapes=(1, 1)) for seed in range(20)]
    assert sum(bool(_touching_shape_pairs(s.labels, s.background)) for s in plain) == 0


def test_shape_count_and_sizes_vary() -> None:
    counts = {
        len(connected_regions(make_scene(WORLD, 96, 128, seed).labels)[1]) for seed in range(20)
    }
    assert len(counts) >= 4
    assert all(
        len(make_scene(WORLD, 64, 64, s, shapes=(0, 0), nest=False).present) == 1 for s in range(5)
    )


def test_no_sliver_regions() -> None:
    for seed in range(10):
        ids, _ = connected_regions(make_scene(WORLD, 64, 80, seed, min_region=12).labels)
        assert np.bincount(ids.ravel()).min() >= 12


def test_scenes_and_worlds_are_deterministic_per_seed() -> None:
    a, b, c = (make_scene(WORLD, 45, 61, s) for s in (5, 5, 6))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    assert np.array_equal(OracleWorld(seed=3).colours, OracleWorld(seed=3).colours)
    assert not np.array_equal(OracleWorld(seed=3).colours, OracleWorld(seed=4).colours)
    assert OracleWorld(seed=3) == OracleWorld(seed=3) and hash(OracleWorld()) == hash(WORLD)


def test_background_and_unknown_background() -> None:
    scene = make_scene(WORLD, 50, 70, 1, background="sky")
    assert (
        scene.background == WORLD.class_id("sky")
        and scene.labels[0].tolist().count(scene.background) > 0
    )
    unknown = make_scene(WORLD, 50, 70, 1, unknown_background=True)
    assert unknown.background == UNKNOWN and (unknown.labels == UNKNOWN).any()
    assert UNKNOWN not in unknown.present and len(unknown.present) >= 1


def test_names_with_spaces_and_non_ascii() -> None:
    world = OracleWorld(("traffic light", "crème brûlée", "sky"))
    assert world.class_id("Crème Brûlée") == 1
    assert world.class_id(unicodedata.normalize("NFD", "crème brûlée")) == 1
    assert world.class_id(" Traffic Light") == 0
    with pytest.raises(KeyError):
        world.class_id("creme brulee")
    scene = make_scene(world, 30, 40, 0, background="crème brûlée")
    assert scene.background == 1


def test_world_rejects_bad_vocabularies() -> None:
    with pytest.raises(ValueError, match="distinct"):
        OracleWorld(("cat", "Cat"))
    with pytest.raises(ValueError, match="distinct"):
        OracleWorld(("cat",))
    names = tuple(f"class {i}" for i in range(30))
    with pytest.raises(ValueError, match="texture_norm"):
        OracleWorld(names, texture_norm=10)
    many = OracleWorld(names, texture_norm=0)
    scene = make_scene(many, 40, 40, 0)
    np.testing.assert_array_equal(many.decode(scene.image), scene.labels)


def test_write_scene_folder_round_trips(tmp_path) -> None:
    world = OracleWorld(DEFAULT_CLASSES)
    sizes = [(37, 53), (40, 64)]
    scenes = write_scene_folder(world, 3, tmp_path, seed=9, sizes=sizes, unknown_background=True)
    assert len(scenes) == 3
    meta = json.loads((tmp_path / "classes.json").read_text(encoding="utf-8"))
    assert meta["classes"] == list(DEFAULT_CLASSES) and meta["ignore_index"] == IGNORE_PNG
    for i, scene in enumerate(scenes):
        image = np.asarray(Image.open(tmp_path / "images" / f"{i:04d}.png"))
        assert image.shape[:2] == sizes[i % 2]
        np.testing.assert_array_equal(image, scene.image)
        np.testing.assert_array_equal(
            read_labels(tmp_path / "labels" / f"{i:04d}.png"), scene.labels
        )
        raw = np.asarray(Image.open(tmp_path / "labels" / f"{i:04d}.png"))
        assert (raw == IGNORE_PNG).sum() == (scene.labels == UNKNOWN).sum() > 0
    again = write_scene_folder(
        world, 3, tmp_path / "again", seed=9, sizes=sizes, unknown_background=True
    )
    assert all(np.array_equal(a.image, b.image) for a, b in zip(scenes, again))
    assert len({s.seed for s in scenes}) == 3


def test_connected_regions_use_four_connectivity() -> None:
    labels = np.zeros((6, 6), np.int32)
    labels[0:2, 0:2] = 1
    labels[2:4, 2:4] = 1  # touches the first block only at a corner
    labels[4:, 4:] = UNKNOWN
    ids, classes = connected_regions(labels)
    # the diagonal chain of blocks also cuts the background in two
    assert sorted(classes.tolist()) == [UNKNOWN, 0, 0, 1, 1]
    assert ids[0, 0] != ids[2, 2] and classes[ids[0, 0]] == classes[ids[2, 2]] == 1


def test_points_are_x_then_y() -> None:
    labels = np.zeros((20, 50), np.int32)
    labels[2:6, 30:40] = 1
    assert labels_at_points(labels, np.array([[35.0, 4.0], [4.0, 35.0]])).tolist() == [1, 0]
    assert labels_at_points(labels, np.array([[35.9, 5.9]])).tolist() == [1]  # floor, not round
    x, y = interior_point(labels == 1)
    assert (x, y) == (int(x), int(y)) and 31 <= x <= 38 and 3 <= y <= 4  # two pixels deep


def test_patch_majority_and_mask_iou() -> None:
    labels = np.zeros((4, 8), np.int32)
    labels[:, 4:] = 2
    labels[0, 4:7] = UNKNOWN
    winner, share = patch_majority(labels, 4)
    assert winner.tolist() == [[0, 2]] and share.tolist() == [[1.0, 13 / 16]]
    with pytest.raises(ValueError, match="multiple"):
        patch_majority(labels, 3)
    assert mask_iou(labels == 0, labels == 0) == 1.0
    assert mask_iou(labels == 0, labels >= 0) == pytest.approx(16 / 29)
