"""Run DVC from Prefect: every stage stays a DVC stage, so locks, caches and lineage hold."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE


def _executable(name: str) -> str:
    """The command beside this Python (the project's virtual environment), else on PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ) | dict(extra or {})
    # dvc stage commands call `fmbseg`: keep this environment's bin folder first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


USER_ERROR_EXIT = 2  # fmbseg's exit status for bad input or params: retrying cannot help


class CommandFailed(RuntimeError):
    def __init__(self, argv: Sequence[str], returncode: int) -> None:
        super().__init__(f"{shlex.join(argv)} exited with {returncode}")
        self.returncode = returncode


def worth_retrying(task: object, task_run: object, state: object) -> bool:
    """Retry crashes and infrastructure failures, not refusals of bad input."""
    try:
        state.result()  # type: ignore[attr-defined]
    except CommandFailed as failure:
        return failure.returncode != USER_ERROR_EXIT
    except Exception:
        return True
    return True


def run_command(argv: Sequence[str], project_dir: str, env: Mapping[str, str] | None = None) -> str:
    """Run one command in the project folder, streaming its output to the Prefect log."""
    logger = get_run_logger()
    logger.info("$ %s", shlex.join(argv))
    process = subprocess.run(
        list(argv),
        cwd=project_dir,
        env=_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    for line in process.stdout.splitlines():
        logger.info(line)
    if process.returncode != 0:
        raise CommandFailed(argv, process.returncode)
    return process.stdout


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
