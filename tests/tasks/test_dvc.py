"""Commands run by the flows: output reaches the run log line by line while they run, and a
command does not outlive the process that started it."""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.dvc import CommandFailed, run_command, worth_retrying


class TimedLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic(), record.getMessage()))


def timed_logger() -> tuple[logging.Logger, TimedLines]:
    logger = logging.getLogger(f"test-run-command-{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = TimedLines()
    logger.addHandler(handler)
    return logger, handler


def test_output_lines_are_logged_as_they_come_not_at_the_end(tmp_path) -> None:
    script = (
        "import sys, time\n"
        "print('first line')\n"
        "sys.stderr.write('progress 1/2\\rprogress 2/2\\r')\n"  # a progress bar's redraws
        "sys.stderr.flush()\n"
        "time.sleep(1.5)\n"
        "print('last line')\n"
    )
    logger, handler = timed_logger()
    output = run_command([sys.executable, "-c", script], str(tmp_path), logger=logger)
    ended = time.monotonic()
    logged = dict((line, at) for at, line in handler.lines)
    assert list(logged)[1:] == ["first line", "progress 1/2", "progress 2/2", "last line"]
    assert ended - logged["first line"] > 1.0  # logged while the command still ran
    assert ended - logged["progress 1/2"] > 1.0  # a redraw is logged when the next one starts
    assert output.splitlines() == ["first line", "progress 1/2", "progress 2/2", "last line"]


def test_a_failing_command_names_itself_and_its_status(tmp_path) -> None:
    logger, handler = timed_logger()
    with pytest.raises(
        CommandFailed, match=r"-c 'print\(1\); raise SystemExit\(3\)'.* exited with 3"
    ):
        run_command(
            [sys.executable, "-c", "print(1); raise SystemExit(3)"], str(tmp_path), logger=logger
        )
    assert handler.lines[-1][1] == "1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_the_command_dies_with_the_process_that_started_it(tmp_path) -> None:
    """SIGKILL of a flow-run process must not leave its stage command computing on."""
    import os
    import signal

    import psutil

    starter = (
        "import sys, logging\n"
        "from tasks.dvc import run_command\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "run_command([sys.executable, '-c', 'import time; print(\"up\", flush=True); time.sleep(60)'],"
        " '.', logger=logging.getLogger('x'))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", starter], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        children: list[psutil.Process] = []
        while not children and time.monotonic() < deadline:
            children = psutil.Process(parent.pid).children()
            time.sleep(0.1)
        assert children, "the command never started"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        if parent.poll() is None:
            parent.kill()


class FailedState:
    """A task run's final state as Prefect hands it to a retry condition."""

    def __init__(self, failure: Exception) -> None:
        self.failure = failure

    def result(self) -> None:
        raise self.failure


@pytest.mark.parametrize(("exit_status", "retried"), [(2, False), (3, True), (1, True)])
def test_a_stage_is_retried_unless_fmbseg_refused_its_input_also_under_dvc_repro(
    tmp_path, exit_status: int, retried: bool
) -> None:
    """fmbseg exits 2 for bad input or params (a retry cannot help) and 3 for a tracking
    server that does not answer (a retry can); `dvc repro` itself exits 255 either way."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    command = shlex.join([sys.executable, "-c", f"raise SystemExit({exit_status})"])
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  stage:\n    cmd: {command}\n")
    logger, _ = timed_logger()
    with pytest.raises(CommandFailed) as under_dvc:
        run_command([dvc, "repro"], str(tmp_path), logger=logger)
    assert under_dvc.value.returncode == 255 and under_dvc.value.status == exit_status
    with pytest.raises(CommandFailed) as alone:
        run_command(shlex.split(command), str(tmp_path), logger=logger)
    assert alone.value.status == exit_status
    for failure in (under_dvc.value, alone.value):
        assert worth_retrying(None, None, FailedState(failure)) is retried
