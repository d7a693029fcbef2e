"""What every flow does first: resolve the project folder and its quiet, local defaults."""

from __future__ import annotations

from pathlib import Path

from fmbseg.config import Params, load_params
from fmbseg.environment import apply_quiet_defaults


def open_project(project_dir: str) -> tuple[str, Params]:
    """The absolute project folder (with its MLflow store and Prefect home) and its params."""
    root = Path(project_dir).resolve()
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{root}: not an fmbseg project (no dvc.yaml)")
    apply_quiet_defaults(root)
    return str(root), load_params(root / "params.yaml")
