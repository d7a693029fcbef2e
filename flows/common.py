"""What every flow does first: resolve the project folder and its quiet, local defaults."""

from __future__ import annotations

import os
from pathlib import Path

from fmbseg.config import Params, load_params
from fmbseg.environment import apply_quiet_defaults, find_project_root
from tasks.shard_runs import PROJECT_DIR_ENV


def apply_project_defaults() -> Path:
    """The quiet defaults of ``$FMBSEG_PROJECT_DIR``, else of the project around the working
    folder; run before Prefect is imported (see :mod:`flows`)."""
    configured = os.environ.get(PROJECT_DIR_ENV)
    return apply_quiet_defaults(Path(configured) if configured else find_project_root())


def enter_project_folder() -> dict[str, str]:
    """prefect.yaml's pull step: run in this worker machine's ``$FMBSEG_PROJECT_DIR``, read when
    the flow run starts. (``prefect deploy`` would fill a ``{{ $FMBSEG_PROJECT_DIR }}``
    placeholder in from the deploying shell, sending every worker to the deployer's folder.)"""
    from tasks.shard_runs import worker_project

    root = worker_project(None, None)
    os.chdir(root)
    return {"directory": str(root)}


def open_project(project_dir: str) -> tuple[str, Params]:
    """The absolute project folder (with its MLflow store and Prefect home) and its params."""
    root = Path(project_dir).resolve()
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{root}: not an fmbseg project (no dvc.yaml)")
    apply_quiet_defaults(root)
    return str(root), load_params(root / "params.yaml")
