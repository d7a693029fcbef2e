"""Prefect tasks around MLflow: the pipeline's parent run, and model promotion."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(cache_policy=NO_CACHE)
def start_pipeline_run(project_dir: str, flow_run_id: str | None) -> str:
    """Create the MLflow parent run that every stage run of this execution nests under."""
    from pathlib import Path

    import mlflow

    from fmbseg.tracking import experiment_id, git_tags

    client = mlflow.MlflowClient()
    tags = {"fmbseg.stage": "pipeline", **git_tags(Path(project_dir))}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    return client.create_run(experiment_id(client), run_name="pipeline", tags=tags).info.run_id


@task(cache_policy=NO_CACHE)
def end_pipeline_run(run_id: str, status: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status=status)


@task(cache_policy=NO_CACHE)
def promote_candidate(name: str, datasets: Sequence[str]) -> dict:
    import dataclasses

    from fmbseg.registry import promote

    return dataclasses.asdict(promote(name, list(datasets)))
