"""The resumable stages under ``dvc repro``: DVC keeps their outputs (``persist``) and the
stage decides, from its own fingerprint, whether to resume them or start over.

The dynamic test runs this repository's ``train`` stage, as written in ``dvc.yaml``, in a new
DVC project with oracle models: a ``dvc repro`` killed mid-training resumes from the last
checkpoint, and a finished run whose params then change starts over and ends exactly as a
fresh run with the new params.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from reliability_support import assert_same_outputs, params, subprocess_env

REPO = Path(__file__).parents[2]
RESUMABLE = {
    "pseudolabel": ["outputs/pseudolabels"],
    "features": ["outputs/features"],
    "train": ["outputs/model/run.json", "outputs/model/checkpoints"],
}
TRAIN = {"epochs": 12, "batch_size": 1, "seed": 3, "heads": 2}


def test_resumable_stages_persist_their_outputs_and_restart_when_their_inputs_change() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name, outputs in RESUMABLE.items():
        assert "--restart-if-changed" in stages[name]["cmd"], name
        persisted = {
            path
            for entry in stages[name]["outs"]
            if isinstance(entry, dict)
            for path, options in entry.items()
            if options.get("persist")
        }
        assert set(outputs) <= persisted, name


def dvc(*args: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    environment = subprocess_env()
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    with log.open("ab") as handle:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "dvc"), *args],
            cwd=cwd,
            env=environment,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def repro(cwd: Path, log: Path) -> str:
    process = dvc("repro", "train", cwd=cwd, log=log)
    assert process.wait(timeout=120) == 0, log.read_text(errors="replace")[-3000:]
    return log.read_text(errors="replace")


def write_params(project: Path, **train: object) -> list[str]:
    """params.yaml with oracle models; returns the same settings as overrides."""
    overrides = ["models.clip.backend=oracle", *(f"train.{k}={v}" for k, v in train.items())]
    content = {
        "data": {"train": "data/train", "train_split": "train"},
        "models": {"clip": {"backend": "oracle"}, "text": {"backend": "clip"}},
        "pseudolabel": {"templates": ["a photo of a {}."]},
        "train": train,
    }
    (project / "params.yaml").write_text(yaml.safe_dump(content), encoding="utf-8")
    return overrides


@pytest.fixture
def project(scenes: Path, merged: Path, tmp_path: Path) -> Iterator[Path]:
    """A DVC project holding this repository's train stage and a feature cache to train on."""
    from fmbseg.align.features import run_cache_features

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["train"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    run_cache_features(
        params("features.image_size=64"),
        scenes / "images",
        merged,
        tmp_path / "outputs" / "features",
        show_progress=False,
    )
    # The stage's other inputs: the training images (read by methods other than FMbSeg) and the
    # masks stage's marker for a method that trains on no masks.
    shutil.copytree(scenes / "images", tmp_path / "data" / "train" / "images" / "train")
    (tmp_path / "outputs" / "masks").mkdir(parents=True)
    (tmp_path / "outputs" / "masks" / "summary.json").write_text("{}", encoding="utf-8")
    init = dvc("init", "--no-scm", "-q", cwd=tmp_path, log=tmp_path / "init.log")
    assert init.wait(timeout=60) == 0
    for key in ("core.analytics", "core.check_update"):
        assert dvc("config", key, "false", cwd=tmp_path, log=tmp_path / "init.log").wait() == 0
    yield tmp_path
    torch.set_num_threads(threads)


def test_an_interrupted_dvc_repro_resumes_and_changed_params_start_over(
    project: Path, tmp_path_factory: pytest.TempPathFactory, outcome: Callable[..., None]
) -> None:
    from fmbseg.align.train import run_train
    from fmbseg.config import load_params

    model = project / "outputs" / "model"
    first = write_params(project, **TRAIN)
    process = dvc("repro", "train", cwd=project, log=project / "killed.log")
    deadline = time.monotonic() + 60
    while not (model / "checkpoints" / "epoch_004.safetensors").exists():
        assert process.poll() is None and time.monotonic() < deadline, "finished before the kill"
        time.sleep(0.001)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    resumed = repro(project, project / "resumed.log")
    assert re.search(r"resuming outputs/model after epoch \d+ of 12", resumed), resumed[-2000:]
    reference = tmp_path_factory.mktemp("reference")
    run_train(
        load_params(None, first), project / "outputs" / "features", reference, show_progress=False
    )
    assert_same_outputs(model, reference)

    changed = write_params(project, **(TRAIN | {"lr": 0.05}))
    restarted = repro(project, project / "restarted.log")
    assert "starting over" in restarted and "resuming" not in restarted
    fresh = tmp_path_factory.mktemp("fresh")
    run_train(
        load_params(None, changed), project / "outputs" / "features", fresh, show_progress=False
    )
    assert_same_outputs(model, fresh)

    outcome(
        "kill",
        "dvc repro train: SIGKILL of the dvc process group after epoch 4's checkpoint; "
        "then train.lr changed",
        "dvc repro train",
        code="-9, then 0, then 0",
        message=re.search(r"WARNING .*starting over", restarted).group(0),
        left="resumed from the checkpoint to the uninterrupted run's weights; after the "
        "change: a fresh run's weights",
    )
