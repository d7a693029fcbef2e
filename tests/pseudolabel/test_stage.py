"""The pseudo-labelling stage over a folder: shards, resume, failures, determinism, merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fmbseg.config import AutoMaskConfig, MergeConfig, Params, PseudoLabelConfig
from fmbseg.errors import FmbsegError, InputError
from fmbseg.masks import IGNORE_LABEL, decode_rle
from fmbseg.oracle.fakes import FakeClip, FakeSam
from fmbseg.oracle.scenes import OracleWorld, read_labels, write_scene_folder
from fmbseg.pseudolabel.merge import read_label_map, run_merge
from fmbseg.pseudolabel.stage import Backends, run_pseudolabel

WORLD = OracleWorld()
VOCABULARY = list(WORLD.class_names)
PARAMS = Params(
    pseudolabel=PseudoLabelConfig(
        short_side=256,
        crop_stride=32,
        images_per_shard=3,
        automask=AutoMaskConfig(points_per_side=16),
    )
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    write_scene_folder(WORLD, 7, folder, seed=1, sizes=((96, 128), (53, 37), (128, 96)))
    return folder


def backends() -> Backends:
    return Backends(FakeClip(WORLD), FakeSam(WORLD))


def run(scenes: Path, out: Path, **kwargs):
    options = {"backends": backends(), "show_progress": False} | kwargs
    return run_pseudolabel(PARAMS, scenes / "images", VOCABULARY, out, **options)


def test_writes_sharded_mask_tables_and_a_summary(scenes: Path, tmp_path: Path) -> None:
    summary = run(scenes, tmp_path / "pl")
    assert summary["images"] == 7 and summary["shards"] == 3 and summary["failed"] == 0
    assert set(summary["seconds"]) >= {"clip", "sam_encoder", "route_1_1", "route_1_2"}
    table = pq.read_table(tmp_path / "pl" / "shards" / "00000.parquet").to_pydict()
    assert set(table["image_id"]) == {"0000", "0001", "0002"}
    assert set(table["route"]) == {"1.1", "1.2"}
    row = 0
    mask = decode_rle(table["rle"][row], table["height"][row], table["width"][row])
    assert mask.sum() == table["area"][row]
    truth = read_labels(scenes / "labels" / f"{table['image_id'][row]}.png")
    assert (truth[mask] == table["class_id"][row]).mean() > 0.9


def test_rerun_skips_finished_shards(scenes: Path, tmp_path: Path) -> None:
    run(scenes, tmp_path / "pl", worker=(0, 2))  # shards 0 and 2 only
    fresh = backends()
    summary = run(scenes, tmp_path / "pl", backends=fresh)
    assert fresh.sam.embed_calls == 3  # only shard 1's three images
    assert summary["shards_done"] == 3
    again = backends()
    run(scenes, tmp_path / "pl", backends=again)
    assert again.sam.embed_calls == 0


def test_same_inputs_give_identical_outputs(scenes: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        run(scenes, tmp_path / name)
        run_merge(MergeConfig(seed=3), tmp_path / name, tmp_path / f"{name}-merged")
    for relative in ["shards/00001.parquet", "summary.json"]:
        assert (tmp_path / "a-merged" / relative).read_bytes() == (
            tmp_path / "b-merged" / relative
        ).read_bytes()
    for label in (tmp_path / "a-merged" / "labels").iterdir():
        assert label.read_bytes() == (tmp_path / "b-merged" / "labels" / label.name).read_bytes()


def test_other_params_in_the_same_folder_are_refused_or_replaced(
    scenes: Path, tmp_path: Path
) -> None:
    run(scenes, tmp_path / "pl", limit=3)
    with pytest.raises(InputError, match="other images"):
        run(scenes, tmp_path / "pl")
    summary = run(scenes, tmp_path / "pl", restart_if_changed=True)
    assert summary["images"] == 7 and summary["shards_done"] == 3


def test_unreadable_images_are_recorded_and_tolerated_up_to_the_limit(
    scenes: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((scenes / "images").iterdir())[:4]:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    params = PARAMS.model_copy(
        update={"pseudolabel": PARAMS.pseudolabel.model_copy(update={"max_failed_fraction": 0.25})}
    )
    summary = run_pseudolabel(
        params, images, VOCABULARY, tmp_path / "ok", backends=backends(), show_progress=False
    )
    assert summary["failed"] == 1 and "broken.png" in summary["failed_images"]["broken"]
    strict = PARAMS.model_copy(
        update={"pseudolabel": PARAMS.pseudolabel.model_copy(update={"max_failed_fraction": 0.1})}
    )
    with pytest.raises(FmbsegError, match="1 of 5 images could not be read"):
        run_pseudolabel(
            strict,
            images,
            VOCABULARY,
            tmp_path / "strict",
            backends=backends(),
            show_progress=False,
        )
    assert json.loads((tmp_path / "strict" / "summary.json").read_text())["failed"] == 1


@pytest.mark.parametrize("vocabulary", [[], ["cat", "dog", "Cat"], ["cat", "  "]])
def test_bad_vocabularies_are_rejected_before_any_model_loads(
    scenes: Path, tmp_path: Path, vocabulary
) -> None:
    with pytest.raises(InputError, match="vocabulary"):
        run_pseudolabel(PARAMS, scenes / "images", vocabulary, tmp_path / "pl", backends=None)
    assert not (tmp_path / "pl").exists()


def test_semi_supervised_labels_restrict_the_classes(scenes: Path, tmp_path: Path) -> None:
    labels = {"0000": ["cat"], "0001": []}
    run(scenes, tmp_path / "pl", image_labels=labels, limit=2)
    table = pq.read_table(tmp_path / "pl" / "shards" / "00000.parquet").to_pydict()
    assert set(table["image_id"]) <= {"0000"}
    assert set(table["class_id"]) <= {0}
    with pytest.raises(InputError, match="not in the vocabulary"):
        run(scenes, tmp_path / "other", image_labels={"0000": ["unicorn"]})


def test_merge_keeps_all_of_11_and_a_seeded_share_of_12(scenes: Path, tmp_path: Path) -> None:
    run(scenes, tmp_path / "pl")
    source = pq.read_table(tmp_path / "pl" / "shards" / "00000.parquet").to_pydict()
    counts = {}
    for fraction in (0.0, 1.0):
        out = tmp_path / f"m{fraction}"
        summary = run_merge(MergeConfig(route_12_fraction=fraction), tmp_path / "pl", out)
        kept = pq.read_table(out / "shards" / "00000.parquet").to_pydict()
        counts[fraction] = kept["route"].count("1.2")
        assert kept["route"].count("1.1") == source["route"].count("1.1")
        assert summary["images"] == 7
    assert counts[0.0] == 0 and counts[1.0] == source["route"].count("1.2")


def test_a_shard_without_masks_merges_to_ignore_maps(scenes: Path, tmp_path: Path) -> None:
    run(scenes, tmp_path / "pl", image_labels={}, limit=3)  # no class given: no masks at all
    summary = run_merge(MergeConfig(), tmp_path / "pl", tmp_path / "merged")
    assert summary["images"] == 3 and summary["mean_labelled_fraction"] == 0.0
    assert (read_label_map(tmp_path / "merged" / "labels" / "0000.png") == IGNORE_LABEL).all()


def test_merged_label_maps_match_the_truth(scenes: Path, tmp_path: Path) -> None:
    run(scenes, tmp_path / "pl")
    run_merge(MergeConfig(route_12_fraction=1.0), tmp_path / "pl", tmp_path / "merged")
    correct = labelled = 0
    for label_path in sorted((scenes / "labels").iterdir()):
        truth = read_labels(label_path)
        merged = read_label_map(tmp_path / "merged" / "labels" / label_path.name)
        assert merged.shape == truth.shape and merged.dtype == np.uint16
        mask = merged != IGNORE_LABEL
        correct += int((merged[mask] == truth[mask]).sum())
        labelled += int(mask.sum())
    assert correct / labelled >= 0.95


def test_cli_runs_both_stages_with_oracle_backends(scenes: Path, tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("\n".join(VOCABULARY) + "\n", encoding="utf-8")
    overrides = [
        "-S",
        "models.clip.backend=oracle",
        "-S",
        "models.sam.backend=oracle",
        "-S",
        "pseudolabel.short_side=256",
        "-S",
        "pseudolabel.crop_stride=32",
    ]
    command = [sys.executable, "-m", "fmbseg.cli", "-q"]
    labelled = subprocess.run(
        [
            *command,
            "pseudolabel",
            *overrides,
            "--images",
            str(scenes / "images"),
            "--vocabulary",
            str(tmp_path / "classes.txt"),
            "--out",
            str(tmp_path / "pl"),
            "--limit",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert labelled.returncode == 0, labelled.stderr
    assert json.loads(labelled.stdout)["images"] == 2
    merged = subprocess.run(
        [*command, "merge", "--pseudolabels", str(tmp_path / "pl"), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert merged.returncode == 0, merged.stderr
    assert len(list((tmp_path / "m" / "labels").iterdir())) == 2
