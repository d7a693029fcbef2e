"""mIoU of the oracle-trained segmenter and of Stage 1 alone, on a dataset folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fmbseg.errors import InputError
from fmbseg.evaluate import run_evaluate
from fmbseg.oracle.scenes import OracleWorld, write_scene_folder

WORLD = OracleWorld()


def as_dataset(scenes: Path, folder: Path, background_index: int | None = None) -> Path:
    """Oracle scenes in the generic layout: images/val, masks/val, classes.txt, dataset.json."""
    for kind, source in (("images", "images"), ("masks", "labels")):
        shutil.copytree(scenes / source, folder / kind / "val")
    (folder / "classes.txt").write_text("\n".join(WORLD.class_names) + "\n", encoding="utf-8")
    meta = {"ignore_index": 255} | (
        {} if background_index is None else {"background_index": background_index}
    )
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("held-out")
    write_scene_folder(WORLD, 4, root / "scenes", seed=99, sizes=((90, 120), (64, 64)))
    return as_dataset(root / "scenes", root / "dataset")


def test_trained_module_scores_high_miou_and_writes_reports(
    oracle_run, held_out: Path, tmp_path: Path
) -> None:
    metrics = run_evaluate(
        oracle_run.params,
        held_out,
        tmp_path,
        split="val",
        model=oracle_run.module,
        show_progress=False,
    )
    assert metrics["images"] == 4
    assert metrics["mIoU"] >= 0.6 and metrics["pixel_accuracy"] >= 0.85
    summary = json.loads((tmp_path / "metrics.json").read_text())
    # A small summary with the same keys in every run (per-class IoU is in per_class.csv only),
    # and how the numbers were made.
    assert list(summary) == [
        "mIoU", "pixel_accuracy", "images", "classes", "classes_present",
        "protocol", "protocol_reference", "background_rule", "resize", "windows", "templates",
    ]  # fmt: skip
    assert (summary["protocol"], summary["background_rule"]) == ("tcl", "none")
    assert summary["windows"] == "48 stride 24, averaged per pixel"
    assert summary["mIoU"] == metrics["mIoU"] and summary["classes"] == WORLD.num_classes
    rows = (tmp_path / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,iou" and len(rows) == 1 + WORLD.num_classes
    present = [row for row in rows[1:] if not row.endswith(",")]
    assert summary["classes_present"] == len(present) > 0
    for name in ("confusion.png", "per_class.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_stage_1_alone_is_scored_from_label_maps(oracle_run, tmp_path: Path) -> None:
    dataset = as_dataset(oracle_run.scenes, tmp_path / "train-set")
    metrics = run_evaluate(
        oracle_run.params,
        dataset,
        tmp_path / "out",
        split="val",
        pseudolabels=oracle_run.merged,
        show_progress=False,
    )
    assert metrics["mIoU"] >= 0.8  # Stage 1 with exact fakes nearly reproduces the truth
    assert metrics["protocol"] == "stage1_label_maps"
    assert "(unlabelled)" not in metrics["per_class"]


def test_unlabelled_pseudo_pixels_count_against_recall(oracle_run, tmp_path: Path) -> None:
    from fmbseg.masks import IGNORE_LABEL
    from fmbseg.pseudolabel.merge import read_label_map, write_label_map

    merged = tmp_path / "merged"
    shutil.copytree(oracle_run.merged, merged)
    for path in (merged / "labels").iterdir():
        write_label_map(path, np.full_like(read_label_map(path), IGNORE_LABEL))
    dataset = as_dataset(oracle_run.scenes, tmp_path / "train-set")
    metrics = run_evaluate(
        oracle_run.params,
        dataset,
        tmp_path / "out",
        split="val",
        pseudolabels=merged,
        show_progress=False,
    )
    assert metrics["mIoU"] == 0.0 and metrics["pixel_accuracy"] == 0.0


def test_model_or_pseudolabels_not_both(oracle_run, held_out: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="either a model or a pseudo-label folder"):
        run_evaluate(oracle_run.params, held_out, tmp_path, split="val")
