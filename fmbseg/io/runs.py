"""Resumable stage outputs: a folder holds one run, identified by its ``run.json`` record.

A rerun with the same record resumes; a folder made with other inputs or params (or one whose
record is missing) is never mixed in: it is refused, or emptied when the caller asks (what a
persisted DVC output needs). Claims are serialised by a lock file beside the folder, so several
workers sharing one output folder agree on whether to resume or restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fmbseg.errors import InputError
from fmbseg.io.atomic import write_text_atomic

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``out`` across processes (the lock file outlives the folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.fmbseg-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_partial_writes(folder: Path, names: Sequence[str] = ("*",)) -> None:
    """Delete the temporary files (``.<name>.<random>.tmp``) that atomic writes of ``names``
    in ``folder`` left when a kill cut them short: never read, but DVC would store them with
    the output. Only for files the caller owns."""
    for name in names:
        for leftover in folder.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def claim_output(
    out: Path,
    record: dict[str, Any],
    *,
    kind: str,
    work: str,
    restart_if_changed: bool,
    own_files: Sequence[str] = (),
    own_dirs: Sequence[str] = (),
) -> bool:
    """True when ``out`` holds this very run (resume), False when it starts fresh.

    ``kind`` names the outputs in messages ("pseudo-labels"); ``work`` is a path in ``out``
    whose presence without a record means a run of unknown params. Leftover temporaries of
    ``own_files`` in ``out`` and of anything in ``own_dirs`` are removed. Writes no record: the
    caller does, once its models have loaded, so a run that fails early leaves no trace.
    """
    with output_lock(out):
        run_file = out / RUN_FILE
        if run_file.is_file():
            previous = json.loads(run_file.read_text(encoding="utf-8"))
            if previous == record:
                _remove_leftovers(out, own_files, own_dirs)
                return True
            changed = ", ".join(sorted(key for key in record if previous.get(key) != record[key]))
            holds = f"{kind} made with other {changed}"
        elif (out / work).exists():
            holds = f"{kind} of an unknown run ({RUN_FILE} missing)"
        else:
            _remove_leftovers(out, own_files, own_dirs)  # a first start killed early
            return False
        if not restart_if_changed:
            raise InputError(
                f"{out}: holds {holds}; delete the folder (or choose another, or pass "
                "--restart-if-changed) to start over"
            )
        log.warning("%s: holds %s; starting over", out, holds)
        shutil.rmtree(out)
        return False


def write_run_record(out: Path, record: dict[str, Any]) -> None:
    write_text_atomic(out / RUN_FILE, json.dumps(record, indent=2, ensure_ascii=False))


def _remove_leftovers(out: Path, own_files: Sequence[str], own_dirs: Sequence[str]) -> None:
    remove_partial_writes(out, (RUN_FILE, *own_files))
    for folder in own_dirs:
        remove_partial_writes(out / folder)
