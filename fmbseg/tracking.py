"""One MLflow run per pipeline stage, grouped under one parent run per pipeline execution.

Each stage run records what is needed to say where a result came from: the resolved params,
the git commit, the DVC hash of every input, the provenance of every model's weights, and the
Prefect flow run that launched it. Stage runs of one pipeline execution share a parent run:
the Prefect flow creates it and passes ``$FMBSEG_PIPELINE_RUN_ID``; under ``dvc repro`` the
first stage of a ``dvc`` process creates it and later stages of the same process find it
through a small record under ``<project>/.fmbseg/pipeline-runs/`` (git-ignored).

``FMBSEG_TRACKING=0`` turns all of this into no-ops, so the library runs without MLflow.
MLflow is imported only when a run is really started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml

from fmbseg.environment import find_project_root
from fmbseg.errors import FmbsegError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from fmbseg.config import Params
    from fmbseg.models.base import WeightProvenance

ENV_TRACKING = "FMBSEG_TRACKING"
ENV_EXPERIMENT = "FMBSEG_EXPERIMENT"
ENV_PIPELINE_RUN = "FMBSEG_PIPELINE_RUN_ID"
ENV_ARTIFACT_ROOT = "FMBSEG_ARTIFACT_ROOT"
ENV_WORKER = "FMBSEG_WORKER"  # set by the sharded Prefect flow: which worker ran the stage
DEFAULT_EXPERIMENT = "fmbseg"
PIPELINE_RUN_NAME = "pipeline"
PIPELINE_RECORDS = Path(".fmbseg") / "pipeline-runs"

# Tag names other modules (registry, lineage) read back.
STAGE_TAG = "fmbseg.stage"
PARENT_TAG = "mlflow.parentRunId"
PREFECT_TAG = "prefect.flow_run_id"
WORKER_TAG = "fmbseg.worker"
DVC_DEP_PREFIX = "dvc.dep."
# Every stage output recorded in dvc.lock when the stage started: the upstream data a model came
# from (images, pseudo-labels, features), also when DVC skipped those stages in this execution.
DVC_UPSTREAM_PREFIX = "dvc.lock."
WEIGHTS_PREFIX = "weights."

# MLflow's limits (mlflow.utils.validation); kept here so this module imports without MLflow.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
_TRUNCATED = "...[truncated]"


def tracking_enabled() -> bool:
    """False when ``$FMBSEG_TRACKING`` is 0/false/no/off."""
    return os.environ.get(ENV_TRACKING, "1").strip().lower() not in {"0", "false", "no", "off"}


def safe_key(name: str) -> str:
    """A metric/param/tag name MLflow accepts on every OS: ``miou@voc`` -> ``miou_at_voc``."""
    key = re.sub(r"[^\w./\- ]", "_", name.replace("@", "_at_"))
    key = "/".join(part for part in key.split("/") if part not in ("", ".", ".."))
    return key[:MAX_KEY] or "_"


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(_TRUNCATED)] + _TRUNCATED


def flatten_params(params: Params) -> dict[str, str]:
    """``{"models.clip.model": "ViT-B-16", ...}``; non-strings as JSON, so ``-S key=value``
    accepts them back. (:meth:`StageRun.log_params` fits them to MLflow's limits.)"""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        else:
            flat[prefix] = (
                value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            )

    walk("", params.model_dump(mode="json"))
    return flat


def provenance_tags(provenance: WeightProvenance) -> dict[str, str]:
    role = safe_key(provenance.role)
    return {
        f"{WEIGHTS_PREFIX}{role}": provenance.tag,
        f"{WEIGHTS_PREFIX}{role}.model": provenance.model,
    }


def project_root() -> Path:
    """DVC's repository root while DVC runs a stage, else the nearest project folder."""
    dvc_root = os.environ.get("DVC_ROOT")
    return Path(dvc_root) if dvc_root else find_project_root()


def git_tags(root: Path) -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` (tracked files changed; ``dvc.lock`` excluded, since
    ``dvc repro`` rewrites it between stages); nothing outside a git work tree."""
    try:
        commit = _git(root, "rev-parse", "HEAD")
        changes = _git(
            root,
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude,glob)**/dvc.lock",
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": "true" if changes else "false"}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def dvc_hashes(root: Path, inputs: Sequence[str | Path]) -> dict[str, str]:
    """``{recorded path relative to root: md5}`` for the inputs DVC has recorded; an input
    inside a tracked folder (``data/voc/images/train``) gets the folder's entry (``data/voc``).

    Preference at each level: a stage's ``outs`` in ``dvc.lock`` (written as soon as the
    producing stage ends), then a ``<path>.dvc`` file, then a ``deps`` entry (which describes
    the consuming stage's previous run). Inputs DVC does not know are left out.
    """
    outs, deps = _lock_entries(root / "dvc.lock")
    hashes = {}
    for item in inputs:
        path = _relative(root, Path(item))
        if path is None:
            continue
        levels = [path, *(str(folder) for folder in PurePosixPath(path).parents)][:-1]
        for level in levels:
            md5 = outs.get(level) or _dvcfile_hash(root, level) or deps.get(level)
            if md5:
                hashes[level] = md5
                break
    return hashes


def _relative(root: Path, path: Path) -> str | None:
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _lock_entries(lock: Path) -> tuple[dict[str, str], dict[str, str]]:
    data = _read_yaml(lock)
    stages = data.get("stages") if isinstance(data, dict) else None
    outs: dict[str, str] = {}
    deps: dict[str, str] = {}
    for stage in (stages or {}).values():
        for kind, table in (("outs", outs), ("deps", deps)):
            for entry in stage.get(kind) or ():
                if isinstance(entry, dict) and entry.get("path") and entry.get("md5"):
                    table.setdefault(posixpath.normpath(entry["path"]), str(entry["md5"]))
    return outs, deps


def _dvcfile_hash(root: Path, path: str) -> str | None:
    data = _read_yaml(root / f"{path}.dvc")
    entries = data.get("outs") if isinstance(data, dict) else None
    for entry in entries or ():
        if isinstance(entry, dict) and entry.get("path") == posixpath.basename(path):
            return str(entry["md5"]) if entry.get("md5") else None
    return None


def prefect_flow_run_id() -> str | None:
    """The enclosing Prefect flow run; Prefect is asked only if something already imported it."""
    if "prefect" in sys.modules:
        from prefect.runtime import flow_run

        return flow_run.id
    return os.environ.get("PREFECT__FLOW_RUN_ID") or None


@dataclass(frozen=True)
class DvcProcess:
    """A running ``dvc`` process; (pid, create time) names it even after pid reuse."""

    pid: int
    create_time: float

    @property
    def key(self) -> str:
        return f"{self.pid}-{round(self.create_time * 1000)}"

    def is_alive(self) -> bool:
        import psutil

        try:
            return self.key == DvcProcess(self.pid, psutil.Process(self.pid).create_time()).key
        except psutil.Error:
            return False


def find_dvc_ancestor() -> DvcProcess | None:
    """The nearest ancestor process that is ``dvc`` (the script, ``dvc.exe`` or ``-m dvc``)."""
    import psutil

    for process in psutil.Process().parents():
        try:
            command = process.cmdline()
            names = {process.name().lower(), *(Path(part).name.lower() for part in command[:2])}
            if names & {"dvc", "dvc.exe"} or command[1:3] == ["-m", "dvc"]:
                return DvcProcess(process.pid, process.create_time())
        except psutil.Error:
            continue
    return None


@dataclass(frozen=True)
class PipelineParent:
    run_id: str
    owned: bool  # created here for a dvc process, so stage outcomes set its status


@contextlib.contextmanager
def _store_creation_lock() -> Iterator[None]:
    """Serialise the first use of a SQLite store: two processes creating its tables at once
    make one fail (e.g. sharded workers starting on a fresh project)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("sqlite:///"):
        yield
        return
    from fmbseg.io.runs import output_lock

    with output_lock(Path(uri.removeprefix("sqlite:///"))):
        yield


def experiment_id(client: MlflowClient) -> str:
    """The ``$FMBSEG_EXPERIMENT`` (default ``fmbseg``) experiment, created on first use with
    its artifacts beside a SQLite tracking database (``mlartifacts/``), not in ``./mlruns``."""
    from mlflow.exceptions import MlflowException

    name = os.environ.get(ENV_EXPERIMENT) or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(name))
        except MlflowException:  # created meanwhile by a concurrent stage
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise FmbsegError(
            f"MLflow experiment {name!r} is deleted: restore it or set ${ENV_EXPERIMENT}"
        )
    return experiment.experiment_id


def _artifact_location(experiment: str) -> str | None:
    import mlflow

    if root := os.environ.get(ENV_ARTIFACT_ROOT):
        base = Path(root)
    else:
        uri = mlflow.get_tracking_uri()
        if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
            return None  # a tracking server chooses
        base = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    return (base.resolve() / re.sub(r"[^\w.\-]", "_", experiment)).as_uri()


def pipeline_parent(client: MlflowClient, experiment: str, root: Path) -> PipelineParent | None:
    """The parent run of this pipeline execution, or None when the stage runs on its own."""
    if run_id := os.environ.get(ENV_PIPELINE_RUN):
        return PipelineParent(run_id, owned=False)
    if not os.environ.get("DVC_STAGE"):
        return None
    dvc = find_dvc_ancestor()
    if dvc is None:
        return None
    return PipelineParent(_dvc_parent_run(client, experiment, root, dvc), owned=True)


def _dvc_parent_run(client: MlflowClient, experiment: str, root: Path, dvc: DvcProcess) -> str:
    """Find or create the parent run of ``dvc``'s stages; concurrent stages agree because the
    record is published with an atomic no-replace link, and a loser deletes its own run."""
    import mlflow

    folder = root / PIPELINE_RECORDS
    scope = hashlib.sha256(f"{mlflow.get_tracking_uri()}\n{experiment}".encode()).hexdigest()[:8]
    record = folder / f"{dvc.key}-{scope}.json"
    if existing := _read_record(record):
        return existing
    tags = {"fmbseg.pipeline": f"dvc:{dvc.key}", **git_tags(root)}
    run_id = client.create_run(experiment, tags=tags, run_name=PIPELINE_RUN_NAME).info.run_id
    content = {"run_id": run_id, "pid": dvc.pid, "create_time": dvc.create_time}
    if _publish(record, json.dumps(content)):
        _prune_records(folder, keep=record)
        return run_id
    client.delete_run(run_id)
    winner = _read_record(record)
    if winner is None:
        raise FmbsegError(f"{record}: unreadable pipeline-run record; delete it and rerun")
    return winner


def _read_record(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _publish(path: Path, text: str) -> bool:
    """Write ``path`` whole unless it exists; False when another process got there first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _prune_records(folder: Path, keep: Path) -> None:
    """Forget records of dvc processes that have ended (their parent runs stay in MLflow)."""
    for record in folder.glob("*.json"):
        pid, _, millis = record.stem.partition("-")
        millis = millis.partition("-")[0]
        if record == keep or not (pid.isdigit() and millis.isdigit()):
            continue
        if not DvcProcess(int(pid), int(millis) / 1000).is_alive():
            record.unlink(missing_ok=True)


def _close_parent(client: MlflowClient, run_id: str, status: str) -> None:
    """The pipeline's status after its latest stage; a failed or killed stage is never
    overwritten by a later success."""
    current = client.get_run(run_id).info.status
    if status == "FINISHED" and current in ("FAILED", "KILLED"):
        status = current
    client.set_terminated(run_id, status)


class StageRun:
    """The stage's MLflow run; with tracking off (``run_id`` None) every call does nothing."""

    def __init__(self, run_id: str | None = None, client: MlflowClient | None = None) -> None:
        self.run_id = run_id
        self._client = client

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(safe_key(k), float(v), now, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=entries)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client is not None:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if self._client is not None:
            self._client.log_artifacts(self.run_id, str(folder), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._client is None or not tags:
            return
        from mlflow.entities import RunTag

        entries = [RunTag(safe_key(k), _clip(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        self._client.log_batch(self.run_id, tags=entries)

    def add_provenance(self, provenance: WeightProvenance) -> None:
        self.set_tags(provenance_tags(provenance))

    def log_params(self, params: Mapping[str, str]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Param

        entries = [Param(safe_key(k), _clip(str(v), MAX_PARAM_VALUE)) for k, v in params.items()]
        self._client.log_batch(self.run_id, params=entries)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    *,
    inputs: Sequence[str | Path] = (),
    provenance: Sequence[WeightProvenance] = (),
) -> Iterator[StageRun]:
    """Run a stage inside its own MLflow run (the active run meanwhile, so MLflow calls made by
    the stage land in it); the run ends FAILED, and the exception propagates, if the stage
    raises."""
    if not tracking_enabled():
        yield StageRun()
        return
    import mlflow

    root = project_root()
    with _store_creation_lock():
        client = mlflow.MlflowClient()
        experiment = experiment_id(client)
    parent = pipeline_parent(client, experiment, root)
    tags = {STAGE_TAG: stage, **git_tags(root)}
    tags.update({f"{DVC_DEP_PREFIX}{p}": md5 for p, md5 in dvc_hashes(root, inputs).items()})
    upstream = _lock_entries(root / "dvc.lock")[0]
    tags.update({f"{DVC_UPSTREAM_PREFIX}{p}": md5 for p, md5 in upstream.items()})
    if dvc_stage := os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = dvc_stage
    if worker := os.environ.get(ENV_WORKER):
        tags[WORKER_TAG] = worker
    if flow_run := prefect_flow_run_id():
        tags[PREFECT_TAG] = flow_run
    for item in provenance:
        tags.update(provenance_tags(item))
    active = mlflow.start_run(
        experiment_id=experiment,
        run_name=stage,
        nested=True,
        parent_run_id=parent.run_id if parent else None,
        tags={safe_key(k): _clip(v, MAX_TAG_VALUE) for k, v in tags.items()},
    )
    run = StageRun(active.info.run_id, client)
    status = "FAILED"
    try:
        run.log_params(flatten_params(params))
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
        if parent is not None and parent.owned:
            _close_parent(client, parent.run_id, status)
