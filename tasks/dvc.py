"""Run DVC from Prefect: every stage stays a DVC stage, so locks, caches and lineage hold."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fmbseg.errors import USER_ERROR_EXIT


def _executable(name: str) -> str:
    """The command beside this Python (the project's virtual environment), else on PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ) | dict(extra or {})
    # dvc stage commands call `fmbseg`: keep this environment's bin folder first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


# `dvc repro` exits 255 whatever failed; its last error names the stage command's own status.
DVC_STAGE_FAILED = re.compile(r"failed to reproduce .*, exited with (-?\d+)\s*$")


class CommandFailed(RuntimeError):
    def __init__(self, argv: Sequence[str], returncode: int, output: Sequence[str] = ()) -> None:
        super().__init__(f"{shlex.join(argv)} exited with {returncode}")
        self.returncode = returncode
        found = [m for line in output if (m := DVC_STAGE_FAILED.search(line))]
        # why it failed: the stage command's status under `dvc repro`, else the command's own
        self.status = int(found[-1][1]) if found else returncode


def worth_retrying(task: object, task_run: object, state: object) -> bool:
    """Retry crashes, infrastructure failures and an MLflow tracking server that did not
    answer (fmbseg's exit status 3), not refusals of bad input or params (exit status 2)."""
    try:
        state.result()  # type: ignore[attr-defined]
    except CommandFailed as failure:
        return failure.status != USER_ERROR_EXIT
    except Exception:
        return True
    return True


def run_command(
    argv: Sequence[str],
    project_dir: str,
    env: Mapping[str, str] | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> str:
    """Run one command in the project folder, each output line into the Prefect run log as it
    comes (progress bars included: a carriage return ends a line too). The command dies with
    this process, so a killed worker leaves no orphan computing shards."""
    logger = logger or get_run_logger()
    logger.info("$ %s", shlex.join(argv))
    lines = []
    with subprocess.Popen(
        list(argv),
        cwd=project_dir,
        env=_environment(env) | {"PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=_die_with_parent(),
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if line := line.rstrip():
                logger.info(line)
                lines.append(line)
    if process.returncode != 0:
        raise CommandFailed(argv, process.returncode, lines[-20:])
    return "\n".join(lines)


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a child-side hook asking the kernel to SIGKILL the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    set_parent_death_signal, kill = 1, 9  # PR_SET_PDEATHSIG, SIGKILL

    def hook() -> None:
        prctl(set_parent_death_signal, kill)

    return hook


# No result caching: a stage whose inputs changed must run again; DVC decides what to skip.
@task(retries=1, retry_delay_seconds=30, cache_policy=NO_CACHE, retry_condition_fn=worth_retrying)
def dvc_repro(
    project_dir: str, targets: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> str:
    return run_command([_executable("dvc"), "repro", *targets], project_dir, env)


@task(cache_policy=NO_CACHE)
def dvc_commit(project_dir: str, targets: Sequence[str]) -> str:
    """Record outputs made outside `dvc repro` (e.g. by sharded workers) in dvc.lock."""
    return run_command([_executable("dvc"), "commit", "--force", *targets], project_dir)


@task(cache_policy=NO_CACHE)
def stage_command(project_dir: str, stage: str) -> list[str]:
    """A dvc.yaml stage's command with its ${...} values filled in, as an argument list."""
    from dvc.repo import Repo

    previous = os.getcwd()
    os.chdir(project_dir)  # dvc resolves paths against the working folder
    try:
        with Repo(".") as repo:
            (found,) = repo.stage.collect(stage)
            command = found.cmd
    finally:
        os.chdir(previous)
    return shlex.split(command if isinstance(command, str) else " ".join(command))


@task(retries=2, retry_delay_seconds=60, cache_policy=NO_CACHE, retry_condition_fn=worth_retrying)
def fmbseg_command(
    project_dir: str, argv: Sequence[str], env: Mapping[str, str] | None = None
) -> str:
    """An `fmbseg ...` command (argv[0] == "fmbseg"); stages resume, so a retry loses nothing."""
    return run_command([_executable(argv[0]), *argv[1:]], project_dir, env)
