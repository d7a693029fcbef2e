"""Data gates: good stage outputs pass, each kind of corruption fails naming its expectation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmbseg.align.features import run_cache_features
from fmbseg.config import AutoMaskConfig, MergeConfig, Params, PseudoLabelConfig, validate
from fmbseg.errors import ConfigError, FmbsegError, InputError
from fmbseg.gates import (
    GateFailed,
    GateReport,
    GatesConfig,
    check_features,
    check_manifest,
    check_pseudolabels,
    render_markdown,
    run_gate,
)
from fmbseg.io.atomic import sha256_file
from fmbseg.oracle.fakes import FakeClip, FakeEncoder, FakeSam
from fmbseg.oracle.scenes import OracleWorld, write_scene_folder
from fmbseg.pseudolabel.merge import run_merge
from fmbseg.pseudolabel.stage import Backends, run_pseudolabel

WORLD = OracleWorld()
VOCABULARY = list(WORLD.class_names)
CONFIG = GatesConfig()
PARAMS = Params(
    pseudolabel=PseudoLabelConfig(
        short_side=128,
        crop_stride=32,
        images_per_shard=2,
        automask=AutoMaskConfig(points_per_side=8),
        max_failed_fraction=1.0,  # the gate, not the stage, is under test
    )
)


def stage1(images: Path, out: Path) -> tuple[Path, Path]:
    """A real pseudo-label run and its merge, made by the oracle backends."""
    backends = Backends(FakeClip(WORLD), FakeSam(WORLD))
    run_pseudolabel(PARAMS, images, VOCABULARY, out / "pl", backends=backends, show_progress=False)
    run_merge(MergeConfig(), out / "pl", out / "merged")
    return out / "pl", out / "merged"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    write_scene_folder(WORLD, 4, folder, seed=1, sizes=((64, 64), (53, 37)))
    return folder


@pytest.fixture(scope="module")
def labelled(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return stage1(scenes / "images", tmp_path_factory.mktemp("stage1"))


@pytest.fixture(scope="module")
def features(
    scenes: Path, labelled: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("features")
    params = Params.model_validate(
        {
            "features": {"image_size": 32, "images_per_shard": 2},
            "models": {"encoder": {"batch_size": 2}},
        }
    )
    run_cache_features(
        params,
        scenes / "images",
        labelled[1],
        out,
        encoder=FakeEncoder(WORLD, patch_size=8),
        show_progress=False,
    )
    return out


def result(report: GateReport, expectation: str):
    return next(r for r in report.results if r.expectation == expectation)


# --- manifest ------------------------------------------------------------------------------------


def manifest(count: int = 10) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": [f"{i:04d}" for i in range(count)],
            "path": [f"images/train/{i:04d}.jpg" for i in range(count)],
            "split": ["train"] * (count - 2) + ["val"] * 2,
            "width": [640] * count,
            "height": [480] * count,
            "decodable": [True] * count,
            "error": [None] * count,
            "bytes": [50_000] * count,
        }
    )


def undecodable(frame: pd.DataFrame, rows: list[int]) -> pd.DataFrame:
    """As the manifest writer records a file it cannot decode: 0x0 with its error."""
    frame.loc[rows, ["width", "height", "decodable", "error"]] = [0, 0, False, "cannot decode"]
    return frame


def write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_parquet(path)
    return path


def test_a_good_manifest_passes_and_ge_writes_nothing_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    report = check_manifest(write(manifest(), tmp_path / "manifest.parquet"), CONFIG)
    assert report.success, report.failed
    assert len(report.results) >= 10
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.parquet"]


@pytest.mark.parametrize(
    ("corrupt", "expectation", "listed"),
    [
        (
            lambda f: f.assign(image_id=["0000", *f["image_id"][1:-1], "0000"]),
            "manifest.expect_column_values_to_be_unique(image_id)",
            "0000",
        ),
        (
            lambda f: undecodable(f, [3, 7]),  # 20% > the 10% bound
            "manifest.expect_column_values_to_be_in_set(decodable)",
            "0007",
        ),
        (
            lambda f: f.assign(width=[640] * 5 + [0] + [640] * 4),
            "manifest.expect_column_values_to_be_between(width)",
            "0005",
        ),
        (
            lambda f: f.assign(split=["train"] * 9 + ["holdout"]),
            "manifest.expect_column_values_to_be_in_set(split)",
            "0009",
        ),
    ],
    ids=["duplicate-id", "undecodable", "zero-width", "unknown-split"],
)
def test_a_bad_manifest_fails_naming_the_expectation_and_the_row(
    tmp_path: Path, corrupt, expectation: str, listed: str
) -> None:
    config = GatesConfig(manifest={"max_undecodable_fraction": 0.1})
    report = check_manifest(write(corrupt(manifest()), tmp_path / "m.parquet"), config)
    assert report.failed == [expectation]
    assert listed in [row["image_id"] for row in result(report, expectation).details["rows"]]
    section = render_markdown(report).split(f"## `{expectation}`")[1]
    assert listed in section


def test_a_failed_bound_names_the_param_that_sets_it(tmp_path: Path) -> None:
    frame = manifest().assign(width=[640] * 5 + [20] + [640] * 4)
    report = check_manifest(write(frame, tmp_path / "m.parquet"), CONFIG)
    expectation = "manifest.expect_column_values_to_be_between(width)"
    assert report.failed == [expectation]
    assert result(report, expectation).details["param"] == "gates.manifest.min_width"
    section = render_markdown(report).split(f"## `{expectation}`")[1]
    assert "- bound set by: `gates.manifest.min_width` in params.yaml" in section
    assert '"image_id": "0005"' in section and '"width": 20' in section


def test_undecodable_images_within_the_bound_pass_and_are_listed(tmp_path: Path) -> None:
    config = GatesConfig(manifest={"max_undecodable_fraction": 0.1})
    report = check_manifest(write(undecodable(manifest(), [4]), tmp_path / "m.parquet"), config)
    assert report.success, report.failed
    decodable = result(report, "manifest.expect_column_values_to_be_in_set(decodable)")
    assert decodable.observed["unexpected"] == 1
    assert decodable.details["rows"] == [
        {"decodable": False, "image_id": "0004", "error": "cannot decode"}
    ]


def test_a_manifest_lacking_a_column_fails_instead_of_crashing(tmp_path: Path) -> None:
    report = check_manifest(write(manifest().drop(columns="split"), tmp_path / "m.parquet"), CONFIG)
    assert "manifest.expect_table_columns_to_match_set" in report.failed
    split = result(report, "manifest.expect_column_values_to_be_in_set(split)")
    assert not split.success and "split" in split.details["errors"][0]


def test_an_unreadable_manifest_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "m.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="m.parquet"):
        check_manifest(tmp_path / "m.parquet", CONFIG)


# --- pseudo-labels -------------------------------------------------------------------------------


def test_a_real_stage1_output_passes(labelled: tuple[Path, Path]) -> None:
    report = check_pseudolabels(*labelled, CONFIG)
    assert report.success, report.failed
    assert result(report, "masks.expect_table_row_count_to_be_between").observed > 0
    assert result(report, "images.expect_table_row_count_to_equal").observed == 4


def test_a_class_id_outside_the_vocabulary_fails(
    labelled: tuple[Path, Path], tmp_path: Path
) -> None:
    pseudo = Path(shutil.copytree(labelled[0], tmp_path / "pl"))
    shard = pseudo / "shards" / "00001.parquet"
    table = pq.read_table(shard)
    class_ids = table.column("class_id").to_pylist()
    class_ids[-1] = len(VOCABULARY)
    table = table.set_column(1, "class_id", pa.array(class_ids, pa.int32()))
    pq.write_table(table, shard)
    report = check_pseudolabels(pseudo, labelled[1], CONFIG)
    expectation = "masks.expect_column_values_to_be_between(class_id)"
    assert report.failed == [expectation]
    rows = result(report, expectation).details["rows"]
    assert {"shard": "00001", "class_id": len(VOCABULARY)} in [
        {key: row[key] for key in ("shard", "class_id")} for row in rows
    ]


def test_a_mask_whose_area_contradicts_its_run_lengths_fails(
    labelled: tuple[Path, Path], tmp_path: Path
) -> None:
    pseudo = Path(shutil.copytree(labelled[0], tmp_path / "pl"))
    shard = pseudo / "shards" / "00000.parquet"
    table = pq.read_table(shard)
    areas = table.column("area").to_pylist()
    areas[0] += 1
    pq.write_table(table.set_column(4, "area", pa.array(areas, pa.int64())), shard)
    assert check_pseudolabels(pseudo, labelled[1], CONFIG).failed == [
        "masks.expect_column_values_to_be_in_set(rle_mismatches)"
    ]


def test_a_huge_share_of_unreadable_images_fails(scenes: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    # Each two-image shard gets one good image: merge.py cannot yet write a shard without masks.
    for i in range(3):
        shutil.copy(scenes / "images" / f"000{i}.png", images / f"{i}a.png")
        (images / f"{i}b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    report = check_pseudolabels(*stage1(images, tmp_path), CONFIG)
    expectation = "images.expect_column_values_to_be_in_set(read)"
    assert report.failed == [expectation]
    failed = result(report, expectation)
    assert failed.observed["unexpected"] == 3 and failed.observed["of"] == 6
    assert {row["image_id"] for row in failed.details["rows"]} == {"0b", "1b", "2b"}


def test_the_mean_labelled_fraction_bound_comes_from_the_config(
    labelled: tuple[Path, Path],
) -> None:
    strict = GatesConfig(pseudolabels={"min_mean_labelled_fraction": 0.99}, max_listed=2)
    report = check_pseudolabels(*labelled, strict)
    expectation = "images.expect_column_mean_to_be_between(labelled_fraction)"
    assert report.failed == [expectation]
    failed = result(report, expectation)
    assert 0.1 < failed.observed < 0.99
    # A mean names no rows by itself: the report lists the least labelled images, and the key.
    assert failed.details["param"] == "gates.pseudolabels.min_mean_labelled_fraction"
    fractions = [row["labelled_fraction"] for row in failed.details["rows"]]
    assert len(fractions) == 2 and fractions == sorted(fractions)
    every = [
        image["labelled_fraction"]
        for shard in sorted((labelled[1] / "shards").glob("*.json"))
        for image in json.loads(shard.read_text(encoding="utf-8"))["images"]
    ]
    assert fractions == sorted(every)[:2]
    section = render_markdown(report).split(f"## `{expectation}`")[1]
    assert "`gates.pseudolabels.min_mean_labelled_fraction`" in section
    assert all(row["image_id"] in section for row in failed.details["rows"])


def test_a_merge_of_another_run_is_an_input_error(
    labelled: tuple[Path, Path], tmp_path: Path
) -> None:
    merged = Path(shutil.copytree(labelled[1], tmp_path / "merged"))
    run = json.loads((merged / "run.json").read_text(encoding="utf-8"))
    run["pseudolabel_run"]["vocabulary"] = ["cat"]
    (merged / "run.json").write_text(json.dumps(run), encoding="utf-8")
    with pytest.raises(InputError, match="merges another pseudo-label run"):
        check_pseudolabels(labelled[0], merged, CONFIG)


# --- features ------------------------------------------------------------------------------------


def test_a_real_feature_cache_passes(features: Path) -> None:
    report = check_features(features, CONFIG)
    assert report.success, report.failed
    index = json.loads((features / "index.json").read_text(encoding="utf-8"))
    assert index["source_images"] == 4
    # One row per cached entry: the tiles of the 4 images.
    assert result(report, "images.expect_table_row_count_to_equal").observed == index["images"] > 4


def test_a_nan_in_a_shard_fails_naming_the_shard(features: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    cache = Path(shutil.copytree(features, tmp_path / "cache"))
    index = json.loads((cache / "index.json").read_text(encoding="utf-8"))
    file = cache / "shards" / index["shards"][1]["file"]
    tensors = load_file(file)
    tensors["features"][0, 1, 2, 3] = float("nan")
    save_file(tensors, file)
    index["shards"][1]["sha256"] = sha256_file(file)  # so the NaN, not the hash, is what fails
    (cache / "index.json").write_text(json.dumps(index), encoding="utf-8")
    report = check_features(cache, CONFIG)
    expectation = "shards.expect_column_values_to_be_in_set(verified)"
    assert report.failed == [expectation]
    (row,) = result(report, expectation).details["rows"]
    assert row["shard"] == file.name and "NaN" in row["problem"]


# --- reports -------------------------------------------------------------------------------------


def test_run_gate_writes_the_reports_and_returns_on_success(tmp_path: Path) -> None:
    report = check_manifest(write(manifest(), tmp_path / "m.parquet"), CONFIG)
    path = run_gate(report, tmp_path / "gates")
    assert path == tmp_path / "gates" / "manifest.json"
    assert json.loads(path.read_text(encoding="utf-8"))["success"] is True
    assert "passed" in (tmp_path / "gates" / "manifest.md").read_text(encoding="utf-8")


def test_run_gate_raises_a_one_line_error_naming_the_failures_and_the_report(
    tmp_path: Path,
) -> None:
    frame = manifest().assign(split=["train"] * 9 + ["holdout"])
    report = check_manifest(write(frame, tmp_path / "m.parquet"), CONFIG)
    with pytest.raises(GateFailed) as caught:
        run_gate(report, tmp_path / "gates")
    message = str(caught.value)
    json_path = tmp_path / "gates" / "manifest.json"
    assert isinstance(caught.value, FmbsegError) and "\n" not in message
    assert "'manifest'" in message and str(json_path) in message
    assert "manifest.expect_column_values_to_be_in_set(split)" in message
    saved = json.loads(json_path.read_text(encoding="utf-8"))  # strict JSON (no NaN)
    assert saved["success"] is False
    assert saved["failed"] == ["manifest.expect_column_values_to_be_in_set(split)"]
    markdown = (tmp_path / "gates" / "manifest.md").read_text(encoding="utf-8")
    assert "FAILED" in markdown and "holdout" in markdown


def test_config_bounds_are_validated_strictly() -> None:
    with pytest.raises(ConfigError, match="pseudolabels.max_failed_fraction"):
        validate(GatesConfig, {"pseudolabels": {"max_failed_fraction": 1.5}}, "params.yaml")
    with pytest.raises(ConfigError, match="manifest.min_widht: unknown key"):
        validate(GatesConfig, {"manifest": {"min_widht": 3}}, "params.yaml")


def test_importing_the_module_does_not_import_great_expectations() -> None:
    code = "import sys, fmbseg.gates; assert 'great_expectations' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unfinished_cache_or_run_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no finished feature cache"):
        check_features(tmp_path, CONFIG)
    with pytest.raises(InputError, match="no finished pseudo-label run"):
        check_pseudolabels(tmp_path, tmp_path, CONFIG)
