"""Optional parts of the install and the one-line error when a command needs a missing one.

``pip install fmbseg`` is the segmenter, ``fmbseg predict`` and export. The MLOps stack comes
with ``fmbseg[pipeline]`` and the web page with ``fmbseg[demo]`` (see pyproject.toml).
"""

from __future__ import annotations

# Top-level module -> the extra that installs it.
OPTIONAL_MODULES = {
    "mlflow": "pipeline",
    "prefect": "pipeline",
    "dvc": "pipeline",
    "great_expectations": "pipeline",
    "fastapi": "demo",
    "uvicorn": "demo",
}


def missing_extra_message(error: ModuleNotFoundError, command: str) -> str | None:
    """What to install for ``command``, when ``error`` is a module of an extra; else None."""
    module = (error.name or "").split(".")[0]
    extra = OPTIONAL_MODULES.get(module)
    if extra is None:
        return None
    return (
        f"fmbseg {command} needs {module}, which is not installed; "
        f'install the {extra} extra: pip install "fmbseg[{extra}]"'
    )
