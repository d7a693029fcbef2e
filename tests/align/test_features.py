"""Specification of Stage 2's feature cache (fmbseg.align.features).

Patch labels follow METHOD.md's rule (majority class covering at least ``min_label_fraction``
of the patch, else ignored); features are the frozen encoder's grid in float16; the cache is
sharded, resumable, and every corruption of a shard is an InputError naming that shard.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmbseg.align.features import (
    IGNORE_PATCH,
    FeatureShards,
    patch_labels,
    plan_tiles,
    resize_nearest,
    run_cache_features,
)
from fmbseg.config import Params
from fmbseg.errors import ConfigError, InputError
from fmbseg.io.atomic import sha256_file
from fmbseg.masks import IGNORE_LABEL
from fmbseg.oracle.fakes import FakeEncoder
from fmbseg.oracle.scenes import UNKNOWN, OracleWorld, make_scene
from fmbseg.pseudolabel.merge import label_map_path, write_label_map
from fmbseg.segmenter import resize_bilinear

X = IGNORE_LABEL  # an unlabelled pixel in hand-made label maps
WORLD = OracleWorld()
PATCH = 8


def write_dataset(root: Path, count: int, size: tuple[int, int] = (40, 48), seed: int = 0) -> None:
    """Scenes as ``root/images/NNN.png`` and a merge folder ``root/merged`` of their true labels."""
    for i in range(count):
        scene = make_scene(WORLD, *size, seed=seed + i)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(root / "images" / f"{i:03d}.png")
        labels = np.where(scene.labels == UNKNOWN, IGNORE_LABEL, scene.labels).astype(np.uint16)
        write_label_map(label_map_path(root / "merged", f"{i:03d}"), labels)
    run = {"pseudolabel_run": {"vocabulary": list(WORLD.class_names)}}
    (root / "merged" / "run.json").write_text(json.dumps(run), encoding="utf-8")


def params(**features: object) -> Params:
    """The square geometry, which most of this specification is written for (``tiles`` below)."""
    section = {"image_size": 32, "images_per_shard": 4, "geometry": "square", **features}
    return Params.model_validate({"features": section, "models": {"encoder": {"batch_size": 3}}})


class CountingEncoder(FakeEncoder):
    """The oracle encoder, counting the images it encodes; optionally failing after a number."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__(WORLD, patch_size=PATCH)
        self.images = 0
        self.fail_after = fail_after

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.images + len(images) > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.images += len(images)
        return super().encode(images)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    write_dataset(root, 10)
    return root


@pytest.fixture(scope="module")
def cache(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    run_cache_features(
        params(),
        dataset / "images",
        dataset / "merged",
        out,
        encoder=CountingEncoder(),
        show_progress=False,
    )
    return out


@pytest.fixture(scope="module")
def tiled(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiled")
    run_cache_features(
        params(geometry="tiles"),
        dataset / "images",
        dataset / "merged",
        out,
        encoder=CountingEncoder(),
        show_progress=False,
    )
    return out


# --- the patch-label rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "min_fraction", "expected"),
    [
        ([[3, 3], [3, 3]], 0.5, 3),  # whole patch one class
        ([[1, 1], [1, X]], 0.5, 1),  # 3/4 labelled by one class
        ([[1, 1], [X, X]], 0.5, 1),  # exactly the threshold counts ("at least")
        ([[1, X], [X, X]], 0.5, IGNORE_PATCH),  # 1/4 < 1/2: unlabelled pixels count in the area
        ([[1, 1], [2, X]], 0.5, 1),
        ([[1, 2], [3, X]], 0.5, IGNORE_PATCH),  # majority class under the threshold
        ([[1, 1], [2, 2]], 0.5, IGNORE_PATCH),  # a tie is no majority
        ([[1, 1], [2, 2]], 0.0, IGNORE_PATCH),  # ... whatever the threshold
        ([[X, X], [X, X]], 0.0, IGNORE_PATCH),  # no labelled pixel, even at threshold 0
        ([[0, X], [X, X]], 0.25, 0),  # ignored pixels never win the vote themselves
        ([[1, 1], [1, 2]], 0.8, IGNORE_PATCH),  # 3/4 < 0.8
    ],
)
def test_patch_label_rule(patch: list[list[int]], min_fraction: float, expected: int) -> None:
    label_map = np.array(patch, dtype=np.uint16)
    assert patch_labels(label_map, 2, num_classes=4, min_fraction=min_fraction).tolist() == [
        [expected]
    ]


def test_patch_labels_are_per_patch_in_row_major_grid() -> None:
    label_map = np.full((4, 6), X, dtype=np.uint16)
    label_map[:2, :2] = 0
    label_map[:2, 4:] = 2
    label_map[2:, 2:4] = 1
    assert patch_labels(label_map, 2, 3, 0.5).tolist() == [[0, -1, 2], [-1, 1, -1]]


def test_patch_labels_match_a_per_patch_count_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    values = np.array([0, 1, 2, 3, X], dtype=np.uint16)
    label_map = values[rng.choice(5, size=(16, 24), p=[0.3, 0.3, 0.1, 0.1, 0.2])]
    got = patch_labels(label_map, 4, num_classes=4, min_fraction=0.4)
    for r in range(4):
        for c in range(6):
            counts = Counter(label_map[4 * r : 4 * r + 4, 4 * c : 4 * c + 4].ravel().tolist())
            counts.pop(X, None)
            ranked = counts.most_common()
            unique = len(ranked) == 1 or (len(ranked) > 1 and ranked[0][1] > ranked[1][1])
            winner = ranked[0][0] if ranked and unique and ranked[0][1] >= 0.4 * 16 else -1
            assert got[r, c] == winner, (r, c, ranked)


def test_patch_labels_reject_classes_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="label 7 is outside the vocabulary of 4"):
        patch_labels(np.full((2, 2), 7, dtype=np.uint16), 2, 4, 0.5)


