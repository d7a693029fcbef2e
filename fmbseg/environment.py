"""Quiet, offline-safe process defaults, applied by entry points (never at import).

Telemetry of every tool in the stack is off, and Prefect's home and MLflow's store live
inside the project directory (git-ignored), never in the user's home. Values the user has
already set in the environment win.

Two folders matter. The *workspace* is where a stage runs: its code, params and data, which
inside a DVC experiment is one of DVC's temporary copies of the repository. The *project* is
the repository the user works in: its MLflow store, Prefect home and run records must survive
the experiment, so they are never placed in a temporary copy.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_MARKERS = ("dvc.yaml", "params.yaml", "pyproject.toml")
# `dvc exp run --queue` / `--temp` run each experiment in <project>/.dvc/tmp/exps/<tmpdir>/.
DVC_EXPERIMENT_COPIES = (".dvc", "tmp", "exps")
SQLITE_PREFIX = "sqlite:///"


def find_workspace(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` holding a project marker, else ``start``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).is_file() for marker in PROJECT_MARKERS):
            return folder
    return here


def find_project_root(start: Path | None = None) -> Path:
    """The project that owns the workspace at ``start``: DVC's ``$DVC_ROOT`` while DVC runs a
    stage (DVC points it at the parent repository for experiments), and the repository around
    ``.dvc/tmp/exps/`` when the workspace is one of DVC's temporary experiment copies."""
    if start is None and (dvc_root := os.environ.get("DVC_ROOT")):
        workspace = Path(dvc_root).resolve()
    else:
        workspace = find_workspace(start)
    parts = workspace.parts
    size = len(DVC_EXPERIMENT_COPIES)
    for index in range(len(parts) - size, 0, -1):
        if parts[index : index + size] == DVC_EXPERIMENT_COPIES:
            return Path(*parts[:index])
    return workspace


def absolute_tracking_uri(uri: str, root: Path) -> str:
    """A relative SQLite store (``sqlite:///mlflow.db``) made absolute against the project, so
    a stage running in another folder (a DVC experiment's copy) writes to the same store."""
    if not uri.startswith(SQLITE_PREFIX):
        return uri
    path = uri.removeprefix(SQLITE_PREFIX)
    if path == ":memory:" or Path(path).is_absolute():
        return uri
    return f"{SQLITE_PREFIX}{root / path}"


def quiet_defaults(root: Path) -> dict[str, str]:
    return {
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"{SQLITE_PREFIX}{root / 'mlflow.db'}",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # A tracking server that stops answering is reported within seconds (MLflow's default
        # retries for about 4 minutes per call); see fmbseg.tracking.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    }


def apply_quiet_defaults(root: Path | None = None) -> Path:
    """Set the defaults above where unset (a relative SQLite store is taken as relative to the
    project); returns the project root used."""
    project = (root or find_project_root()).resolve()
    for key, value in quiet_defaults(project).items():
        os.environ.setdefault(key, value)
    os.environ["MLFLOW_TRACKING_URI"] = absolute_tracking_uri(
        os.environ["MLFLOW_TRACKING_URI"], project
    )
    return project
