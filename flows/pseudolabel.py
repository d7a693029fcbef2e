"""Stage 1 split over GPU workers: each processes every N-th shard of the dataset into the
same resumable output folder; the result is recorded as the `pseudolabel` DVC stage's output
and merged by DVC afterwards. Every stage run nests under one MLflow parent run, tagged with
its worker.

With ``deployment`` set (e.g. ``fmbseg-pseudolabel-shard/gpu``), each worker runs as its own
flow run on that deployment's work pool (one GPU each), in the project folder on shared storage
(``$FMBSEG_PROJECT_DIR`` on the worker's machine). A run whose worker dies is noticed by its
missing heartbeat and dispatched again (``shard_retries`` times). Without ``deployment``,
workers run as concurrent local tasks.
"""

from __future__ import annotations

import socket
from pathlib import Path

from prefect import flow, runtime
from prefect.deployments import run_deployment

from flows.common import open_project
from fmbseg.tracking import ENV_PIPELINE_RUN, ENV_WORKER
from tasks.dvc import dvc_commit, dvc_repro, fmbseg_command, stage_command
from tasks.registry import end_pipeline_run, start_pipeline_run
from tasks.shard_runs import Limits, heartbeat, supervise, worker_project


@flow(name="fmbseg-pseudolabel-shard", log_prints=True)
def pseudolabel_shard(
    worker: int = 0,
    workers: int = 1,
    project_dir: str | None = None,
    expected_commit: str | None = None,
    pipeline_run_id: str | None = None,
    heartbeat_seconds: float = 30.0,
) -> None:
    """One worker: the dvc.yaml `pseudolabel` command restricted to shards worker, worker+N, ...
    in ``project_dir`` (default ``$FMBSEG_PROJECT_DIR``), which must be at ``expected_commit``."""
    with heartbeat(str(runtime.flow_run.id), heartbeat_seconds):
        root = str(worker_project(project_dir, expected_commit))
        root, _ = open_project(root)
        command = stage_command(root, "pseudolabel")
        env = {ENV_WORKER: f"{worker}/{workers}@{socket.gethostname()}"}
        if pipeline_run_id:
            env[ENV_PIPELINE_RUN] = pipeline_run_id
        fmbseg_command(root, [*command, "--worker", f"{worker}/{workers}"], env=env)


@flow(name="fmbseg-pseudolabel", log_prints=True)
def pseudolabel_sharded(
    project_dir: str = ".",
    workers: int = 2,
    deployment: str | None = None,
    merge: bool = True,
    poll_seconds: float = 10.0,
    stale_seconds: float = 180.0,
    shard_retries: int = 2,
    start_timeout_seconds: float = 86400.0,
) -> str:
    """Pseudo-label with ``workers`` shard runs; returns the MLflow parent run id.

    On a pool, a shard run with no heartbeat for ``stale_seconds`` counts as crashed and is
    dispatched again up to ``shard_retries`` times; one no worker starts within
    ``start_timeout_seconds`` fails the flow."""
    from fmbseg.tracking import git_tags

    root, _ = open_project(project_dir)
    dvc_repro(root, ["manifest"])  # the inputs exist and passed their data gate
    command = stage_command(root, "pseudolabel")
    parent = start_pipeline_run(root, runtime.flow_run.id)
    tracked = {ENV_PIPELINE_RUN: parent}
    try:
        if deployment:
            commit = git_tags(Path(root)).get("git.commit")

            def dispatch(index: int) -> object:
                parameters = {
                    "worker": index,
                    "workers": workers,
                    "expected_commit": commit,
                    "pipeline_run_id": parent,
                    "heartbeat_seconds": stale_seconds / 4,
                }
                run = run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=True)
                print(f"shard {index}/{workers}: flow run {run.name} ({run.id})")
                return run.id

            limits = Limits(stale_seconds, shard_retries, start_timeout_seconds, poll_seconds)
            supervise(dispatch, workers, limits)
        else:
            futures = [
                fmbseg_command.submit(
                    root,
                    [*command, "--worker", f"{i}/{workers}"],
                    env=tracked | {ENV_WORKER: f"{i}/{workers}@{socket.gethostname()}"},
                )
                for i in range(workers)
            ]
            for future in futures:
                future.result()
        # The whole command now finds every shard done: it only writes the summary and applies
        # the failure limit. Then DVC records the folder as the stage's output and merges it.
        fmbseg_command(root, command, env=tracked)
        dvc_commit(root, ["pseudolabel"])
        if merge:
            dvc_repro(root, ["merge"], env=tracked)
    except BaseException:
        end_pipeline_run(parent, "FAILED")
        raise
    end_pipeline_run(parent, "FINISHED")
    return parent


if __name__ == "__main__":
    pseudolabel_sharded()
