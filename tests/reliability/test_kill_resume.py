"""A stage killed with SIGKILL at any point resumes on rerun and ends exactly where an
uninterrupted run ends.

Each stage runs as ``python -m fmbseg.cli`` with oracle models and is killed twice at seeded
points: first the moment a temporary file of a seeded shard (or epoch checkpoint) appears, so
the process dies in the middle of a write; then, on the rerun, a seeded delay after a later
shard (or checkpoint) is finished. After each kill no visible file is partial, and what was
finished before stays untouched; the third run finishes, and its outputs equal those of an
uninterrupted run with the same seed (parquet tables, JSON records without timings, tensors
bit for bit). Training runs on one thread in every process: bit-identical results are only
promised for the same thread count.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reliability_support import (
    WORLD,
    assert_same_outputs,
    files,
    params,
    read_json,
    settings,
    spawn,
)

SEED = 20240611
PSEUDOLABEL = ("pseudolabel.images_per_shard=1",)
FEATURES = ("features.images_per_shard=1", "features.image_size=224", "models.encoder.batch_size=1")
TRAIN = ("train.epochs=12", "train.batch_size=1", "train.seed=3")


@dataclass(frozen=True)
class Stage:
    """One stage under test: its command, its units of work and the file that ends it."""

    name: str
    command: list[str]
    overrides: tuple[str, ...]
    unit: str  # what one unit of work is called: shard, epoch
    units: int
    writing: Callable[[int], str]  # glob (below the output) of a temporary file of unit k
    finished: Callable[[int], str]  # path (below the output) of unit k once finished
    done: str  # written last, when the whole run is finished
    kept: tuple[str, ...]  # written before the first kill, never to be rewritten by a rerun


def killed(stage: Stage, cwd: Path, trigger: Callable[[], bool], delay: float) -> int:
    """Run the stage until ``trigger()`` holds, wait ``delay`` s, SIGKILL the process group;
    returns the exit status (-9 when the kill landed before the stage ended)."""
    log = cwd / f"{stage.name}.log"
    process = spawn([*stage.command, *settings(*stage.overrides)], cwd, log)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if trigger():
            time.sleep(delay)
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.0005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, (
        f"{stage.name} ended ({process.returncode}) before the kill: "
        f"{log.read_text(errors='replace')[-2000:]}"
    )
    return process.returncode


def mid_write(stage: Stage, out: Path, unit: int) -> Callable[[], bool]:
    """True once a temporary file of ``unit`` or one of the next two is seen, so the kill lands
    in the middle of a write; or, should all three writes be too quick to see (where fsync
    costs nothing), once the third is finished."""

    def seen() -> bool:
        writing = (next(out.glob(stage.writing(k)), None) for k in range(unit, unit + 3))
        return any(writing) or (out / stage.finished(unit + 2)).exists()

    return seen


def finished_to_completion(stage: Stage, cwd: Path) -> str:
    """The rerun's messages, after it has finished successfully."""
    log = cwd / f"{stage.name}.final.log"
    process = spawn([*stage.command, *settings(*stage.overrides)], cwd, log)
    process.wait(timeout=120)
    messages = log.read_text(errors="replace")
    assert process.returncode == 0, messages[-3000:]
    return messages


