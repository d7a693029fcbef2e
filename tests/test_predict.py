"""``fmbseg predict``: label and overlay PNGs for files and folders, ``classes.json``, a
palette with no dark or grey class; bad images skipped and reported by the exit status."""

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
from fmbseg.predict import collect_images, label_palette, run_predict

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
    assert label.getpalette()[:24] == label_palette(8).flatten().tolist()
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {
        str(index): name for index, name in enumerate(WORLD.class_names)
    }
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


@pytest.mark.parametrize("count", [1, 2, 8, 21, 150, 256])
def test_the_palette_has_distinct_saturated_bright_colours(count: int) -> None:
    colours = label_palette(count).astype(int)
    assert colours.shape == (count, 3)
    assert len({tuple(c) for c in colours}) == count
    assert colours.max(1).min() >= 200  # nothing dark: no class looks like shadow
    assert (colours.max(1) - colours.min(1)).min() >= 120  # nothing grey or near-white
    first = colours[:20]  # the classes of a typical vocabulary are far apart
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1)
    assert distances[~np.eye(len(first), dtype=bool)].min(initial=999) >= 80
    assert (label_palette(count + 5)[:count] == colours).all()  # a class keeps its colour


def test_a_folder_predicted_with_other_classes_is_refused(oracle_run, tmp_path: Path) -> None:
    write_scene_folder(WORLD, 1, tmp_path / "in", seed=3, sizes=((48, 48),))
    images = [tmp_path / "in" / "images"]
    run_predict(oracle_run.params, images, ["cat", "dog"], oracle_run.module, tmp_path / "out",
                show_progress=False)  # fmt: skip
    with pytest.raises(InputError, match=r"classes.json: the folder holds predictions for other"):
        run_predict(oracle_run.params, images, ["dog", "cat"], oracle_run.module,
                    tmp_path / "out", show_progress=False)  # fmt: skip


def test_a_registry_model_is_downloaded_once_into_the_cache_and_no_temporary_copy_is_left(
    store, oracle_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from fmbseg.config import Params
    from fmbseg.registry import register_module

    register_module(oracle_run.module.parent, params=oracle_run.params, name="predicted")
    monkeypatch.setenv("FMBSEG_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    write_scene_folder(WORLD, 1, tmp_path / "in", seed=6, sizes=((64, 64),))
    for out in ("first", "second"):
        # default params: a registry model runs with the params it was registered with
        summary = run_predict(Params(), [tmp_path / "in" / "images"], WORLD.class_names,
                              "models:/predicted@candidate", tmp_path / out, show_progress=False)  # fmt: skip
        assert summary["images"] == 1
    assert list((tmp_path / "tmp").iterdir()) == []
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1
    assert (tmp_path / "first" / "0000.png").read_bytes() == (
        tmp_path / "second" / "0000.png"
    ).read_bytes()


def test_cli_exits_1_when_an_input_failed_after_writing_the_others(
    oracle_run, tmp_path: Path
) -> None:
    import os

    write_scene_folder(WORLD, 1, tmp_path / "in", seed=4, sizes=((64, 64),))
    images = tmp_path / "in" / "images"
    Image.open(images / "0000.png").save(images / "whole.jpg")
    (images / "truncated.jpg").write_bytes((images / "whole.jpg").read_bytes()[:300])
    overrides = [a for key in ("models", "inference") for a in _overrides(oracle_run.params, key)]
    result = subprocess.run(
        [sys.executable, "-m", "fmbseg.cli", "-q", "predict", str(images),
         "--classes", ",".join(WORLD.class_names), "--model", str(oracle_run.module.parent),
         "--out", str(tmp_path / "out"), *overrides],
        capture_output=True, text=True, cwd=tmp_path, preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["images"] == 2 and list(summary["failed"]) == ["truncated"]
    last = result.stderr.strip().splitlines()[-1]  # after the progress bar and warnings
    assert last.startswith("error: 1 of 3 images failed: ") and "truncated.jpg" in last
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["0000.png", "0000_overlay.png", "classes.json", "whole.png",
                       "whole_overlay.png"]  # fmt: skip
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()} == {"0o644"}
