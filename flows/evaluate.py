"""Evaluate the trained module on some or all of the configured datasets (one DVC stage each)."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import flow

from flows.common import open_project
from tasks.dvc import dvc_repro


@flow(name="fmbseg-evaluate", log_prints=True)
def evaluate(project_dir: str = ".", datasets: Sequence[str] = ()) -> None:
    root, params = open_project(project_dir)
    names = list(datasets) or list(params.data.evaluate)
    unknown = sorted(set(names) - set(params.data.evaluate))
    if unknown:
        raise ValueError(
            f"{unknown} are not in params.yaml data.evaluate {list(params.data.evaluate)}"
        )
    dvc_repro(root, [f"evaluate@{name}" for name in names])


if __name__ == "__main__":
    evaluate()
