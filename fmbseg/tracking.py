"""One MLflow run per pipeline stage, grouped under one parent run per pipeline execution.

Each stage run records what is needed to say where a result came from: the resolved params,
the git commit, the DVC experiment (name, baseline, changed params), the DVC hash of every
input and, once the stage has written them, of every output (so a consumer's input finds the
run that produced it, see :mod:`fmbseg.lineage`), the provenance of every model's weights, and
the Prefect flow run that launched it. Stage runs of one pipeline execution share a parent run:
the Prefect flow creates it and passes ``$FMBSEG_PIPELINE_RUN_ID``; under ``dvc repro`` the
first stage of a ``dvc`` process creates it and later stages of the same process find it
through a small record under ``<project>/.fmbseg/pipeline-runs/`` (git-ignored).

The store is the project's however the stage is launched (see :mod:`fmbseg.environment`):
DVC's temporary experiment copies write to their parent project's store. A tracking server
that does not answer fails the stage before it writes anything; one lost mid-stage does not
lose the stage's outputs: the stage finishes, then fails with :class:`TrackingError`.

``FMBSEG_TRACKING=0`` turns all of this into no-ops, so the library runs without MLflow.
MLflow is imported only when a run is really started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fmbseg.environment import find_project_root, find_workspace
from fmbseg.errors import FmbsegError, UnavailableError

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

logger = logging.getLogger(__name__)

# Tag names other modules (registry, lineage) read back.
STAGE_TAG = "fmbseg.stage"
PARENT_TAG = "mlflow.parentRunId"
PREFECT_TAG = "prefect.flow_run_id"
WORKER_TAG = "fmbseg.worker"
DVC_DEP_PREFIX = "dvc.dep."
DVC_OUT_PREFIX = "dvc.out."
EXP_NAME_TAG = "dvc.exp.name"
EXP_BASELINE_TAG = "dvc.exp.baseline"
EXP_PARAM_PREFIX = "dvc.exp.param."
PARAMS_FILE = "params.yaml"
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
    return _flatten(params.model_dump(mode="json"))


def provenance_tags(provenance: WeightProvenance) -> dict[str, str]:
    role = safe_key(provenance.role)
    return {
        f"{WEIGHTS_PREFIX}{role}": provenance.tag,
        f"{WEIGHTS_PREFIX}{role}.model": provenance.model,
    }


def project_root() -> Path:
    """The project whose MLflow store and run records this process uses (the parent
    repository also inside a DVC experiment's temporary copy)."""
    return find_project_root()


def workspace_root() -> Path:
    """The folder the stage runs in: its code, params and data (a DVC experiment's copy)."""
    return find_workspace()


def git_tags(root: Path) -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` of the work tree at ``root`` (inside a DVC experiment:
    its copy, whose HEAD is the experiment's baseline). Dirty means tracked files changed other
    than ``dvc.lock`` (DVC rewrites it between stages) and ``params.yaml`` (every param is
    logged, and an experiment's changes are tagged); nothing outside a git work tree."""
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
            f":(exclude){PARAMS_FILE}",
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": "true" if changes else "false"}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def experiment_tags(root: Path) -> dict[str, str]:
    """The DVC experiment this stage runs in (``dvc exp run``, queued or not): its name, its
    baseline commit and every param of ``params.yaml`` that differs from the baseline's
    (``dvc.exp.param.<key>``; ``<absent>`` for a key only one side has). Empty outside one."""
    name = os.environ.get("DVC_EXP_NAME")
    if not name:
        return {}
    tags = {EXP_NAME_TAG: name}
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if not baseline:
        return tags
    tags[EXP_BASELINE_TAG] = baseline
    try:
        before = yaml.safe_load(_git(root, "show", f"{baseline}:{PARAMS_FILE}")) or {}
    except (OSError, subprocess.SubprocessError, yaml.YAMLError):
        before = {}
    now = _flatten(_read_yaml(root / PARAMS_FILE) or {})
    before = _flatten(before)
    for key in sorted(now.keys() | before.keys()):
        if now.get(key) != before.get(key):
            tags[f"{EXP_PARAM_PREFIX}{key}"] = now.get(key, "<absent>")
    return tags


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Leaves of a params tree as ``{"train.lr": "0.05"}`` (non-strings as JSON, as -S takes)."""
    if isinstance(tree, dict) and tree:
        flat: dict[str, str] = {}
        for key, value in tree.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix[:-1]: tree if isinstance(tree, str) else json.dumps(tree, ensure_ascii=False)}


GITIGNORE = ".gitignore"


def dvc_md5(path: Path) -> str | None:
    """The hash DVC 3 records for ``path`` in ``dvc.lock`` (``hash: md5``): the md5 of a file's
    bytes; for a folder, the md5 of DVC's JSON listing of its files (sorted relative paths and
    their md5s) followed by ``.dir``. None when ``path`` does not exist. (``.dvcignore``
    patterns are not applied: the project's outputs have none.)

    One difference: a folder's ``.gitignore`` files are left out. DVC writes them beside a
    stage's file outputs after the stage has ended (``outputs/model/.gitignore`` on the first
    run in a git repository), so with them the consumer's input hash would never equal the
    output hash the producing stage recorded; a folder holding one differs from dvc.lock."""
    if path.is_file():
        return _file_md5(path)
    if not path.is_dir():
        return None
    entries = []
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = [name for name in subfolders if name not in (".git", ".hg")]
        for name in files:
            if name == GITIGNORE:
                continue
            file = Path(folder) / name
            relpath = file.relative_to(path).as_posix()
            entries.append({"md5": _file_md5(file), "relpath": relpath})
    entries.sort(key=lambda entry: entry["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_hashes(root: Path, paths: Sequence[str | Path]) -> dict[str, str]:
    """``{path relative to root: DVC md5}`` of the existing ``paths`` inside ``root``, computed
    from their content now, so they are the hashes DVC records for the same content whether or
    not ``dvc.lock`` is current; paths outside ``root`` are left out."""
    hashes = {}
    for item in paths:
        path = _relative(root, Path(item))
        if path is not None and (md5 := dvc_md5(root / path)):
            hashes[path] = md5
    return hashes


def _relative(root: Path, path: Path) -> str | None:
    """``path`` relative to ``root``, as given or with symbolic links resolved on both sides."""
    for resolve in (os.path.abspath, os.path.realpath):
        try:
            relative = Path(resolve(path)).relative_to(resolve(root)).as_posix()
        except ValueError:
            continue
        return None if relative == "." else relative
    return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
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
        base = project_root() / root  # a relative folder is the project's
    else:
        uri = mlflow.get_tracking_uri()
        if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
            return None  # a tracking server chooses
        base = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    return (base.resolve() / re.sub(r"[^\w.\-]", "_", experiment)).as_uri()


def pipeline_parent(
    client: MlflowClient, experiment: str, root: Path, tags: Mapping[str, str]
) -> PipelineParent | None:
    """The parent run of this pipeline execution, or None when the stage runs on its own; a
    parent created here for a ``dvc`` process gets ``tags`` (commit, experiment) and its record
    is kept under the project ``root``."""
    if run_id := os.environ.get(ENV_PIPELINE_RUN):
        return PipelineParent(run_id, owned=False)
    if not os.environ.get("DVC_STAGE"):
        return None
    dvc = find_dvc_ancestor()
    if dvc is None:
        return None
    return PipelineParent(_dvc_parent_run(client, experiment, root, dvc, tags), owned=True)


def _dvc_parent_run(
    client: MlflowClient,
    experiment: str,
    root: Path,
    dvc: DvcProcess,
    tags: Mapping[str, str],
) -> str:
    """Find or create the parent run of ``dvc``'s stages; concurrent stages agree because the
    record is published with an atomic no-replace link, and a loser deletes its own run."""
    import mlflow

    folder = root / PIPELINE_RECORDS
    scope = hashlib.sha256(f"{mlflow.get_tracking_uri()}\n{experiment}".encode()).hexdigest()[:8]
    record = folder / f"{dvc.key}-{scope}.json"
    if existing := _read_record(record):
        return existing
    tags = {"fmbseg.pipeline": f"dvc:{dvc.key}", **tags}
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


class TrackingError(UnavailableError):
    """The MLflow tracking server cannot record the stage's run (it does not answer)."""


def server_unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why the tracking server at ``uri`` does not answer, or None when it answers (any HTTP
    status counts) or ``uri`` is not a server (a SQLite file, ``databricks``)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except OSError as exc:
        return str(exc) or type(exc).__name__
    return None


def _unreachable_message(uri: str, reason: str) -> str:
    return (
        f"MLflow tracking server {uri} is not answering ({reason}); nothing was run. Start it, "
        "or unset MLFLOW_TRACKING_URI to track into the project's mlflow.db, or set "
        "FMBSEG_TRACKING=0 to run without tracking"
    )


def _lost_message(stage: str, run_id: str | None, uri: str, reason: str) -> str:
    return (
        f"{stage}: outputs are written, but MLflow run {run_id} could not be recorded: the "
        f"tracking server {uri} stopped answering ({reason}). Once it answers, run the stage "
        "again to record it (`dvc repro` does: DVC has not recorded the stage either)"
    )


class StageRun:
    """The stage's MLflow run; with tracking off (``run_id`` None) every call does nothing.

    When the tracking server stops answering, the first failed call is noted in ``lost`` and
    later calls do nothing: the stage goes on to write its outputs, and :func:`stage_run`
    reports the unrecorded run at the end."""

    def __init__(
        self, run_id: str | None = None, client: MlflowClient | None = None, uri: str = ""
    ) -> None:
        self.run_id = run_id
        self._client = client
        self._uri = uri
        self.lost: str | None = None

    def _send(self, call: Callable[[MlflowClient], object]) -> None:
        if self._client is None or self.lost is not None:
            return
        try:
            call(self._client)
        except Exception:
            self.lost = server_unreachable(self._uri)
            if self.lost is None:
                raise
            logger.warning(
                "MLflow tracking server %s stopped answering (%s): the stage goes on, unrecorded",
                self._uri,
                self.lost,
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(safe_key(k), float(v), now, step or 0) for k, v in metrics.items()]
        self._send(lambda client: client.log_batch(self.run_id, metrics=entries))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send(lambda client: client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._send(lambda client: client.log_artifacts(self.run_id, str(folder), artifact_path))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._client is None or not tags:
            return
        from mlflow.entities import RunTag

        entries = [RunTag(safe_key(k), _clip(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        self._send(lambda client: client.log_batch(self.run_id, tags=entries))

    def add_provenance(self, provenance: WeightProvenance) -> None:
        self.set_tags(provenance_tags(provenance))

    def log_params(self, params: Mapping[str, str]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Param

        entries = [Param(safe_key(k), _clip(str(v), MAX_PARAM_VALUE)) for k, v in params.items()]
        self._send(lambda client: client.log_batch(self.run_id, params=entries))


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    *,
    inputs: Sequence[str | Path] = (),
    outputs: Sequence[str | Path] = (),
    provenance: Sequence[WeightProvenance] = (),
) -> Iterator[StageRun]:
    """Run a stage inside its own MLflow run (the active run meanwhile, so MLflow calls made by
    the stage land in it). The DVC hashes of ``inputs`` are tagged at the start, those of
    ``outputs`` once the stage has written them. The run ends FAILED, and the exception
    propagates, if the stage raises; a tracking server that does not answer raises
    :class:`TrackingError` before the stage starts, or after it has written its outputs."""
    if not tracking_enabled():
        yield StageRun()
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    if reason := server_unreachable(uri):
        raise TrackingError(_unreachable_message(uri, reason))
    workspace = workspace_root()
    pipeline_tags = {**git_tags(workspace), **experiment_tags(workspace)}
    tags = {STAGE_TAG: stage, **pipeline_tags}
    tags.update({f"{DVC_DEP_PREFIX}{p}": md5 for p, md5 in dvc_hashes(workspace, inputs).items()})
    if dvc_stage := os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = dvc_stage
    if worker := os.environ.get(ENV_WORKER):
        tags[WORKER_TAG] = worker
    if flow_run := prefect_flow_run_id():
        tags[PREFECT_TAG] = flow_run
    for item in provenance:
        tags.update(provenance_tags(item))
    try:
        with _store_creation_lock():
            client = mlflow.MlflowClient()
            experiment = experiment_id(client)
        parent = pipeline_parent(client, experiment, project_root(), pipeline_tags)
        active = mlflow.start_run(
            experiment_id=experiment,
            run_name=stage,
            nested=True,
            parent_run_id=parent.run_id if parent else None,
            tags={safe_key(k): _clip(v, MAX_TAG_VALUE) for k, v in tags.items()},
        )
    except MlflowException:
        if reason := server_unreachable(uri):
            raise TrackingError(_unreachable_message(uri, reason)) from None
        raise
    run = StageRun(active.info.run_id, client, uri)
    status = "FAILED"
    try:
        run.log_params(flatten_params(params))
        yield run
        outs = dvc_hashes(workspace, outputs)
        run.set_tags({f"{DVC_OUT_PREFIX}{p}": md5 for p, md5 in outs.items()})
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except MlflowException:  # raised by the stage's own MLflow calls (e.g. registering)
        if reason := server_unreachable(uri):
            raise TrackingError(_lost_message(stage, run.run_id, uri, reason)) from None
        raise
    finally:
        try:
            mlflow.end_run(status)  # leaves the active run even when the server is gone
            if parent is not None and parent.owned and run.lost is None:
                _close_parent(client, parent.run_id, status)
        except MlflowException:
            if run.lost is None and server_unreachable(uri) is None:
                raise
    if run.lost is not None:
        raise TrackingError(_lost_message(stage, run.run_id, uri, run.lost))
