"""One weight resolver for every model role.

Order: an explicit checkpoint file -> a local weights directory (``models.weights_dir`` and
``$FMBSEG_WEIGHTS_DIR``, each searched as ``<dir>/<role>/<file>`` then ``<dir>/<file>``) ->
the library's standard download -> random initialisation, only where the config allows it,
with a loud warning. The provenance (file hash, or ``random-init``) travels with the model.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmbseg.errors import FmbsegError, WeightsError
from fmbseg.io.atomic import sha256_file
from fmbseg.io.download import unreachable_reason
from fmbseg.models.base import WeightProvenance

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "FMBSEG_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightsRequest:
    """What a backend needs: where to look locally and how to download."""

    role: str  # "clip" | "sam" | "encoder"; also the sub-folder of a weights directory
    model: str  # human-readable model name for messages and provenance
    filenames: tuple[str, ...]  # file names accepted in a weights directory
    source_url: str | None = None  # probed before downloading and named in messages
    download: Callable[[], Path] | None = None  # the library's standard download
    access: str | None = None  # how to get access to gated weights, said when none are found


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path | None  # None means: initialise randomly
    provenance: WeightProvenance


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def weights_dirs(configured: str | None) -> list[Path]:
    dirs = [Path(d) for d in (configured, os.environ.get(WEIGHTS_DIR_ENV)) if d]
    return list(dict.fromkeys(dirs))


def _find_local(request: WeightsRequest, dirs: list[Path]) -> Path | None:
    for directory in dirs:
        for name in request.filenames:
            for candidate in (directory / request.role / name, directory / name):
                if candidate.is_file():
                    return candidate
    return None


def _placement_hint(request: WeightsRequest, dirs: list[Path]) -> str:
    where = (
        " or ".join(f"{d / request.role}/" for d in dirs) or f"${WEIGHTS_DIR_ENV}/{request.role}/"
    )
    origin = f" (the file published at {request.source_url})" if request.source_url else ""
    return (
        f"place {request.filenames[0]}{origin} in {where} or set models.{request.role}.checkpoint"
    )


def resolve_weights(
    request: WeightsRequest,
    *,
    checkpoint: str | None,
    weights_dir: str | None,
    allow_random_init: bool,
) -> ResolvedWeights:
    def provenance(source: str, path: Path | None) -> WeightProvenance:
        digest = file_sha256(path) if path is not None else None
        return WeightProvenance(
            request.role,
            request.model,
            source,
            str(path) if path else None,
            digest,  # type: ignore[arg-type]
        )

    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise WeightsError(f"models.{request.role}.checkpoint: {path} does not exist")
        return ResolvedWeights(path, provenance("file", path))

    dirs = weights_dirs(weights_dir)
    local = _find_local(request, dirs)
    if local is not None:
        return ResolvedWeights(local, provenance("weights_dir", local))

    if request.download is None:
        failure = "no standard download for this model"
    elif request.source_url and (reason := unreachable_reason(request.source_url)):
        failure = f"download skipped: {reason}"
    else:
        try:
            downloaded = request.download()
            return ResolvedWeights(downloaded, provenance("download", downloaded))
        except FmbsegError as exc:
            failure = f"download failed: {exc}"
        except Exception as exc:  # the hub libraries raise many kinds
            failure = f"download failed: {exc.__class__.__name__}: {exc}".splitlines()[0]

    if allow_random_init:
        log.warning(
            "RANDOM-INIT WEIGHTS for %s %s (%s): its outputs carry no learned meaning",
            request.role,
            request.model,
            failure,
        )
        return ResolvedWeights(None, provenance("random-init", None))
    access = f"; {request.access}" if request.access else ""
    raise WeightsError(
        f"no weights for {request.role} {request.model}: {_placement_hint(request, dirs)} "
        f"({failure}{access}; models.{request.role}.allow_random_init=true runs with random "
        "weights)"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or ``torch.load(weights_only=True)`` (no pickled code).

    A ``{"state_dict": ...}`` or ``{"model": ...}`` (SAM 2's) wrapper and DataParallel's
    ``module.`` prefixes are unwrapped.
    """
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        raise WeightsError(
            f"{path}: not readable as a weights-only checkpoint ({reason})"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_state_dict_strictly(
    module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, expected: str
) -> None:
    """Load ``state`` or raise a one-line :class:`WeightsError` naming the file, the
    architecture it should hold, and what did not fit (torch's own error spans many lines)."""
    own = module.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong_shape = [key for key in own if key in state and state[key].shape != own[key].shape]
    if missing or unexpected or wrong_shape:
        first = (wrong_shape + missing + unexpected)[0]
        detail = (
            f"{first} is {tuple(state[first].shape)}, expected {tuple(own[first].shape)}"
            if first in wrong_shape
            else first
        )
        raise WeightsError(
            f"{path}: not a checkpoint of {expected} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape keys; first: {detail})"
        )
    module.load_state_dict(state, strict=True)
