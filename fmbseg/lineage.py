"""Where a registered model came from: its version, the run that logged it, and every stage
run of the pipeline execution that produced it, with their DVC input hashes and weights.

Everything is read back from the MLflow tags that :mod:`fmbseg.tracking` and
:mod:`fmbseg.registry` write; nothing is recomputed.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fmbseg.errors import FmbsegError
from fmbseg.tracking import (
    DVC_DEP_PREFIX,
    DVC_UPSTREAM_PREFIX,
    PARENT_TAG,
    PREFECT_TAG,
    STAGE_TAG,
    WEIGHTS_PREFIX,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")
_MAX_SIBLINGS = 1000


def lineage(model_uri: str) -> dict[str, Any]:
    """The lineage of ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` as plain data
    (JSON-serialisable)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        version = _model_version(client, model_uri)
        source = client.get_run(version.run_id) if version.run_id else None
        parent_id = source.data.tags.get(PARENT_TAG) if source is not None else None
        parent = client.get_run(parent_id) if parent_id else None
        stages = _children(client, parent, source) if parent is not None else []
    except MlflowException as exc:
        raise FmbsegError(f"{model_uri}: {exc.message.strip().splitlines()[0]}") from None
    runs = [run for run in (source, parent) if run is not None]
    return {
        "model": version.name,
        "version": int(version.version),
        "aliases": sorted(version.aliases or ()),
        "version_tags": dict(sorted((version.tags or {}).items())),
        "created": _iso(version.creation_timestamp),
        "source_run": _run_record(source, full=True) if source is not None else None,
        "pipeline": _run_record(parent, full=False) if parent is not None else None,
        "stages": [_run_record(run, full=False) for run in stages],
        "prefect_flow_run_id": next(
            (run.data.tags[PREFECT_TAG] for run in runs if PREFECT_TAG in run.data.tags), None
        ),
    }


def _model_version(client: MlflowClient, model_uri: str) -> ModelVersion:
    match = _MODEL_URI.match(model_uri)
    if match is None:
        raise FmbsegError(
            f"{model_uri}: expected a registered model URI, models:/<name>/<version> or "
            "models:/<name>@<alias>"
        )
    if match["alias"]:
        return client.get_model_version_by_alias(match["name"], match["alias"])
    return client.get_model_version(match["name"], match["version"])


def _children(client: MlflowClient, parent: Run, source: Run) -> list[Run]:
    """The parent's stage runs, oldest first, wherever their experiment."""
    experiments = list(dict.fromkeys([parent.info.experiment_id, source.info.experiment_id]))
    return client.search_runs(
        experiments,
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=_MAX_SIBLINGS,
    )


def _run_record(run: Run, *, full: bool) -> dict[str, Any]:
    tags = run.data.tags
    record: dict[str, Any] = {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "stage": tags.get(STAGE_TAG),
        "status": run.info.status,
        "start": _iso(run.info.start_time),
        "end": _iso(run.info.end_time),
        "git_commit": tags.get("git.commit"),
        "git_dirty": tags.get("git.dirty"),
        "dvc_stage": tags.get("dvc.stage"),
        "dvc": {
            k.removeprefix(DVC_DEP_PREFIX): v
            for k, v in sorted(tags.items())
            if k.startswith(DVC_DEP_PREFIX)
        },
        "weights": _weights(tags),
        "upstream": {
            k.removeprefix(DVC_UPSTREAM_PREFIX): v
            for k, v in sorted(tags.items())
            if k.startswith(DVC_UPSTREAM_PREFIX)
        },
    }
    if full:
        record["params"] = dict(sorted(run.data.params.items()))
        record["metrics"] = dict(sorted(run.data.metrics.items()))
        record["tags"] = {
            k: v
            for k, v in sorted(tags.items())
            if not k.startswith(("mlflow.", DVC_UPSTREAM_PREFIX))
        }
    return record


def _weights(tags: dict[str, str]) -> dict[str, dict[str, str]]:
    """``weights.<role>`` and ``weights.<role>.model`` -> ``{role: {weights, model}}``."""
    roles: dict[str, dict[str, str]] = {}
    for key, value in sorted(tags.items()):
        if key.startswith(WEIGHTS_PREFIX):
            role, _, field = key.removeprefix(WEIGHTS_PREFIX).partition(".")
            roles.setdefault(role, {})[field or "weights"] = value
    return roles


def _iso(millis: int | None) -> str | None:
    return None if millis is None else datetime.fromtimestamp(millis / 1000, UTC).isoformat()


def format_lineage(record: dict[str, Any]) -> str:
    """A human-readable report of :func:`lineage`'s result."""
    aliases = ", ".join(f"@{alias}" for alias in record["aliases"]) or "no aliases"
    lines = [f"model {record['model']} version {record['version']} ({aliases})"]
    lines += [f"  {key}: {value}" for key, value in record["version_tags"].items()]
    source = record["source_run"]
    if source is None:
        lines.append("source run: none recorded")
    else:
        lines.append(f"source run: {_run_line(source)}")
        lines += _run_details(source, "  ")
        lines += [f"  pipeline data {path}: md5 {md5}" for path, md5 in source["upstream"].items()]
        lines += [f"  param {key} = {value}" for key, value in source["params"].items()]
        lines += [f"  metric {key} = {value:g}" for key, value in source["metrics"].items()]
    if record["prefect_flow_run_id"]:
        lines.append(f"prefect flow run: {record['prefect_flow_run_id']}")
    pipeline = record["pipeline"]
    if pipeline is None:
        lines.append("pipeline run: none (the source run ran on its own)")
        return "\n".join(lines)
    lines.append(f"pipeline run: {_run_line(pipeline)}")
    lines.append(f"stages ({len(record['stages'])}):")
    for stage in record["stages"]:
        lines.append(f"  {_run_line(stage)}")
        lines += _run_details(stage, "    ")
    return "\n".join(lines)


def _run_line(run: dict[str, Any]) -> str:
    label = run["stage"] or run["name"]
    commit = f", git {run['git_commit'][:12]}" if run["git_commit"] else ""
    dirty = " (dirty)" if run["git_dirty"] == "true" else ""
    return f"{label} [{run['status']}] run {run['run_id']}, started {run['start']}{commit}{dirty}"


def _run_details(run: dict[str, Any], indent: str) -> list[str]:
    lines = [f"{indent}input {path}: md5 {md5}" for path, md5 in run["dvc"].items()]
    for role, weights in run["weights"].items():
        model = f" ({weights['model']})" if "model" in weights else ""
        lines.append(f"{indent}weights {role}{model}: {weights.get('weights', '?')}")
    return lines