def test_nearest_resize_takes_the_pixel_under_each_centre() -> None:
    label_map = np.array([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]], dtype=np.uint16)
    assert resize_nearest(label_map[:, :2], 4).tolist() == [[0, 0, 1, 1]] * 2 + [[6, 6, 7, 7]] * 2
    assert resize_nearest(np.repeat(label_map, 3, axis=0), 2).tolist() == [[1, 4], [7, 10]]


def test_nearest_resize_agrees_with_pil_so_labels_stay_on_their_pixels() -> None:
    label_map = np.random.default_rng(1).integers(0, 200, size=(37, 53)).astype(np.uint8)
    for size in (16, 32, 96):
        expected = np.asarray(
            Image.fromarray(label_map).resize((size, size), Image.Resampling.NEAREST)
        )
        assert np.array_equal(resize_nearest(label_map, size), expected), size


# --- the cache -----------------------------------------------------------------------------------


def test_cache_stores_fp16_encoder_grids_and_patch_labels_of_resized_images(
    dataset: Path, cache: Path
) -> None:
    shards = FeatureShards(cache)
    assert (len(shards), shards.num_images, shards.grid, shards.dim) == (3, 10, (4, 4), 32)
    assert shards.vocabulary == WORLD.class_names
    encoder = FakeEncoder(WORLD, patch_size=PATCH)
    seen = []
    for shard in shards:
        assert shard.features.dtype == torch.float16 and shard.labels.dtype == torch.int16
        assert shard.features.shape == (len(shard), 4, 4, 32) and shard.labels.shape == (
            len(shard),
            4,
            4,
        )
        for key, features, labels in zip(
            shard.image_ids, shard.features, shard.labels, strict=True
        ):
            image = Image.open(dataset / "images" / f"{key}.png").resize(
                (32, 32), Image.Resampling.BILINEAR
            )
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[
                None
            ]
            assert torch.equal(features, encoder.encode(pixels)[0].half())
            truth = np.asarray(Image.open(label_map_path(dataset / "merged", key)), dtype=np.uint16)
            expected = patch_labels(resize_nearest(truth, 32), PATCH, WORLD.num_classes, 0.5)
            assert labels.tolist() == expected.tolist()
        seen += shard.image_ids
    assert seen == [f"{i:03d}" for i in range(10)]
    assert (torch.cat([s.labels.flatten() for s in shards]) == IGNORE_PATCH).any()  # some ignored


def test_index_lists_shards_with_shapes_hashes_vocabulary_and_encoder(cache: Path) -> None:
    index = json.loads((cache / "index.json").read_text(encoding="utf-8"))
    assert index["vocabulary"] == list(WORLD.class_names)
    assert index["encoder"]["tag"] == "synthetic" and index["encoder"]["model"] == "oracle"
    assert [len(s["images"]) for s in index["shards"]] == [4, 4, 2]
    for entry in index["shards"]:
        assert entry["sha256"] == sha256_file(cache / "shards" / entry["file"])
        assert entry["features_shape"] == [len(entry["images"]), 4, 4, 32]


def test_rerun_skips_finished_shards_and_resumes_after_a_kill(
    dataset: Path, cache: Path, tmp_path: Path
) -> None:
    args = (params(), dataset / "images", dataset / "merged", tmp_path)
    with pytest.raises(KeyboardInterrupt):  # dies during the second shard (images 4..7)
        run_cache_features(*args, encoder=CountingEncoder(fail_after=5), show_progress=False)
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.json")) == ["00000.json"]
    resumed = CountingEncoder()
    run_cache_features(*args, encoder=resumed, show_progress=False)
    assert resumed.images == 6  # shards 1 and 2 only
    again = CountingEncoder()
    run_cache_features(*args, encoder=again, show_progress=False)
    assert again.images == 0
    for name in ("00000", "00001", "00002"):
        fresh = (tmp_path / "shards" / f"{name}.safetensors").read_bytes()
        assert fresh == (cache / "shards" / f"{name}.safetensors").read_bytes()


