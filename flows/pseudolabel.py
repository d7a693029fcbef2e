"""Stage 1 split over GPU workers: each processes every N-th shard of the dataset into the
same resumable output folder; the result is recorded as the `pseudolabel` DVC stage's output
and merged by DVC afterwards.

With ``deployment`` set (e.g. ``fmbseg-pseudolabel-shard/gpu``), each worker runs as its own
flow run on that deployment's work pool (one GPU each); without it, workers run as concurrent
local tasks.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from flows.common import open_project
from tasks.dvc import dvc_commit, dvc_repro, fmbseg_command, stage_command


@flow(name="fmbseg-pseudolabel-shard", log_prints=True)
def pseudolabel_shard(project_dir: str = ".", worker: int = 0, workers: int = 1) -> None:
    """One worker: the dvc.yaml `pseudolabel` command restricted to shards worker, worker+N, ..."""
    root, _ = open_project(project_dir)
    command = stage_command(root, "pseudolabel")
    fmbseg_command(root, [*command, "--worker", f"{worker}/{workers}"])


def _run_on_pool(deployment: str, root: str, workers: int, poll_seconds: float) -> None:
    """Start one flow run per worker at once, then wait for all of them."""
    started = [
        run_deployment(
            deployment,
            parameters={"project_dir": root, "worker": i, "workers": workers},
            timeout=0,
            as_subflow=True,
        )
        for i in range(workers)
    ]
    with get_client(sync_client=True) as client:
        pending = {run.id for run in started}
        failed = []
        while pending:
            for run_id in list(pending):
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    pending.discard(run_id)
                    if not state.is_completed():
                        failed.append(str(run_id))
            if pending:
                time.sleep(poll_seconds)
    if failed:
        raise RuntimeError(f"pseudo-label worker flow runs did not complete: {', '.join(failed)}")


@flow(name="fmbseg-pseudolabel", log_prints=True)
def pseudolabel_sharded(
    project_dir: str = ".",
    workers: int = 2,
    deployment: str | None = None,
    merge: bool = True,
    poll_seconds: float = 10.0,
) -> None:
    root, _ = open_project(project_dir)
    dvc_repro(root, ["manifest"])  # the inputs exist and passed their data gate
    command = stage_command(root, "pseudolabel")
    if deployment:
        _run_on_pool(deployment, root, workers, poll_seconds)
    else:
        futures = [
            fmbseg_command.submit(root, [*command, "--worker", f"{i}/{workers}"])
            for i in range(workers)
        ]
        for future in futures:
            future.result()
    # The whole command now finds every shard done: it only writes the summary and applies
    # the failure limit. Then DVC records the folder as the stage's output and merges it.
    fmbseg_command(root, command)
    dvc_commit(root, ["pseudolabel"])
    if merge:
        dvc_repro(root, ["merge"])


if __name__ == "__main__":
    pseudolabel_sharded()
