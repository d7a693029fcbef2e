"""The sharded pseudo-labelling flow against real Prefect workers: a `prefect server` on
127.0.0.1 and `prefect worker start --type process` processes started here, the shard
deployment created by `prefect deploy` from this repository's prefect.yaml, oracle backends.

A worker SIGKILLed together with its flow-run process mid-shard: the shard is noticed by its
silent heartbeat, marked crashed, redone by another worker, and the flow completes; with no
re-dispatch left the flow fails naming the shard; a worker that cannot see the project folder
fails at once, naming it.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from tests.flows.conftest import BIN, prefect
from tests.flows.test_flows import ORACLE, deep_update

REPO = Path(__file__).resolve().parents[2]
POOL = "gpu"
DEPLOYMENT = "fmbseg-pseudolabel-shard/gpu"
IMAGES = 5  # demo_train
# Silent for 20 s counts as crashed: above a flow-run process's start-up on a loaded 2-core box.
FAST = {"poll_seconds": 0.5, "stale_seconds": 20.0, "merge": False}

pytestmark = pytest.mark.slow


def test_the_quickstart_gives_every_worker_of_the_shipped_deployment_work() -> None:
    from fmbseg.demo import TRAIN_PHOTOS

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    (sharded,) = [d for d in deployments if d["entrypoint"].endswith("pseudolabel_sharded")]
    shards = math.ceil(len(TRAIN_PHOTOS) / params["pseudolabel"]["images_per_shard"])
    assert shards >= max(2, sharded["parameters"]["workers"])


def git(root: Path, *argv: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This repository's dvc.yaml and params.yaml with oracle backends and one image per shard,
    committed in a new git repo."""
    root = tmp_path_factory.mktemp("sharded")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    tiny = deep_update(ORACLE, {"pseudolabel": {"images_per_shard": 1, "points_per_class": 3}})
    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), tiny)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "init", "-q")
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True)
    subprocess.run([str(BIN / "dvc"), "config", "core.analytics", "false"], cwd=root, check=True)
    git(root, "add", ".")
    git(root, "commit", "-qm", "project")
    return root