def test_rerun_with_other_params_is_refused(dataset: Path, tmp_path: Path) -> None:
    run_cache_features(
        params(),
        dataset / "images",
        dataset / "merged",
        tmp_path,
        encoder=CountingEncoder(),
        limit=2,
        show_progress=False,
    )
    with pytest.raises(InputError, match="other features"):
        run_cache_features(
            params(min_label_fraction=0.7),
            dataset / "images",
            dataset / "merged",
            tmp_path,
            encoder=CountingEncoder(),
            limit=2,
            show_progress=False,
        )


def test_images_without_a_label_map_are_skipped_and_listed(dataset: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in (0, 1):
        (images / f"{i:03d}.png").write_bytes((dataset / "images" / f"{i:03d}.png").read_bytes())
    Image.new("RGB", (16, 16)).save(images / "extra.png")
    summary = run_cache_features(
        params(),
        images,
        dataset / "merged",
        tmp_path / "out",
        encoder=CountingEncoder(),
        show_progress=False,
    )
    assert summary["images"] == 2 and summary["images_without_labels"] == ["extra"]
    index = json.loads((tmp_path / "out" / "index.json").read_text(encoding="utf-8"))
    assert index["images_without_labels"] == ["extra"]


def test_unreadable_images_are_recorded_and_skipped(dataset: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in (0, 1):
        (images / f"{i:03d}.png").write_bytes((dataset / "images" / f"{i:03d}.png").read_bytes())
    (images / "002.png").write_bytes(b"not a png")  # it has a label map in the merge folder
    summary = run_cache_features(
        params(),
        images,
        dataset / "merged",
        tmp_path / "out",
        encoder=CountingEncoder(),
        show_progress=False,
    )
    assert summary["images"] == 2 and list(summary["failed_images"]) == ["002"]
    assert FeatureShards(tmp_path / "out").num_images == 2


def test_no_labelled_image_at_all_is_an_input_error(dataset: Path, tmp_path: Path) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "lonely.png")
    with pytest.raises(InputError, match="no image below .* has a label map"):
        run_cache_features(
            params(),
            tmp_path,
            dataset / "merged",
            tmp_path / "out",
            encoder=CountingEncoder(),
            show_progress=False,
        )


def test_label_map_of_another_size_names_the_label_map(dataset: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 10)).save(images / "000.png")
    with pytest.raises(
        InputError, match=r"labels[/\\]000\.png: label map is 48x40 but its image is 20x10"
    ):
        run_cache_features(
            params(),
            images,
            dataset / "merged",
            tmp_path / "out",
            encoder=CountingEncoder(),
            show_progress=False,
        )


def test_image_size_must_be_a_multiple_of_the_patch_size(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="features.image_size=36 is not a multiple of the encoder's patch size 8"
    ):
        run_cache_features(
            params(image_size=36),
            dataset / "images",
            dataset / "merged",
            tmp_path,
            encoder=CountingEncoder(),
            show_progress=False,
        )


# --- corruption ----------------------------------------------------------------------------------


