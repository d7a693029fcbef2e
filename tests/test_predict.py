"""``fmbseg predict``: label and overlay PNGs for files and folders; bad images skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmbseg.errors import InputError
from fmbseg.oracle.scenes import OracleWorld, write_scene_folder
from fmbseg.predict import collect_images, run_predict

WORLD = OracleWorld()


def test_writes_palette_labels_and_overlays(oracle_run, tmp_path: Path) -> None:
    scenes = write_scene_folder(WORLD, 2, tmp_path / "in", seed=3, sizes=((70, 90),))
    (tmp_path / "in" / "images" / "broken.png").write_bytes(b"not a png")
    summary = run_predict(
        oracle_run.params,
        [tmp_path / "in" / "images"],
        WORLD.class_names,
        oracle_run.module,
        tmp_path / "out",
        show_progress=False,
    )
    assert summary["images"] == 2 and list(summary["failed"]) == ["broken"]
    label = Image.open(tmp_path / "out" / "0000.png")
    assert label.mode == "P" and label.size == (90, 70)
    assert (np.asarray(label) == scenes[0].labels).mean() >= 0.8
    overlay = Image.open(tmp_path / "out" / "0000_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (90, 70)


def test_cli_with_class_list(oracle_run, tmp_path: Path) -> None:
    write_scene_folder(WORLD, 1, tmp_path / "in", seed=4, sizes=((64, 64),))
    overrides = [
        arg for key in ("models", "inference") for arg in _overrides(oracle_run.params, key)
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fmbseg.cli",
            "-q",
            "predict",
            str(tmp_path / "in" / "images" / "0000.png"),
            "--classes",
            ",".join(WORLD.class_names),
            "--model",
            str(oracle_run.module),
            "--out",
            str(tmp_path / "out"),
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"] == 1
    assert (tmp_path / "out" / "0000_overlay.png").is_file()


def _overrides(params, section: str) -> list[str]:
    flat = {
        "models": [
            "models.clip.backend=oracle",
            "models.sam.backend=oracle",
            "models.encoder.backend=oracle",
        ],
        "inference": [
            f"inference.{k}={v}"
            for k, v in params.inference.model_dump().items()
            if k in ("short_side", "window", "stride")
        ],
    }[section]
    return [token for item in flat for token in ("-S", item)]


def test_output_names_must_not_collide(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / folder / "x.png")
    with pytest.raises(InputError, match="would both be written as 'x'"):
        collect_images([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"])
    with pytest.raises(InputError, match="no such image or folder"):
        collect_images([tmp_path / "absent.png"])
