"""dvc.yaml's data wiring under a real ``dvc repro``: registered training sets are outputs of
the download stage; the training folder (``data.train``) is a plain dependency, so a folder of
the user's own is read as it is, and images added to it are kept and used."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fmbseg.oracle.scenes import OracleWorld, write_scene_folder

REPO = Path(__file__).resolve().parents[1]
WORLD = OracleWorld()
ORACLE = {
    "models": {
        "clip": {"backend": "oracle"},
        "sam": {"backend": "oracle"},
        "encoder": {"backend": "oracle"},
    },
    "pseudolabel": {"short_side": 128, "crop_stride": 32},
}


def deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        base[key] = deep_update(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def dvc(*args: str, cwd: Path, ok: bool = True) -> str:
    """``dvc ARGS`` in ``cwd`` with this environment's ``fmbseg`` on PATH; its output."""
    bin_dir = Path(sys.executable).parent
    environment = os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FMBSEG_TRACKING": "0",
    }
    result = subprocess.run(
        [str(bin_dir / "dvc"), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == ok, output[-3000:]
    return output


def write_params(project: Path, **data: object) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params = deep_update(params, ORACLE | {"data": data})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """This repository's dvc.yaml in a new DVC project, with a folder of the user's photos
    (oracle scenes in ``images/train/``) and no classes.txt."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    scenes = tmp_path / "scenes"
    write_scene_folder(WORLD, 4, scenes, seed=3, sizes=((64, 80),))
    photos = tmp_path / "my_photos" / "images" / "train"
    photos.mkdir(parents=True)
    for name in ("0000.png", "0001.png", "0002.png"):
        shutil.copy(scenes / "images" / name, photos / name)
    dvc("init", "--no-scm", "-q", cwd=tmp_path)
    dvc("config", "core.analytics", "false", cwd=tmp_path)
    return tmp_path


def summary(project: Path, stage_output: str) -> dict:
    return yaml.safe_load((project / "outputs" / stage_output / "summary.json").read_text())


def test_a_folder_of_your_own_is_a_dependency_whose_added_images_are_kept_and_used(
    project: Path,
) -> None:
    photos = project / "my_photos" / "images" / "train"
    write_params(project, train="my_photos", download=[])
    # Without a classes.txt or data.vocabulary nothing says which classes to look for.
    failed = dvc("repro", "pseudolabel", cwd=project, ok=False)
    assert "error: my_photos/classes.txt: no class names for pseudo-labelling" in failed
    assert "data.vocabulary" in failed

    write_params(project, train="my_photos", download=[], vocabulary=list(WORLD.class_names))
    dvc("repro", "pseudolabel", cwd=project)
    assert summary(project, "pseudolabels")["images"] == 3
    vocabulary = (project / "outputs" / "manifest" / "classes.txt").read_text().splitlines()
    assert vocabulary == list(WORLD.class_names)

    shutil.copy(project / "scenes" / "images" / "0003.png", photos / "0003.png")
    rerun = dvc("repro", "pseudolabel", cwd=project)
    assert "Running stage 'manifest'" in rerun and "Running stage 'pseudolabel'" in rerun
    assert sorted(p.name for p in photos.iterdir()) == [f"000{i}.png" for i in range(4)]
    assert summary(project, "pseudolabels")["images"] == 4
    assert "up to date" in dvc("status", "pseudolabel", cwd=project)


def test_registered_training_sets_are_downloaded_by_the_pipeline(project: Path) -> None:
    write_params(project, train="data/demo_train", download=["demo_train"])
    dag = dvc("dag", "manifest", cwd=project)
    assert "download_train@demo_train" in dag
    dvc("repro", "manifest", cwd=project)
    listed = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert {"download_train@demo_train", "manifest"} <= set(listed)
    assert (project / "outputs" / "manifest" / "classes.txt").read_text().splitlines()[
        0
    ] == "person"


def test_train_and_evaluate_rerun_when_the_text_model_changes_and_train_owns_model_json() -> None:
    """Every method's train reads ``models.text`` and writes ``model.json`` (which method, which
    files); evaluation builds the text model again; register reads the record."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert {"train", "models.text", "models.clip"} <= set(stages["train"]["params"])
    outs = [next(iter(out)) if isinstance(out, dict) else out for out in stages["train"]["outs"]]
    assert "outputs/model/model.json" in outs
    assert {"inference", "models.text", "models.encoder"} <= set(stages["evaluate"]["do"]["params"])
    assert "outputs/model/model.json" in stages["register"]["deps"]
