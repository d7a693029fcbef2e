"""A registered model at work: its folder, its checks at load, and segmentation requests.

A registered model's folder holds the trained model's own files (exactly what its
``model.json`` lists), ``model.json``, the training records and ``serving.json``: the resolved
``models`` and ``inference`` params it was registered with, the provenance of every model
role's weights, and the sha256 of every file. Loading rebuilds the encoder and text models from
those params through the one weight resolver and refuses weights other than the recorded ones.

The MLflow model (``fmbseg/mlflow_model.py``) is a thin wrapper around :func:`segment_request`,
so ``mlflow models serve``, ``mlflow.pyfunc.load_model`` and the tests run the same code.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.errors import InputError, WeightsError
from fmbseg.io.atomic import sha256_file, write_text_atomic

if TYPE_CHECKING:
    import pandas as pd

    from fmbseg.config import InferenceConfig, ModelsConfig, Params
    from fmbseg.models.base import WeightProvenance
    from fmbseg.segmenter import OpenVocabularySegmenter

SERVING_FILE = "serving.json"
SERVING_FORMAT = "fmbseg-serving"
IMAGE_COLUMN = "image"
# Request params and their defaults (the signature's ParamSchema states the same).
CLASSES_PARAM = "classes"
BACKGROUND_PARAM = "background"
SCORE_PARAM = "return_scores"
LABELS_COLUMN = "labels"
SCORE_COLUMN = "score"


@dataclass(frozen=True)
class ServingRecord:
    params: Params  # the registered models and inference params (others at their defaults)
    provenance: Mapping[str, str]  # role -> provenance tag (sha256:..., random-init, ...)
    files: Mapping[str, str]  # file of the folder -> sha256


def write_serving_record(
    folder: Path,
    params: Params,
    provenance: Mapping[str, WeightProvenance],
    files: Sequence[str],
) -> ServingRecord:
    record = {
        "format": SERVING_FORMAT,
        "models": params.models.model_dump(mode="json"),
        "inference": params.inference.model_dump(mode="json"),
        "provenance": {role: item.tag for role, item in sorted(provenance.items())},
        "files": {name: sha256_file(folder / name) for name in files},
    }
    write_text_atomic(folder / SERVING_FILE, json.dumps(record, indent=2, ensure_ascii=False))
    return read_serving_record(folder)


def read_serving_record(folder: Path) -> ServingRecord:
    from fmbseg.config import Params

    file = folder / SERVING_FILE
    if not file.is_file():
        raise WeightsError(f"{folder}: not a registered fmbseg model ({SERVING_FILE} not found)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("format") != SERVING_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {SERVING_FORMAT!r}")
        params = Params.model_validate({"models": data["models"], "inference": data["inference"]})
        return ServingRecord(params, dict(data["provenance"]), dict(data["files"]))
    except (ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0]
        raise WeightsError(f"{file}: not a serving record ({reason})") from None


def portable_models(models: ModelsConfig) -> ModelsConfig:
    """``models`` without checkpoint paths of the registering machine that do not exist here:
    those weights are then looked for in the weights directories (and downloaded) like any
    model's, and the provenance check proves they are the recorded file."""
    updates = {}
    for role in ("clip", "text", "sam", "encoder"):
        section = getattr(models, role)
        if section.checkpoint and not Path(section.checkpoint).is_file():
            updates[role] = section.model_copy(update={"checkpoint": None})
    return models.model_copy(update=updates)


def check_provenance(
    folder: Path, expected: Mapping[str, str], found: Mapping[str, WeightProvenance]
) -> None:
    """Each role's weights must be the ones the model was registered with."""
    for role, tag in expected.items():
        item = found.get(role)
        if item is None:
            raise WeightsError(f"{folder}: the loaded model has no {role} model; registered: {tag}")
        if item.tag != tag:
            where = f" from {item.path}" if item.path else ""
            raise WeightsError(
                f"{folder}: {role} weights of {item.model} resolved here are {item.tag}{where}, "
                f"but the model was registered with {tag}; put that file in "
                f"weights/{role}/ or $FMBSEG_WEIGHTS_DIR/{role}/"
            )


def load_registered(
    folder: str | Path, inference: InferenceConfig | None = None
) -> tuple[OpenVocabularySegmenter, Params]:
    """The segmenter of a registered model's folder, its files and weights checked; with its
    registered ``inference`` params unless others are given (an evaluation protocol's)."""
    from fmbseg.segmenter import load_segmenter

    folder = Path(folder)
    record = read_serving_record(folder)
    for name, digest in record.files.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            raise WeightsError(f"{path}: missing or changed since registration (sha256 differs)")
    update: dict[str, Any] = {"models": portable_models(record.params.models)}
    if inference is not None:
        update["inference"] = inference
    params = record.params.model_copy(update=update)
    segmenter = load_segmenter(params, folder)
    check_provenance(folder, record.provenance, segmenter.scorer.provenance)
    return segmenter, params


def decode_request_image(value: Any, position: int) -> np.ndarray:
    """(H, W, 3) uint8 from an encoded PNG/JPEG (bytes, or base64 text) or an RGB array."""
    from fmbseg.io.images import decode_rgb

    name = f"image {position}"
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            raise InputError(f"{name}: text that is not base64") from None
    if isinstance(value, bytes | bytearray | memoryview):
        return decode_rgb(bytes(value), name)
    array = np.asarray(value)
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise InputError(f"{name}: array shaped {array.shape}, expected (H, W, 3)")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
            raise InputError(f"{name}: {array.dtype} array; expected uint8 RGB values 0-255")
        array = array.astype(np.uint8)
    return array


def segment_request(
    segmenter: OpenVocabularySegmenter,
    params: Params,
    images: pd.DataFrame,
    request: Mapping[str, Any],
) -> pd.DataFrame:
    """One row per image: its label map (indices into ``classes``) and, when asked, the
    winning score per pixel."""
    import pandas as pd

    from fmbseg.models.vocabulary import validate_vocabulary
    from fmbseg.protocols import background_rule

    if IMAGE_COLUMN not in images.columns:
        raise InputError(f"the request has no {IMAGE_COLUMN!r} column (columns: {list(images)})")
    classes = list(request.get(CLASSES_PARAM) or [])
    if not classes:
        raise InputError(
            f"params.{CLASSES_PARAM}: give the class names to segment, e.g. [cat, dog]"
        )
    names = validate_vocabulary(classes)
    background = background_rule(params.inference, names, request.get(BACKGROUND_PARAM) or None)
    arrays = [
        decode_request_image(value, position) for position, value in enumerate(images[IMAGE_COLUMN])
    ]
    rows = []
    for image in arrays:
        result = segmenter.segment(image, names, background)
        row: dict[str, Any] = {LABELS_COLUMN: result.labels.astype(np.int64)}
        if request.get(SCORE_PARAM):
            row[SCORE_COLUMN] = result.scores.max(0).values.numpy().astype(np.float32)
        rows.append(row)
    return pd.DataFrame(rows)
