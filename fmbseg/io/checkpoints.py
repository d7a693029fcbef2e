"""Resumable training checkpoints, shared by the trainers: one safetensors file of tensors and
``latest.json`` beside it, written last with the file's name and sha256, so it always names a
whole checkpoint. A kill can leave an older tensors file; the next save or load removes it.

The trainers choose the tensors (model weights, optimiser moments, losses) and the JSON record
(step or epoch, optimiser groups, scheduler, seconds); these functions only store and check them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmbseg.errors import InputError
from fmbseg.io.atomic import atomic_write, sha256_file, write_text_atomic

if TYPE_CHECKING:
    import torch

LATEST_FILE = "latest.json"
TENSORS_PATTERN = "*.safetensors"


def save_checkpoint(
    folder: Path, name: str, tensors: dict[str, torch.Tensor], record: dict[str, Any]
) -> None:
    """Write ``tensors`` to ``folder/name``, then ``latest.json`` (``record`` plus the file's name
    and sha256), then remove the folder's other tensors files."""
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with atomic_write(folder / name) as handle:
        handle.write(save(tensors))
    latest = record | {"tensors": name, "sha256": sha256_file(folder / name)}
    write_text_atomic(folder / LATEST_FILE, json.dumps(latest, indent=2))
    _remove_others(folder, name)


def load_latest(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and record of ``folder``'s latest checkpoint; None when there is none.

    A tensors file that is missing or whose sha256 differs from the record's is refused."""
    from safetensors.torch import load_file

    latest = folder / LATEST_FILE
    if not latest.is_file():
        return None
    record = json.loads(latest.read_text(encoding="utf-8"))
    file = folder / record["tensors"]
    if not file.is_file() or sha256_file(file) != record["sha256"]:
        raise InputError(f"{file}: checkpoint missing or its sha256 differs from {latest}")
    _remove_others(folder, file.name)  # a kill can come between a save and its removal
    return load_file(file), record


def _remove_others(folder: Path, name: str) -> None:
    for old in folder.glob(TENSORS_PATTERN):
        if old.name != name:
            old.unlink()


def flatten_state(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state``'s tensors under keys ``prefix.<name>``."""
    return {f"{prefix}.{name}": value for name, value in state.items()}


def unflatten_state(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors stored by :func:`flatten_state` under ``prefix``, by their own names."""
    start = f"{prefix}."
    return {
        key.removeprefix(start): value for key, value in tensors.items() if key.startswith(start)
    }


def flatten_optimizer(
    prefix: str, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimiser's per-parameter state (any fields: SGD momentum, Adam's moments and step) as
    tensors ``prefix.<index>.<field>``, and its param groups (JSON) for the record."""
    state = optimizer.state_dict()
    tensors = {
        f"{prefix}.{index}.{field}": value
        for index, entry in state["state"].items()
        for field, value in entry.items()
    }
    return tensors, state["param_groups"]


def load_optimizer(
    prefix: str,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    param_groups: list[dict[str, Any]],
) -> None:
    """Load into ``optimizer`` the state :func:`flatten_optimizer` stored under ``prefix``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in unflatten_state(prefix, tensors).items():
        index, _, field = key.partition(".")
        state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
