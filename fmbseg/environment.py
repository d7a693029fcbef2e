"""Quiet, offline-safe process defaults, applied by entry points (never at import).

Telemetry of every tool in the stack is off, and Prefect's home and MLflow's store live
inside the project directory (git-ignored), never in the user's home. Values the user has
already set in the environment win.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_MARKERS = ("dvc.yaml", "params.yaml", "pyproject.toml")


def find_project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` holding a project marker, else ``start``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).is_file() for marker in PROJECT_MARKERS):
            return folder
    return here


def quiet_defaults(root: Path) -> dict[str, str]:
    return {
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def apply_quiet_defaults(root: Path | None = None) -> Path:
    """Set the defaults above where unset; returns the project root used."""
    project = root or find_project_root()
    for key, value in quiet_defaults(project).items():
        os.environ.setdefault(key, value)
    return project
