"""Two runs at once: a second ``dvc repro`` is refused by DVC's own lock and corrupts nothing;
two stages logging to one MLflow SQLite store at the same moment both succeed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from reliability_support import subprocess_env

Outcome = Callable[..., None]
BIN = Path(sys.executable).parent

SLOW_STAGE = """\
stages:
  slow:
    cmd: echo run >> runs.log && touch started && sleep 3 && echo done > out.txt
    outs:
      - out.txt
"""


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dvc"), *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True
    )


def test_a_second_dvc_repro_is_refused_while_one_runs_and_corrupts_nothing(
    tmp_path: Path, outcome: Outcome
) -> None:
    assert dvc("init", "--no-scm", "-q", cwd=tmp_path).returncode == 0
    assert dvc("config", "core.analytics", "false", cwd=tmp_path).returncode == 0
    (tmp_path / "dvc.yaml").write_text(SLOW_STAGE, encoding="utf-8")
    first = subprocess.Popen(
        [str(BIN / "dvc"), "repro"],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.01)

    second = dvc("repro", cwd=tmp_path)
    assert first.poll() is None, "the second repro was answered while the first still ran"
    assert first.wait(timeout=60) == 0, first.communicate()[0]

    message = second.stderr.strip().splitlines()[0]
    assert second.returncode != 0
    assert message.startswith("ERROR: failed to reproduce 'slow'") and "is busy" in message
    assert (tmp_path / "runs.log").read_text() == "run\n", "the stage ran once"
    assert (tmp_path / "out.txt").read_text() == "done\n"
    status = dvc("status", cwd=tmp_path)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    outcome(
        "concurrency",
        "a second `dvc repro` while the first runs its stage",
        "dvc repro",
        code=second.returncode,
        message=message,
        left="the first run's out.txt, whole; dvc status: up to date; the stage ran once",
    )


STAGE = """
import sys, time
from pathlib import Path
import mlflow
from fmbseg.config import Params
from fmbseg.tracking import stage_run

Path(f"ready-{sys.argv[1]}").touch()  # imports done: wait for the other process
while len(list(Path().glob("ready-*"))) < 2:
    time.sleep(0.001)
with stage_run(sys.argv[1], Params()) as run:
    for step in range(20):
        run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
print(run.run_id)
"""


def two_stages_at_once(store: Path, cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Two processes whose stage runs start in the same instant, after their imports."""
    environment = subprocess_env() | {
        "FMBSEG_TRACKING": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
    }
    for name in ("FMBSEG_PIPELINE_RUN_ID", "DVC_STAGE", "MLFLOW_RUN_ID"):
        environment.pop(name, None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", STAGE, stage],
            cwd=cwd,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stage in ("merge", "evaluate")
    ]
    return [
        subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate())
        for p in processes
    ]


def logged_runs(store: Path) -> dict[str, int]:
    """Each stage run's name and its number of logged loss values."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("fmbseg")
    return {
        run.info.run_name: len(client.get_metric_history(run.info.run_id, "loss"))
        for run in client.search_runs([experiment.experiment_id])
        if run.info.status == "FINISHED"
    }


def test_two_stages_log_to_one_existing_sqlite_store_at_once(
    tmp_path: Path, outcome: Outcome
) -> None:
    import mlflow

    store = tmp_path / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{store}").search_experiments()  # the store exists
    done = two_stages_at_once(store, tmp_path)
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
    assert logged_runs(store) == {"merge": 20, "evaluate": 20}
    outcome(
        "concurrency",
        "two stages logging to one existing MLflow SQLite store at once",
        "fmbseg.tracking.stage_run in two processes",
        code="0, 0",
        message="",
        left="two FINISHED runs, 20 metric values each",
    )


def test_two_stages_log_to_one_new_sqlite_store_at_once(tmp_path: Path, outcome: Outcome) -> None:
    store = tmp_path / "mlflow.db"
    done = two_stages_at_once(store, tmp_path)
    errors = [
        next(line for line in reversed(d.stderr.splitlines()) if "Error" in line)
        for d in done
        if d.returncode
    ]
    finished = logged_runs(store)
    outcome(
        "concurrency",
        "two stages creating and logging to one new MLflow SQLite store at once",
        "fmbseg.tracking.stage_run in two processes",
        code=", ".join(str(d.returncode) for d in done),
        message="; ".join(errors),
        left=f"{len(finished)} FINISHED run(s)",
    )
    assert [d.returncode for d in done] == [0, 0]
    assert finished == {"merge": 20, "evaluate": 20}
