"""The model registry: register trained models, promote by evaluation, resolve for use.

A trained model (any method's folder with a ``model.json``) is registered as a new version of
``fmbseg`` with the alias ``candidate``, its method, weight provenance and per-dataset mIoU as
version tags. The version is an MLflow "model from code" that segments images (see
:mod:`fmbseg.serving`). ``promote`` moves ``champion`` to the candidate only
when the candidate's mean mIoU over the configured datasets is strictly higher, and records the
comparison on the candidate. Aliases, not the deprecated registry stages, mark the roles, so
serving code asks for ``models:/fmbseg@champion``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from fmbseg.errors import FmbsegError, WeightsError
from fmbseg.tracking import experiment_id, safe_key

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from fmbseg.config import Params

DEFAULT_NAME = "fmbseg"
CANDIDATE = "candidate"
CHAMPION = "champion"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PACKAGE_DIR = Path(__file__).parent
# The registered model's folder: an artifact directory of the logged model.
MODEL_ARTIFACT = "model"
# Files of the training folder stored with the model, for reproduction and lineage.
RECORD_FILES = ("run.json", "metrics.json")
MIOU_PREFIX = "miou."
METHOD_TAG = "fmbseg.method"
SHA_TAG = "model.sha256"
WEIGHTS_TAG_PREFIX = "weights."
EXAMPLE_CLASSES = ("sky", "grass", "road", "building")
CACHE_ENV = "FMBSEG_CACHE_DIR"
_URI = re.compile(r"^[A-Za-z][\w+.-]+:/")


def pip_requirements() -> list[str]:
    """fmbseg's own requirements (the light install; its code travels in the model) pinned to
    the installed versions without local tags (``2.13.0+cpu`` -> ``2.13.0``), so a CUDA
    machine installs its own build of the same release."""
    from packaging.requirements import Requirement

    required = [Requirement(text) for text in metadata.requires("fmbseg") or []]
    names = sorted({item.name for item in required if item.marker is None})
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in names]


def miou_tag(dataset: str) -> str:
    return safe_key(f"{MIOU_PREFIX}{dataset}")


def evaluation_tags(evaluation: Mapping[str, float]) -> dict[str, str]:
    tags = {}
    for dataset, value in evaluation.items():
        score = float(value)
        if not math.isfinite(score):
            raise FmbsegError(f"evaluation of dataset {dataset!r}: mIoU is {value!r}")
        tags[miou_tag(dataset)] = repr(score)
    return tags


def register_module(
    train_dir: str | Path,
    *,
    params: Params,
    name: str = DEFAULT_NAME,
    evaluation: Mapping[str, float] | None = None,
    run_id: str | None = None,
) -> int:
    """Log the trained model in ``train_dir`` (any method) as an MLflow model in run ``run_id``
    (default: the active run, else a new ``register`` run), register it as a new version of
    ``name`` and point ``candidate`` at it; returns the version.

    The model is loaded once with ``params`` first: that proves it works with them and gives
    the weight provenance of every model role, stored with the ``models`` and ``inference``
    params so serving rebuilds the same models (see :mod:`fmbseg.serving`).
    """
    import mlflow

    from fmbseg.methods import MODEL_FILE, read_model_record
    from fmbseg.segmenter import load_segmenter
    from fmbseg.serving import write_serving_record

    folder = Path(train_dir)
    record = read_model_record(folder)
    files = [*record.files, MODEL_FILE, *(f for f in RECORD_FILES if (folder / f).is_file())]
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise WeightsError(f"{folder / missing[0]}: file of the trained model not found")
    provenance = load_segmenter(params, folder).scorer.provenance

    client = mlflow.MlflowClient()
    active = mlflow.active_run()
    own_run = run_id is None and active is None
    if own_run:
        run_id = client.create_run(experiment_id(client), run_name="register").info.run_id
    elif run_id is None:
        run_id = active.info.run_id
    status = "FAILED"
    try:
        with tempfile.TemporaryDirectory(prefix="fmbseg-register-") as staging:
            model_dir = Path(staging) / MODEL_ARTIFACT
            for file in files:
                (model_dir / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / file, model_dir / file)
            serving = write_serving_record(model_dir, params, provenance, files)
            tags = {
                METHOD_TAG: record.method,
                SHA_TAG: _files_digest(serving.files),
                **{WEIGHTS_TAG_PREFIX + role: tag for role, tag in serving.provenance.items()},
                **evaluation_tags(evaluation or {}),
            }
            # Created first so the model's files go to its run's experiment, whatever run is
            # active.
            logged_model = mlflow.initialize_logged_model(
                name=MODEL_ARTIFACT,
                source_run_id=run_id,
                experiment_id=client.get_run(run_id).info.experiment_id,
            )
            mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                model_id=logged_model.model_id,
                python_model=str(MODEL_CODE),
                artifacts={MODEL_ARTIFACT: str(model_dir)},
                code_paths=[str(PACKAGE_DIR)],
                pip_requirements=pip_requirements(),
                signature=serving_signature(),
                input_example=(example_request(), {"classes": list(EXAMPLE_CLASSES)}),
            )
        version = mlflow.register_model(f"models:/{logged_model.model_id}", name, tags=tags)
        status = "FINISHED"
    finally:
        if own_run:
            client.set_terminated(run_id, status)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return int(version.version)


def serving_signature():  # -> mlflow.models.ModelSignature (mlflow is imported lazily)
    """Images in a column (encoded PNG/JPEG: base64 text in JSON; in Python also (H, W, 3)
    uint8 arrays), the vocabulary and options as request params; one label map per image."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from fmbseg import serving

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, serving.IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(Array(Array(DataType.long)), serving.LABELS_COLUMN),
                ColSpec(Array(Array(DataType.float)), serving.SCORE_COLUMN, required=False),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec(serving.CLASSES_PARAM, DataType.string, [], shape=(-1,)),
                ParamSpec(serving.BACKGROUND_PARAM, DataType.string, ""),
                ParamSpec(serving.SCORE_PARAM, DataType.boolean, False),
            ]
        ),
    )


