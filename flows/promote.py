"""Move the `champion` alias to the `candidate` version when its mean mIoU is strictly better."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import flow

from flows.common import open_project
from tasks.registry import promote_candidate


@flow(name="fmbseg-promote", log_prints=True)
def promote(
    project_dir: str = ".", model_name: str = "fmbseg", datasets: Sequence[str] = ()
) -> dict:
    _, params = open_project(project_dir)
    result = promote_candidate(model_name, list(datasets) or list(params.data.evaluate))
    print(f"promoted: {result['promoted']} ({result['reason']})")
    return result


if __name__ == "__main__":
    promote()
