"""Where a registered model came from: its version, the run that logged it, and the chain of
stage runs that produced everything it was made from (data -> pseudo-labels -> merge ->
features -> train -> evaluate -> register), across pipeline executions and DVC experiments.

Every stage run tags the DVC hash of each input when it starts and of each output once it has
written it (:mod:`fmbseg.tracking`). A consumer's input is therefore produced by the finished
run whose output tag for the same path has the same hash: following those links from the model's
run reaches every upstream stage, including stages DVC skipped in the execution that trained the
model (their outputs were unchanged) or ran in another experiment. Inputs that no recorded run
produced (downloaded or hand-made data) are listed as data. Nothing is recomputed.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fmbseg.errors import FmbsegError
from fmbseg.tracking import (
    DVC_DEP_PREFIX,
    DVC_OUT_PREFIX,
    EXP_BASELINE_TAG,
    EXP_NAME_TAG,
    EXP_PARAM_PREFIX,
    PARENT_TAG,
    PREFECT_TAG,
    STAGE_TAG,
    WEIGHTS_PREFIX,
    safe_key,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")


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
        chain, data = _chain(client, source) if source is not None else ([], {})
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
        "stages": [_run_record(run, full=True) for run in chain],
        "data": [{"path": path, "md5": md5} for path, md5 in sorted(data.items())],
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


def _chain(client: MlflowClient, source: Run) -> tuple[list[Run], dict[str, str]]:
    """The source run and every run upstream of it, oldest first, and the inputs that no
    recorded run produced (``{path: md5}``)."""
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    found = {source.info.run_id: source}
    data: dict[str, str] = {}
    pending = [source]
    while pending:
        run = pending.pop()
        for path, md5 in _prefixed(run.data.tags, DVC_DEP_PREFIX).items():
            producer = _producer(client, experiments, path, md5)
            if producer is None:
                data[path] = md5
            elif producer.info.run_id not in found:
                found[producer.info.run_id] = producer
                pending.append(producer)
    return sorted(found.values(), key=lambda run: run.info.start_time), data


def _producer(client: MlflowClient, experiments: list[str], path: str, md5: str) -> Run | None:
    """The latest finished run that wrote ``path`` with hash ``md5``."""
    key = safe_key(f"{DVC_OUT_PREFIX}{path}")
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`{key}` = '{md5}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _prefixed(tags: dict[str, str], prefix: str) -> dict[str, str]:
    return {k.removeprefix(prefix): v for k, v in sorted(tags.items()) if k.startswith(prefix)}


def _run_record(run: Run, *, full: bool) -> dict[str, Any]:
    tags = run.data.tags
    record: dict[str, Any] = {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "stage": tags.get(STAGE_TAG),
        "status": run.info.status,
        "start": _iso(run.info.start_time),
        "end": _iso(run.info.end_time),
        "pipeline_run_id": tags.get(PARENT_TAG),
        "git_commit": tags.get("git.commit"),
        "git_dirty": tags.get("git.dirty"),
        "dvc_stage": tags.get("dvc.stage"),
        "experiment": tags.get(EXP_NAME_TAG),
        "experiment_baseline": tags.get(EXP_BASELINE_TAG),
        "experiment_params": _prefixed(tags, EXP_PARAM_PREFIX),
        "inputs": _prefixed(tags, DVC_DEP_PREFIX),
        "outputs": _prefixed(tags, DVC_OUT_PREFIX),
        "weights": _weights(tags),
    }
    if full:
        record["params"] = dict(sorted(run.data.params.items()))
        record["metrics"] = dict(sorted(run.data.metrics.items()))
        record["tags"] = {k: v for k, v in sorted(tags.items()) if not k.startswith("mlflow.")}
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
    """A human-readable report of :func:`lineage`'s result (``--json`` prints all of it)."""
    aliases = ", ".join(f"@{alias}" for alias in record["aliases"]) or "no aliases"
    lines = [f"model {record['model']} version {record['version']} ({aliases})"]
    lines += [f"  {key}: {value}" for key, value in record["version_tags"].items()]
    source = record["source_run"]
    if source is None:
        lines.append("source run: none recorded")
        return "\n".join(lines)
    lines.append(f"source run: {_run_line(source)}")
    lines += [f"  metric {key} = {value:g}" for key, value in source["metrics"].items()]
    if record["prefect_flow_run_id"]:
        lines.append(f"prefect flow run: {record['prefect_flow_run_id']}")
    pipeline = record["pipeline"]
    lines.append(
        f"pipeline run: {_run_line(pipeline)}"
        if pipeline is not None
        else "pipeline run: none (the source run ran on its own)"
    )
    lines.append(f"data ({len(record['data'])}, produced by no recorded run):")
    lines += [f"  {item['path']}: md5 {item['md5']}" for item in record["data"]]
    lines.append(f"stages ({len(record['stages'])}, upstream first):")
    for stage in record["stages"]:
        lines.append(f"  {_run_line(stage)}")
        lines += _run_details(stage, "    ")
    return "\n".join(lines)


def _run_line(run: dict[str, Any]) -> str:
    label = run["stage"] or run["name"]
    commit = f", git {run['git_commit'][:12]}" if run["git_commit"] else ""
    dirty = " (dirty)" if run["git_dirty"] == "true" else ""
    experiment = f", experiment {run['experiment']}" if run.get("experiment") else ""
    return (
        f"{label} [{run['status']}] run {run['run_id']}, started {run['start']}"
        f"{commit}{dirty}{experiment}"
    )


def _run_details(run: dict[str, Any], indent: str) -> list[str]:
    lines = [f"{indent}input {path}: md5 {md5}" for path, md5 in run["inputs"].items()]
    lines += [f"{indent}output {path}: md5 {md5}" for path, md5 in run["outputs"].items()]
    for role, weights in run["weights"].items():
        model = f" ({weights['model']})" if "model" in weights else ""
        lines.append(f"{indent}weights {role}{model}: {weights.get('weights', '?')}")
    for key, value in run["experiment_params"].items():
        lines.append(f"{indent}param {key} = {value} (changed by the experiment)")
    if "params" in run:
        lines.append(f"{indent}{len(run['params'])} params logged (all of them: --json)")
    return lines
