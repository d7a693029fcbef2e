"""The end-to-end flow: `dvc repro` under one MLflow parent run, then champion promotion."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import flow, runtime

from flows.common import open_project
from tasks.dvc import dvc_repro
from tasks.registry import end_pipeline_run, promote_candidate, start_pipeline_run


@flow(name="fmbseg-pipeline", log_prints=True)
def pipeline(
    project_dir: str = ".",
    targets: Sequence[str] = (),
    promote: bool = True,
    model_name: str = "fmbseg",
) -> dict:
    """Reproduce the DVC pipeline (or ``targets``); every stage's MLflow run nests under one
    parent run tagged with this flow run; then promote the candidate if it beats the champion."""
    root, params = open_project(project_dir)
    parent = start_pipeline_run(root, runtime.flow_run.id)
    try:
        dvc_repro(root, list(targets), env={"FMBSEG_PIPELINE_RUN_ID": parent})
    except BaseException:
        end_pipeline_run(parent, "FAILED")
        raise
    end_pipeline_run(parent, "FINISHED")
    result = {"pipeline_run_id": parent}
    if promote:
        result["promotion"] = promote_candidate(model_name, params.data.evaluate)
    return result


if __name__ == "__main__":
    pipeline()
