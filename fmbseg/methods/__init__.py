"""Stage 2 methods behind one small interface, chosen by name like timm's model registry.

A *method* turns Stage 1's outputs into a trained model (``train``), and a trained model into a
:class:`WindowScorer` (``load``) that scores image windows against any vocabulary. The segmenter,
evaluation, serving, the registry and the DVC stages call methods only through this module, so a
new method (FMbSeg's alignment module, Fusioner, PixelCLIP, ...) plugs in without touching them.

A trained model is a folder. Its ``model.json`` names the method and the files that make the
model (the registry logs exactly these); a folder without one that holds ``module.safetensors``
is an FMbSeg model from before methods had names.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fmbseg.errors import ConfigError, WeightsError
from fmbseg.io.atomic import write_text_atomic

if TYPE_CHECKING:
    import torch

    from fmbseg.config import Params
    from fmbseg.models.base import WeightProvenance

MODEL_FILE = "model.json"
MODEL_FORMAT = "fmbseg-model"
LEGACY_WEIGHTS = "module.safetensors"

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainInputs:
    """What Stage 1 and the feature cache produced; each method reads the parts it needs."""

    features: Path | None = None  # Stage 2 feature cache (patch grids + patch labels)
    images: Path | None = None  # the training images
    labels: Path | None = None  # Stage 1 merged label maps
    masks: Path | None = None  # class-agnostic mask tables


@runtime_checkable
class WindowScorer(Protocol):
    """A trained model at inference: class scores for a batch of square-ish windows.

    ``prepare`` turns class names into what the model compares windows with (text embeddings,
    fused class tokens, ...); the segmenter caches it per vocabulary. ``score_windows`` takes
    float RGB windows in [0, 1], shaped (B, 3, h, w) with h and w multiples of ``patch_size``,
    and returns (B, K, h', w') scores at any resolution, higher meaning more likely.
    """

    @property
    def patch_size(self) -> int: ...

    @property
    def provenance(self) -> Mapping[str, WeightProvenance]:
        """Weight provenance per model role the scorer uses (``encoder``, ``text``, ...)."""

    def prepare(self, class_names: tuple[str, ...]) -> Any: ...

    def score_windows(self, windows: torch.Tensor, vocabulary: Any) -> torch.Tensor: ...


class Method(Protocol):
    """One Stage 2 method: its name, the paper it follows, how it trains and loads."""

    name: str
    paper: str

    def train(
        self,
        params: Params,
        inputs: TrainInputs,
        out_dir: Path,
        *,
        on_epoch: EpochCallback | None = None,
        restart_if_changed: bool = False,
        show_progress: bool = True,
    ) -> dict[str, Any]:
        """Train (or resume) into ``out_dir``; ends by :func:`write_model_record`."""

    def load(self, params: Params, model_dir: Path, device: torch.device) -> WindowScorer: ...


_registry: dict[str, Method | str] = {
    "fmbseg": "fmbseg.methods.fmbseg:METHOD",
    "fusioner": "fmbseg.methods.fusioner:METHOD",
    "pixelclip": "fmbseg.methods.pixelclip:METHOD",
}


def register_method(name: str, method: Method | str) -> None:
    """Add a method (an object, or ``"module:attribute"`` imported when first used)."""
    _registry[name] = method


def available_methods() -> list[str]:
    return sorted(_registry)


def get_method(name: str) -> Method:
    entry = _registry.get(name)
    if entry is None:
        raise ConfigError(
            f"train.method: unknown method {name!r} (known: {', '.join(available_methods())})"
        )
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = getattr(importlib.import_module(module), attribute)
        _registry[name] = entry
    return entry


@dataclass(frozen=True)
class ModelRecord:
    """``model.json``: which method a trained folder belongs to and which files make it."""

    method: str
    files: tuple[str, ...]  # relative to the folder; the registry logs exactly these
    details: Mapping[str, Any]  # method-specific facts (encoder, vocabulary, ...)


def write_model_record(
    out_dir: Path, method: str, files: tuple[str, ...], **details: Any
) -> ModelRecord:
    """Written last by a method's ``train``: its presence means a whole trained model."""
    missing = [name for name in files if not (out_dir / name).is_file()]
    if missing:
        raise WeightsError(f"{out_dir / missing[0]}: file of the trained {method} model not found")
    record = {"format": MODEL_FORMAT, "method": method, "files": list(files), **details}
    write_text_atomic(out_dir / MODEL_FILE, json.dumps(record, indent=2, ensure_ascii=False))
    return ModelRecord(method, tuple(files), details)


def model_folder(path: str | Path) -> Path:
    """The folder of a trained model given the folder or any file in it."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def read_model_record(path: str | Path) -> ModelRecord:
    """The record of the trained model at ``path`` (its folder or a file in it)."""
    folder = model_folder(path)
    file = folder / MODEL_FILE
    if not file.is_file():
        if (folder / LEGACY_WEIGHTS).is_file():
            return ModelRecord("fmbseg", (LEGACY_WEIGHTS, "module.json"), {})
        raise WeightsError(f"{folder}: no trained model here ({MODEL_FILE} not found)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("format") != MODEL_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {MODEL_FORMAT!r}")
        method, files = str(data.pop("method")), tuple(map(str, data.pop("files")))
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{file}: not a trained-model record ({exc})") from None
    data.pop("format")
    return ModelRecord(method, files, data)