def example_request() -> pd.DataFrame:
    """One small PNG (a sky-over-grass gradient) as the logged input example."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    rows = np.linspace(0, 1, 32)[:, None, None]
    sky, grass = np.array([110, 160, 230]), np.array([70, 150, 60])
    pixels = np.where(rows < 0.5, sky, grass) * np.ones((32, 48, 1))
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def _files_digest(files: Mapping[str, str]) -> str:
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def record_evaluation(name: str, version: int, evaluation: Mapping[str, float]) -> None:
    """Add (or update) per-dataset mIoU tags on an existing version, e.g. a champion evaluated
    on a dataset added to the configuration after it was promoted."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in evaluation_tags(evaluation).items():
        client.set_model_version_tag(name, str(version), key, value)


@dataclass(frozen=True)
class PromotionResult:
    """One promotion decision; the same facts are stored as tags on the candidate version."""

    name: str
    alias: str
    candidate_version: int
    candidate_miou: float
    champion_version: int | None  # the alias holder before the decision
    champion_miou: float | None
    promoted: bool
    reason: str
    datasets: tuple[str, ...]
    decided_at: str


def promote(
    name: str = DEFAULT_NAME,
    datasets: Sequence[str] = (),
    *,
    alias_from: str = CANDIDATE,
    alias_to: str = CHAMPION,
) -> PromotionResult:
    """Move ``alias_to`` to the ``alias_from`` version if its mean mIoU over ``datasets`` is
    strictly higher than the current holder's, or nobody holds ``alias_to`` yet."""
    import mlflow

    wanted = tuple(dict.fromkeys(datasets))
    if not wanted:
        raise FmbsegError(f"promote {name}: no evaluation datasets configured")
    client = mlflow.MlflowClient()
    candidate = _version_by_alias(client, name, alias_from)
    if candidate is None:
        raise FmbsegError(f"registered model {name!r} has no version with alias {alias_from!r}")
    candidate_miou = _mean_miou(candidate, wanted, alias_from)
    champion = _version_by_alias(client, name, alias_to)
    champion_miou = None
    if champion is None:
        promoted, reason = True, f"no {alias_to} yet"
    elif champion.version == candidate.version:
        promoted, reason = False, f"already the {alias_to}"
        champion_miou = candidate_miou
    else:
        champion_miou = _mean_miou(champion, wanted, alias_to)
        promoted = candidate_miou > champion_miou
        relation = "higher than" if promoted else "not higher than"
        reason = (
            f"mean mIoU {candidate_miou:.6g} {relation} {alias_to} "
            f"version {champion.version}'s {champion_miou:.6g}"
        )
    result = PromotionResult(
        name=name,
        alias=alias_to,
        candidate_version=int(candidate.version),
        candidate_miou=candidate_miou,
        champion_version=int(champion.version) if champion is not None else None,
        champion_miou=champion_miou,
        promoted=promoted,
        reason=reason,
        datasets=wanted,
        decided_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    prefix = f"promotion.{safe_key(alias_to)}."
    record = {
        "decision": "promoted" if promoted else "rejected",
        "reason": reason,
        "datasets": ",".join(wanted),
        "candidate_miou": repr(candidate_miou),
        "champion_version": str(result.champion_version),
        "champion_miou": repr(champion_miou),
        "time": result.decided_at,
    }
    for key, value in record.items():
        client.set_model_version_tag(name, candidate.version, prefix + key, value)
    if promoted:
        client.set_registered_model_alias(name, alias_to, candidate.version)
    return result


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # A missing model is RESOURCE_DOES_NOT_EXIST; a missing alias, INVALID_PARAMETER_VALUE.
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in exc.message:
            return None
        raise


def _mean_miou(version: ModelVersion, datasets: tuple[str, ...], alias: str) -> float:
    tags = version.tags or {}
    missing = [dataset for dataset in datasets if miou_tag(dataset) not in tags]
    if missing:
        raise FmbsegError(
            f"model {version.name} version {version.version} (@{alias}) has no mIoU for "
            f"dataset(s) {', '.join(missing)}; evaluate it and record the scores "
            "(fmbseg.registry.record_evaluation) before promotion"
        )
    return statistics.fmean(float(tags[miou_tag(dataset)]) for dataset in datasets)


def cache_dir() -> Path:
    """Where registry models are kept once downloaded: ``$FMBSEG_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fmbseg`` or ``~/.cache/fmbseg``."""
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmbseg"


def resolve_model(model: str | Path) -> Path:
    """The local folder of a trained model: a folder (or a file in it) as given, or an MLflow
    URI (``models:/fmbseg@champion``, ``models:/fmbseg/3``, ``runs:/<id>/model``) downloaded
    once into :func:`cache_dir`, keyed by the registered version (or model id, or run path)
    it names, and reused by later calls."""
    from fmbseg.methods import MODEL_FILE, model_folder

    text = str(model)
    if not _URI.match(text):
        path = Path(text)
        if not path.exists():
            raise WeightsError(f"{path}: trained model not found")
        return model_folder(path)
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        key = _cache_key(text)
        target = cache_dir() / "models" / key
        if not (target / MODEL_FILE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # left by an interrupted older version
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{key}.") as staging:
                local = Path(mlflow.artifacts.download_artifacts(text, dst_path=staging))
                found = local / "artifacts" / MODEL_ARTIFACT
                if not (found / MODEL_FILE).is_file():
                    raise WeightsError(f"{text}: holds no fmbseg model ({MODEL_FILE} not found)")
                try:
                    os.replace(found, target)
                except OSError:  # another process put the same model there first
                    if not (target / MODEL_FILE).is_file():
                        raise
    except MlflowException as exc:
        reason = exc.message.strip().splitlines()[0] if exc.message.strip() else exc.error_code
        raise WeightsError(f"{text}: cannot download the model ({reason})") from None
    return target


def _cache_key(uri: str) -> str:
    """What a model URI names, independent of aliases: the store and the registered version
    (or logged model id, or run artifact path)."""
    import mlflow
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    names = (
        get_model_name_and_version(mlflow.MlflowClient(), uri)
        if uri.startswith("models:/")
        else (uri,)
    )
    names = tuple(map(str, names))
    identity = "\n".join((mlflow.get_tracking_uri(), mlflow.get_registry_uri(), *names))
    readable = re.sub(r"[^\w.-]+", "_", "-".join(names))[-60:]
    return f"{readable}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
