"""Helpers of the reliability tests: oracle settings, the ``fmbseg`` command in a process of
its own, and checks of what a run left behind. (Fixtures and the table hooks live in
``conftest.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmbseg.config import Params, load_params
from fmbseg.oracle.scenes import OracleWorld

WORLD = OracleWorld()

ORACLE = (
    "models.clip.backend=oracle",
    "models.sam.backend=oracle",
    "models.encoder.backend=oracle",
    "pseudolabel.short_side=256",
    "pseudolabel.crop_stride=32",
    "train.heads=2",
)
"""Oracle models and small sizes: every stage runs in seconds on a CPU."""


def settings(*extra: str) -> list[str]:
    """``-S key=value`` arguments of the oracle settings plus ``extra``."""
    return [part for item in (*ORACLE, *extra) for part in ("-S", item)]


def subprocess_env() -> dict[str, str]:
    """One torch thread: bit-identical training is promised for the same thread count only."""
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FMBSEG_TRACKING": "0"}


def spawn(args: Sequence[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python -m fmbseg.cli ARGS`` in its own process group (so a kill reaches all of it),
    its messages appended to ``log`` (a pipe could fill up while nobody reads it)."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "fmbseg.cli", *args],
            cwd=cwd,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=handle,
            start_new_session=True,
        )


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The one ``error:`` line; fails the test on a traceback or a message of several lines."""
        assert "Traceback" not in self.stderr, self.stderr
        lines = [line for line in self.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, self.stderr
        assert self.stderr.rstrip().endswith(lines[0]), "the error is the last thing printed"
        return lines[0]


def listing(folder: Path) -> str:
    """What a run left in ``folder``: its top-level entries, a sub-folder as ``name/ (N files)``."""
    if not folder.exists():
        return "nothing"
    entries = []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            count = sum(1 for item in path.rglob("*") if item.is_file())
            entries.append(f"{path.name}/ ({count} file{'' if count == 1 else 's'})")
        else:
            entries.append(path.name)
    return ", ".join(entries) or "an empty folder"


def files(folder: Path) -> list[str]:
    """Every file below ``folder``, relative, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def without_timings(value: Any) -> Any:
    """JSON content with every ``seconds`` entry dropped: the only part that differs between
    two runs of the same work."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def params(*extra: str) -> Params:
    """The oracle settings plus ``extra``, as the library calls take them."""
    return load_params(None, [*ORACLE, *extra])


def tensors(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """A safetensors file's metadata and each tensor's dtype, shape and bytes (the header's
    metadata order varies from process to process, so the file bytes may differ)."""
    from safetensors import safe_open

    with safe_open(path, "np") as handle:
        arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata() or {}
    return metadata, {k: (a.dtype.str, a.shape, a.tobytes()) for k, a in arrays.items()}


def assert_same_outputs(out: Path, reference: Path, ignore: tuple[str, ...] = ()) -> None:
    """Same visible files; equal tables, JSON without timings, tensors to the bit, and the same
    bytes for everything else."""
    import pyarrow.parquet as pq

    def visible(folder: Path) -> list[str]:
        return [
            n
            for n in files(folder)
            if not Path(n).name.startswith(".") and not n.startswith(ignore)
        ]

    assert visible(out) == visible(reference)
    for name in visible(reference):
        ours, theirs = out / name, reference / name
        if ours.suffix == ".parquet":
            assert pq.read_table(ours).equals(pq.read_table(theirs)), name
        elif ours.suffix == ".json":
            assert without_timings(read_json(ours)) == without_timings(read_json(theirs)), name
        elif ours.suffix == ".safetensors":
            assert tensors(ours) == tensors(theirs), name
        else:
            assert ours.read_bytes() == theirs.read_bytes(), name
