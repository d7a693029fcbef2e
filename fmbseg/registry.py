"""The model registry: register trained modules, promote by evaluation, resolve for use.

A trained module is registered as a new version of ``fmbseg`` with the alias ``candidate``
and its per-dataset mIoU as version tags. ``promote`` moves ``champion`` to the candidate only
when the candidate's mean mIoU over the configured datasets is strictly higher, and records the
comparison on the candidate. Aliases, not the deprecated registry stages, mark the roles, so
serving code asks for ``models:/fmbseg@champion``.
"""

from __future__ import annotations

import math
import re
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
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

DEFAULT_NAME = "fmbseg"
CANDIDATE = "candidate"
CHAMPION = "champion"
MODULE_FILE = "module.safetensors"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PACKAGE_DIR = Path(__file__).parent
# What the model-from-code needs besides fmbseg itself, which travels in the model's code/.
REQUIREMENTS = ("torch", "safetensors", "numpy")
# Files of the training folder stored with the weights, for reproduction and lineage.
RECORD_FILES = ("run.json", "metrics.json")
MIOU_PREFIX = "miou."
SHA_TAG = "module.sha256"
_URI = re.compile(r"^[A-Za-z][\w+.-]+:/")


def pip_requirements() -> list[str]:
    """Pins of the installed versions, without local tags (``2.13.0+cpu`` -> ``2.13.0``), so
    a CUDA machine installs its own build of the same release."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


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
    name: str = DEFAULT_NAME,
    evaluation: Mapping[str, float] | None = None,
    run_id: str | None = None,
) -> int:
    """Log ``train_dir``'s module as an MLflow model in run ``run_id`` (default: the active
    run, else a new ``register`` run), register it as a new version of ``name`` tagged with
    its sha256 and per-dataset mIoU, and point ``candidate`` at it; returns the version."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from fmbseg.align.module import architecture_path, read_module_info

    folder = Path(train_dir)
    weights = folder / MODULE_FILE
    info = read_module_info(weights)
    if not weights.is_file():
        raise WeightsError(f"{weights}: alignment module weights not found")
    artifacts = {"module": weights, "module_info": architecture_path(weights)}
    if info.text_embeddings is not None:
        artifacts["text_embeddings"] = folder / info.text_embeddings
    artifacts.update({file: folder / file for file in RECORD_FILES if (folder / file).is_file()})
    missing = [str(path) for path in artifacts.values() if not path.is_file()]
    if missing:
        raise WeightsError(f"{missing[0]}: file of the trained module in {folder} not found")
    tags = {SHA_TAG: info.weights_sha256, "module.encoder": info.encoder}
    tags.update(evaluation_tags(evaluation or {}))
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, info.spec.in_dim))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, info.spec.text_dim))]),
    )

    client = mlflow.MlflowClient()
    active = mlflow.active_run()
    own_run = run_id is None and active is None
    if own_run:
        run_id = client.create_run(experiment_id(client), run_name="register").info.run_id
    elif run_id is None:
        run_id = active.info.run_id
    status = "FAILED"
    try:
        # Created first so the model's files go to its run's experiment, whatever run is active.
        logged_model = mlflow.initialize_logged_model(
            name="module",
            source_run_id=run_id,
            experiment_id=client.get_run(run_id).info.experiment_id,
        )
        mlflow.pyfunc.log_model(
            name="module",
            model_id=logged_model.model_id,
            python_model=str(MODEL_CODE),
            artifacts={key: str(path) for key, path in artifacts.items()},
            code_paths=[str(PACKAGE_DIR)],
            pip_requirements=pip_requirements(),
            signature=signature,
            input_example=np.zeros((1, 1, info.spec.in_dim), np.float32),
        )
        version = mlflow.register_model(f"models:/{logged_model.model_id}", name, tags=tags)
        status = "FINISHED"
    finally:
        if own_run:
            client.set_terminated(run_id, status)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return int(version.version)


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


def resolve_module(model: str | Path, *, dst_dir: str | Path | None = None) -> Path:
    """The local ``module.safetensors`` of ``model``: a path to that file or to a folder
    holding it, or an MLflow URI (``models:/fmbseg@champion``, ``models:/fmbseg/3``,
    ``runs:/<id>/<path>``) downloaded into ``dst_dir`` (default: a new temporary folder)."""
    text = str(model)
    if not _URI.match(text):
        path = Path(text)
        if path.is_dir():
            path = path / MODULE_FILE
        if not path.is_file():
            raise WeightsError(f"{path}: alignment module not found")
        return path
    import mlflow
    from mlflow.exceptions import MlflowException

    target = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="fmbseg-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(target)))
    except MlflowException as exc:
        reason = exc.message.strip().splitlines()[0] if exc.message.strip() else exc.error_code
        raise WeightsError(f"{text}: cannot download the model ({reason})") from None
    for candidate in (local / "artifacts" / MODULE_FILE, local / MODULE_FILE, local):
        if candidate.name == MODULE_FILE and candidate.is_file():
            return candidate
    raise WeightsError(f"{text}: holds no {MODULE_FILE}, so it is not an fmbseg module model")