def assert_no_partial_file(stage: Stage, out: Path) -> None:
    """What a reader can see after a kill is whole: the kill hit only temporary files."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    assert not (out / stage.done).exists()
    for name in files(out):
        path = out / name
        if path.name.startswith("."):
            continue
        if path.suffix == ".json":
            record = read_json(path)
            if "sha256" in record and "file" in record:  # a feature shard's marker
                data = (path.parent / record["file"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == record["sha256"], name
            if "sha256" in record and "tensors" in record:  # the latest checkpoint
                data = (path.parent / record["tensors"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == record["sha256"], name
        elif path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".safetensors":
            load_file(path)


def _kill_twice_then_finish(
    stage: Stage, cwd: Path, out: Path, outcome: Callable[..., None]
) -> str:
    """The kills and the final run; returns the final run's messages."""
    rng = random.Random(f"{SEED}-{stage.name}")
    first = rng.randrange(1, stage.units // 3)
    second = rng.randrange(max(first + 3, stage.units // 2), stage.units - 2)
    delay = rng.uniform(0.0, 0.01)

    code = killed(stage, cwd, mid_write(stage, out, first), 0.0)
    assert_no_partial_file(stage, out)
    kept = {name: (out / name).stat().st_mtime_ns for name in stage.kept}

    killed(stage, cwd, (out / stage.finished(second)).exists, delay)
    assert_no_partial_file(stage, out)
    messages = finished_to_completion(stage, cwd)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept, "finished work redone"

    command = f"fmbseg {' '.join(stage.command)}"
    outcome(
        "kill",
        f"{stage.name}: SIGKILL mid-write from {stage.unit} {first} of {stage.units} on, then "
        f"{delay * 1000:.0f} ms after {stage.unit} {second} was finished",
        command,
        code=f"{code}, {code}, then 0",
        message="",
        left=f"after each kill: finished {stage.unit}s only, none partial; after the rerun: "
        "the uninterrupted run's outputs",
    )
    return messages


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The in-process reference trains on one thread, as the commands do (OMP_NUM_THREADS)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_killed_pseudolabelling_resumes_to_the_uninterrupted_result(
    scenes: Path, tmp_path: Path, outcome: Callable[..., None]
) -> None:
    from fmbseg.pseudolabel.stage import run_pseudolabel

    images = scenes / "images"
    (tmp_path / "few").mkdir()
    for path in sorted(images.glob("*.png"))[:8]:
        (tmp_path / "few" / path.name).write_bytes(path.read_bytes())
    run_pseudolabel(
        params(*PSEUDOLABEL),
        tmp_path / "few",
        WORLD.class_names,
        tmp_path / "reference",
        show_progress=False,
    )
    stage = Stage(
        "pseudolabel",
        f"pseudolabel --images few --vocabulary {scenes / 'classes.txt'} --out out "
        "--restart-if-changed".split(),
        PSEUDOLABEL,
        unit="shard",
        units=8,
        writing=lambda k: f"shards/.{k:05d}.*.tmp",
        finished=lambda k: f"shards/{k:05d}.json",
        done="summary.json",
        kept=("run.json", "shards/00000.parquet", "shards/00000.json"),
    )
    _kill_twice_then_finish(stage, tmp_path, tmp_path / "out", outcome)
    assert_same_outputs(tmp_path / "out", tmp_path / "reference")


def test_killed_feature_caching_resumes_to_the_uninterrupted_result(
    scenes: Path, merged: Path, tmp_path: Path, outcome: Callable[..., None]
) -> None:
    from fmbseg.align.features import run_cache_features

    run_cache_features(
        params(*FEATURES), scenes / "images", merged, tmp_path / "reference", show_progress=False
    )
    stage = Stage(
        "cache-features",
        f"cache-features --images {scenes / 'images'} --labels {merged} --out out "
        "--restart-if-changed".split(),
        FEATURES,
        unit="shard",
        units=16,
        writing=lambda k: f"shards/.{k:05d}.*.tmp",
        finished=lambda k: f"shards/{k:05d}.json",
        done="index.json",
        kept=("run.json", "shards/00000.safetensors", "shards/00000.json"),
    )
    _kill_twice_then_finish(stage, tmp_path, tmp_path / "out", outcome)
    # The command also runs the feature gate, whose report the library call does not write.
    assert_same_outputs(tmp_path / "out", tmp_path / "reference", ignore=("gates/",))


def test_killed_training_resumes_to_the_same_weights(
    scenes: Path, merged: Path, tmp_path: Path, outcome: Callable[..., None], one_thread: None
) -> None:
    from fmbseg.align.features import run_cache_features
    from fmbseg.align.train import run_train

    features = tmp_path / "features"
    run_cache_features(
        params("features.image_size=64"), scenes / "images", merged, features, show_progress=False
    )
    run_train(params(*TRAIN), features, tmp_path / "reference", show_progress=False)
    stage = Stage(
        "train",
        ["train", "--features", "features", "--out", "out", "--restart-if-changed"],
        TRAIN,
        unit="epoch",
        units=12,
        writing=lambda k: f"checkpoints/.epoch_{k:03d}.safetensors.*.tmp",
        finished=lambda k: f"checkpoints/epoch_{k:03d}.safetensors",
        done="module.safetensors",
        kept=("run.json", "text_embeddings.safetensors"),
    )
    messages = _kill_twice_then_finish(stage, tmp_path, tmp_path / "out", outcome)
    assert re.search(r"resuming out after epoch \d+ of 12", messages), messages[-2000:]
    assert_same_outputs(tmp_path / "out", tmp_path / "reference")


def _pseudolabel(folder: Path, scenes: Path, merged: Path) -> None:
    from fmbseg.pseudolabel.stage import run_pseudolabel

    run_pseudolabel(
        params(*PSEUDOLABEL),
        scenes / "images",
        WORLD.class_names,
        folder,
        limit=2,
        show_progress=False,
        restart_if_changed=True,
    )


def _features(folder: Path, scenes: Path, merged: Path) -> None:
    from fmbseg.align.features import run_cache_features

    run_cache_features(
        params("features.image_size=32", "features.images_per_shard=8"),
        scenes / "images",
        merged,
        folder,
        show_progress=False,
        restart_if_changed=True,
    )


def _train(folder: Path, scenes: Path, merged: Path) -> None:
    from fmbseg.align.train import run_train

    _features(folder.parent / "features", scenes, merged)
    run_train(
        params("train.epochs=2"),
        folder.parent / "features",
        folder,
        show_progress=False,
        restart_if_changed=True,
    )


LEFTOVERS = {
    "pseudolabel": (_pseudolabel, ["shards/.00001.parquet.k2x9.tmp"]),
    "cache-features": (_features, ["shards/.00001.safetensors.k2x9.tmp"]),
    "train": (
        _train,
        ["checkpoints/.epoch_002.safetensors.k2x9.tmp", "checkpoints/epoch_001.safetensors"],
    ),
}


@pytest.mark.parametrize(
    "stage",
    [
        "pseudolabel",
        "cache-features",
        "train",
    ],
)
def test_a_rerun_removes_what_a_kill_between_two_writes_left_behind(
    stage: str, scenes: Path, merged: Path, tmp_path: Path, outcome: Callable[..., None]
) -> None:
    """A kill inside an atomic write leaves its temporary file; a kill after a new checkpoint
    but before the old one is deleted leaves the old one. Neither may stay in the output
    (DVC would store them with it)."""
    run, leftovers = LEFTOVERS[stage]
    out = tmp_path / "out"
    run(out, scenes, merged)
    before = files(out)
    for name in leftovers:
        (out / name).write_bytes(b"cut short")
    run(out, scenes, merged)
    outcome(
        "kill",
        f"{stage}: files planted as kills leave them ({', '.join(leftovers)})",
        f"rerun of {stage}",
        code=0,
        message="",
        left="removed"
        if files(out) == before
        else f"still there: {sorted(set(files(out)) - set(before))}",
    )
    assert files(out) == before