@pytest.fixture(scope="module")
def server(
    prefect_server: dict[str, str], project: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The shared Prefect server with the shard deployment; the environment that flows and
    workers of these tests share (tracking into the project's store)."""
    env = prefect_server | {
        "FMBSEG_TRACKING": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }
    # The shard deployment exactly as prefect.yaml declares it (its own file: deploying the
    # others would only cost time here).
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    config["deployments"] = [
        d for d in config["deployments"] if d["entrypoint"].endswith("pseudolabel_shard")
    ]
    folder = tmp_path_factory.mktemp("shard-deployment")
    (folder / "prefect.yaml").write_text(yaml.safe_dump(config))
    prefect("--no-prompt", "deploy", "--all", env=env, cwd=folder)
    return env


@contextlib.contextmanager
def workers(env: dict[str, str], count: int, **extra: str) -> Iterator[list[subprocess.Popen]]:
    """``count`` process workers on the pool, one job each (one GPU each); stopped with SIGINT
    (they ignore SIGTERM)."""
    started = [
        subprocess.Popen(
            [
                str(BIN / "prefect"),
                "worker",
                "start",
                "--pool",
                POOL,
                "--type",
                "process",
                "--limit",
                "1",
                "--name",
                f"worker-{i}-{time.monotonic_ns()}",
            ],
            env=env | extra,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(count)
    ]
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def start_flow(env: dict[str, str], project: Path, **parameters: object) -> subprocess.Popen:
    """The dispatching flow in its own process, as a user starts it."""
    call = f"pseudolabel_sharded(project_dir={str(project)!r}, deployment={DEPLOYMENT!r}, **{parameters!r})"
    return subprocess.Popen(
        [sys.executable, "-c", f"from flows.pseudolabel import pseudolabel_sharded\n{call}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_a_worker_mid_shard(started: list[subprocess.Popen], flow: subprocess.Popen) -> None:
    """SIGKILL the first worker whose flow run is computing, and that flow-run process; its
    stage command must die with it."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and flow.poll() is None:
        for worker in started:
            for child in psutil.Process(worker.pid).children():
                commands = [p for p in child.children() if "--worker" in p.cmdline()]
                if commands:
                    worker.kill()
                    child.kill()
                    _, alive = psutil.wait_procs(commands, timeout=15)
                    assert not alive, "the stage command outlived its flow-run process"
                    return
        time.sleep(0.2)
    pytest.fail("no worker started computing a shard")


def finish(flow: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    output, _ = flow.communicate(timeout=timeout)
    return flow.returncode, output


def shard_runs(env: dict[str, str]) -> list:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.sorting import FlowRunSort

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            sort=FlowRunSort.START_TIME_ASC,
        )


def test_a_killed_worker_s_shard_is_redone_by_another_worker(server, project: Path) -> None:
    with workers(server, 3, FMBSEG_PROJECT_DIR=str(project)) as started:  # one spare
        flow = start_flow(server, project, workers=2, shard_retries=1, **FAST)
        kill_a_worker_mid_shard(started, flow)
        code, output = finish(flow)
    assert code == 0, output[-3000:]
    summary = yaml.safe_load((project / "outputs" / "pseudolabels" / "summary.json").read_text())
    assert summary["shards_done"] == summary["shards"] == IMAGES

    runs = shard_runs(server)
    by_shard: dict[int, list[str]] = {}
    for run in runs:
        by_shard.setdefault(run.parameters["worker"], []).append(run.state.type.value)
    assert sorted(by_shard.values()) == [["COMPLETED"], ["CRASHED", "COMPLETED"]], by_shard
    crashed = next(run for run in runs if run.state.is_crashed())
    assert "no heartbeat for 20 s" in crashed.state.message

    import mlflow

    client = mlflow.MlflowClient(server["MLFLOW_TRACKING_URI"])
    stage_runs = client.search_runs(
        [client.get_experiment_by_name("fmbseg").experiment_id],
        filter_string="tags.`fmbseg.stage` = 'pseudolabel' and attributes.status = 'FINISHED'",
    )
    parents = {run.data.tags.get("mlflow.parentRunId") for run in stage_runs}
    assert len(parents) == 1 and None not in parents
    host = socket.gethostname()
    workers_tagged = sorted(run.data.tags.get("fmbseg.worker", "") for run in stage_runs)
    assert workers_tagged == ["", f"0/2@{host}", f"1/2@{host}"]  # "": the closing whole run
    assert client.get_run(parents.pop()).info.status == "FINISHED"

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    completed = [run.id for run in runs if run.state.is_completed()]
    with SyncPrefectClient(server["PREFECT_API_URL"]) as api:
        logs = api.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=completed)))
    assert any("pseudo-label" in log.message and "img" in log.message for log in logs)


def fresh_output(project: Path) -> None:
    shutil.rmtree(project / "outputs" / "pseudolabels", ignore_errors=True)


def test_a_shard_that_keeps_crashing_fails_the_flow_naming_it(server, project: Path) -> None:
    fresh_output(project)
    with workers(server, 1, FMBSEG_PROJECT_DIR=str(project)) as started:
        flow = start_flow(server, project, workers=1, shard_retries=0, **FAST)
        kill_a_worker_mid_shard(started, flow)
        code, output = finish(flow)
    assert code != 0
    assert (
        "ShardRunsFailed: pseudo-label shard 0/1 crashed 1 times, last silent: no heartbeat"
        in output
    )
    assert "gave up after shard_retries=0" in output


def test_a_worker_that_cannot_see_the_project_folder_fails_at_once(server, project) -> None:
    fresh_output(project)
    with workers(server, 1):  # no $FMBSEG_PROJECT_DIR
        code, output = finish(start_flow(server, project, workers=1, **FAST))
    assert code != 0
    assert (
        "ShardRunsFailed: pseudo-label shard 0/1 failed (flow run" in output
        and "ConfigError: $FMBSEG_PROJECT_DIR is not set on this worker" in output
    ), output[-3000:]
    assert not (project / "outputs" / "pseudolabels" / "shards").exists()