def _rewrite_shard(cache: Path, position: int, change: str) -> Path:
    """Rewrite one shard's tensors and record the new file's sha256 in the index, so only the
    corruption under test (not the hash) can be what the loader notices."""
    from safetensors.torch import load_file, save_file

    index = json.loads((cache / "index.json").read_text(encoding="utf-8"))
    file = cache / "shards" / index["shards"][position]["file"]
    tensors = load_file(file)
    if change == "nan":
        tensors["features"][0, 1, 2, 3] = float("nan")
    elif change == "inf":
        tensors["features"][-1, 0, 0, 0] = float("inf")
    elif change == "shape":
        tensors["features"] = tensors["features"][..., :-1].contiguous()
    save_file(tensors, file)
    index["shards"][position]["sha256"] = sha256_file(file)
    (cache / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return file


@pytest.fixture
def copy_of_cache(cache: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(cache, tmp_path / "cache"))


@pytest.mark.parametrize(
    ("change", "message"),
    [("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("shape", "shapes")],
)
def test_corrupt_shard_values_or_shapes_are_input_errors_naming_the_shard(
    copy_of_cache: Path, change: str, message: str
) -> None:
    file = _rewrite_shard(copy_of_cache, 1, change)
    shards = FeatureShards(copy_of_cache)
    shards.load(0)  # the other shards still load
    with pytest.raises(InputError) as caught:
        list(shards)
    assert str(file) in str(caught.value) and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_changed_byte_is_a_hash_mismatch_naming_the_shard(copy_of_cache: Path) -> None:
    file = copy_of_cache / "shards" / "00002.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256") as caught:
        FeatureShards(copy_of_cache).load(2)
    assert str(file) in str(caught.value)


def test_an_unfinished_cache_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no finished feature cache"):
        FeatureShards(tmp_path)


# --- geometry: tiles as inference sees images, or one square ------------------------------------


def test_tiles_are_cut_from_the_image_rescaled_with_its_aspect_kept() -> None:
    assert plan_tiles(40, 48, 32) == ((32, 38), [(0, 0), (0, 6)])  # scale 0.8 both ways
    assert plan_tiles(480, 640, 448) == ((448, 597), [(0, 0), (0, 149)])  # not 0.70 across
    assert plan_tiles(500, 333, 448) == ((673, 448), [(0, 0), (225, 0)])
    assert plan_tiles(64, 64, 32) == ((32, 32), [(0, 0)])


def test_tiles_cache_each_tile_with_labels_voted_on_its_own_grid(
    dataset: Path, tiled: Path
) -> None:
    shards = FeatureShards(tiled)
    assert shards.geometry == "tiles" and shards.num_images == 20  # two tiles per 40x48 image
    index = json.loads((tiled / "index.json").read_text(encoding="utf-8"))
    assert (index["geometry"], index["source_images"], index["images"]) == ("tiles", 10, 20)
    encoder = FakeEncoder(WORLD, patch_size=PATCH)
    names = []
    for shard in shards:
        for name, features, labels in zip(
            shard.image_ids, shard.features, shard.labels, strict=True
        ):
            key, tile = name.split("#")
            left = (0, 6)[int(tile)]
            image = np.asarray(Image.open(dataset / "images" / f"{key}.png"))
            pixels = resize_bilinear(image, (32, 38))[:, :, :, left : left + 32]
            assert torch.equal(features, encoder.encode(pixels)[0].half())
            truth = np.asarray(Image.open(label_map_path(dataset / "merged", key)), dtype=np.uint16)
            crop = resize_nearest(truth, (32, 38))[:, left : left + 32]
            assert labels.tolist() == patch_labels(crop, PATCH, WORLD.num_classes, 0.5).tolist()
            names.append(name)
    assert names == [f"{i:03d}#{k}" for i in range(10) for k in (0, 1)]


def test_square_caches_keep_their_fingerprint_and_old_indexes_read_as_square(
    cache: Path, tmp_path: Path
) -> None:
    run = json.loads((cache / "run.json").read_text(encoding="utf-8"))
    assert "geometry" not in json.dumps(run)  # as caches written before the key existed
    assert FeatureShards(cache).geometry == "square"
    old = tmp_path / "old"
    old.mkdir()
    index = json.loads((cache / "index.json").read_text(encoding="utf-8"))
    index.pop("geometry")
    (old / "index.json").write_text(json.dumps(index), encoding="utf-8")
    assert FeatureShards(old).geometry == "square"


def test_in_the_oracle_world_tiles_train_at_least_as_well_as_squares(
    oracle_run, tmp_path: Path
) -> None:
    """Stage 2 trained from the same Stage 1 labels cached both ways, scored on held-out scenes
    of other aspect ratios: the geometry inference sees is not worse (docs/method.md)."""
    from fmbseg.align.module import load_module
    from fmbseg.align.train import run_train
    from fmbseg.methods.fmbseg import AlignmentScorer
    from fmbseg.models.vocabulary import VocabularyEncoder
    from fmbseg.oracle.fakes import FakeClip
    from fmbseg.segmenter import OpenVocabularySegmenter

    scenes = [
        make_scene(WORLD, *(64, 112) if s % 2 else (112, 64), seed=s) for s in range(200, 208)
    ]
    accuracy = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for geometry in ("square", "tiles"):
            update = oracle_run.params.features.model_copy(update={"geometry": geometry})
            settings = oracle_run.params.model_copy(update={"features": update})
            out = tmp_path / geometry
            run_cache_features(
                settings, oracle_run.scenes / "images", oracle_run.merged, out / "features",
                encoder=FakeEncoder(WORLD), show_progress=False,
            )  # fmt: skip
            run_train(
                settings, out / "features", out / "model", text=FakeClip(WORLD), show_progress=False
            )
            module, _ = load_module(out / "model" / "module.safetensors")
            scorer = AlignmentScorer(FakeEncoder(WORLD), module, VocabularyEncoder(FakeClip(WORLD)))
            model = OpenVocabularySegmenter(scorer, settings.inference, torch.device("cpu"))
            accuracy[geometry] = np.mean(
                [
                    (model.segment(s.image, WORLD.class_names).labels == s.labels).mean()
                    for s in scenes
                ]
            )
    finally:
        torch.set_num_threads(threads)
    assert accuracy["tiles"] >= accuracy["square"] >= 0.8, accuracy
