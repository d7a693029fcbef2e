"""Fusioner's evaluation protocols: fold classes, 1-way episode metrics, Mosaic-4 builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmbseg.datasets.folder import FolderDataset
from fmbseg.errors import ConfigError, InputError
from fmbseg.evaluation.episodes import EpisodeMetrics, build_mosaics
from fmbseg.evaluation.folds import matching, novel_classes


def test_pascal_folds_hold_out_five_consecutive_voc_classes() -> None:
    assert novel_classes("pascal5i", 0) == ("aeroplane", "bicycle", "bird", "boat", "bottle")
    assert novel_classes("pascal5i", 1) == ("bus", "car", "cat", "chair", "cow")
    assert novel_classes("pascal5i", 3)[-1] == "tvmonitor"
    every = [name for fold in range(4) for name in novel_classes("pascal5i", fold)]
    assert len(set(every)) == 20


def test_coco_folds_interleave_the_80_classes() -> None:
    fold0 = novel_classes("coco20i", 0)
    assert fold0[:5] == ("person", "airplane", "boat", "parking meter", "dog")
    every = [name for fold in range(4) for name in novel_classes("coco20i", fold)]
    assert len(every) == len(set(every)) == 80
    with pytest.raises(ConfigError, match="fold 4"):
        novel_classes("coco20i", 4)


def test_class_names_match_whatever_the_spelling() -> None:
    assert matching(["Potted Plant", "TV monitor", "sofa"], ["pottedplant", "tvmonitor"]) == {0, 1}


def test_episode_metrics_sum_intersections_and_unions_per_class() -> None:
    metrics = EpisodeMetrics()
    valid = np.ones(4, bool)
    metrics.update("cat", np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool), valid)
    metrics.update("cat", np.array([1, 0, 0, 0], bool), np.array([1, 1, 0, 0], bool), valid)
    metrics.update("dog", np.array([0, 0, 0, 0], bool), np.array([0, 0, 1, 1], bool), valid)
    summary = metrics.summary()
    assert summary["per_class"] == {"cat": 0.5, "dog": 0.0}  # cat: I 2 / U 4
    assert summary["mIoU"] == 0.25
    # background: I 2+2+2=6, U 3+3+4=10; foreground: I 2, U 4+2=6
    assert summary["FB-IoU"] == pytest.approx((6 / 10 + 2 / 6) / 2)


def fss_folder(root: Path, classes: int = 5, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        for n in range(per_class):
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
                folder / f"{n + 1}.jpg"
            )
            mask = np.zeros((30, 40), np.uint8)
            mask[5:25, 10:30] = 255
            Image.fromarray(mask).save(folder / f"{n + 1}.png")
    return root


def test_mosaics_are_seeded_2x2_grids_of_four_distinct_classes(tmp_path: Path) -> None:
    source = fss_folder(tmp_path / "fss")
    first = build_mosaics(source, tmp_path / "a", count=6, seed=0)
    again = build_mosaics(source, tmp_path / "b", count=6, seed=0)
    other = build_mosaics(source, tmp_path / "c", count=6, seed=1)
    dataset = FolderDataset(first, "val")
    assert dataset.spec.class_names == (
        "background",
        "class0",
        "class1",
        "class2",
        "class3",
        "class4",
    )
    for sample in dataset:
        image, mask = dataset.read(sample)
        assert image.shape == (448, 448, 3)
        tiles = [mask[r : r + 224, c : c + 224] for r in (0, 224) for c in (0, 224)]
        present = [set(np.unique(tile)) - {0} for tile in tiles]
        assert all(len(p) == 1 for p in present)
        assert len(set().union(*present)) == 4
        assert (tiles[0] == 0).any()

    def masks(folder: Path) -> list[bytes]:
        return [p.read_bytes() for p in sorted((folder / "masks" / "val").iterdir())]

    assert masks(first) == masks(again) and masks(first) != masks(other)


def test_mosaics_need_four_classes(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="need 4 classes"):
        build_mosaics(fss_folder(tmp_path / "fss", classes=3), tmp_path / "out", count=1)
