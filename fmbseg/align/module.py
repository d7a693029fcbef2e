"""The Stage 2 alignment module: transformer block(s) over one image's patches, then a
projection into CLIP's text space (METHOD.md: ``z_i = normalize(W · A(x)_i)``).

A saved module is two files: ``<name>.safetensors`` (tensors only, no pickle) and
``<name>.json`` (architecture, the encoder it was trained on, the text embeddings it was trained
against, and the weights' sha256). The JSON is the contract: a loader states the architecture it
expects and gets a :class:`WeightsError` naming the file when the file holds another one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmbseg.errors import WeightsError
from fmbseg.io.atomic import atomic_write, sha256_file, write_text_atomic

FORMAT = "fmbseg-alignment-module"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModuleSpec:
    """Everything needed to rebuild the module's parameters."""

    in_dim: int
    text_dim: int
    depth: int = 1
    heads: int = 8
    mlp_ratio: float = 4.0

    def __str__(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in asdict(self).items())


@dataclass(frozen=True)
class ModuleInfo:
    """What a saved module's JSON records besides its architecture."""

    spec: ModuleSpec
    encoder: str  # model name of the frozen encoder whose features it takes
    text_embeddings: str | None  # file (relative to the module's folder) it was trained against
    vocabulary: tuple[str, ...]
    weights_sha256: str


class Block(nn.Module):
    """Pre-norm transformer block; attention never mixes images of a batch."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.mlp(self.norm2(x))


class AlignmentModule(nn.Module):
    """Frozen-encoder patch features (B, N, C) or (B, h, w, C) -> unit vectors in text space."""

    def __init__(
        self, in_dim: int, text_dim: int, depth: int = 1, heads: int = 8, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        if min(in_dim, text_dim, heads) < 1 or depth < 0 or mlp_ratio <= 0:
            raise ValueError(
                f"invalid alignment module: in_dim={in_dim}, text_dim={text_dim}, depth={depth}, "
                f"heads={heads}, mlp_ratio={mlp_ratio}"
            )
        if in_dim % heads:
            raise ValueError(f"in_dim={in_dim} is not divisible by heads={heads}")
        self.spec = ModuleSpec(in_dim, text_dim, depth, heads, float(mlp_ratio))
        self.blocks = nn.ModuleList(Block(in_dim, heads, mlp_ratio) for _ in range(depth))
        self.projection = nn.Linear(in_dim, text_dim)

    @classmethod
    def from_spec(cls, spec: ModuleSpec) -> AlignmentModule:
        return cls(spec.in_dim, spec.text_dim, spec.depth, spec.heads, spec.mlp_ratio)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim not in (3, 4) or features.shape[-1] != self.spec.in_dim:
            raise ValueError(
                f"expected features shaped (B, N, {self.spec.in_dim}) or (B, h, w, "
                f"{self.spec.in_dim}), got {tuple(features.shape)}"
            )
        leading = features.shape[:-1]
        x = features.reshape(leading[0], -1, self.spec.in_dim).to(self.projection.weight.dtype)
        for block in self.blocks:
            x = block(x)
        return F.normalize(self.projection(x), dim=-1).reshape(*leading, self.spec.text_dim)


def architecture_path(weights_path: str | Path) -> Path:
    """``module.safetensors`` -> ``module.json``."""
    return Path(weights_path).with_suffix(".json")


def save_module(
    module: AlignmentModule,
    path: str | Path,
    *,
    encoder: str,
    text_embeddings: str | None = None,
    vocabulary: tuple[str, ...] = (),
) -> None:
    """Write the weights, then the JSON (last, so its presence means a whole module)."""
    from safetensors.torch import save

    weights = Path(path)
    tensors = {
        name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()
    }
    with atomic_write(weights) as handle:
        handle.write(save(tensors))
    record: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": asdict(module.spec),
        "encoder": encoder,
        "text_embeddings": text_embeddings,
        "vocabulary": list(vocabulary),
        "weights_sha256": sha256_file(weights),
    }
    write_text_atomic(architecture_path(weights), json.dumps(record, indent=2, ensure_ascii=False))


def read_module_info(path: str | Path) -> ModuleInfo:
    """The JSON beside a module's weights, validated; :class:`WeightsError` naming it otherwise."""
    file = architecture_path(path)
    if not file.is_file():
        raise WeightsError(f"{file}: architecture file of alignment module {path} not found")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise ValueError(f"format is {record.get('format')!r}, expected {FORMAT!r}")
        spec = ModuleSpec(**record["architecture"])
        return ModuleInfo(
            spec,
            str(record["encoder"]),
            record["text_embeddings"],
            tuple(record["vocabulary"]),
            str(record["weights_sha256"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{file}: not an alignment-module architecture file ({exc})") from None


def load_module(
    path: str | Path, expected: ModuleSpec | None = None, device: str | torch.device = "cpu"
) -> tuple[AlignmentModule, ModuleInfo]:
    """Rebuild a saved module; any mismatch with ``expected`` or with its own JSON is a
    :class:`WeightsError` naming the file and the expected architecture."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(path)
    info = read_module_info(weights)
    if expected is not None and info.spec != expected:
        raise WeightsError(
            f"{weights}: alignment module has architecture ({info.spec}), expected ({expected})"
        )
    if not weights.is_file():
        raise WeightsError(f"{weights}: alignment module weights not found")
    if sha256_file(weights) != info.weights_sha256:
        raise WeightsError(
            f"{weights}: sha256 differs from the one in {architecture_path(weights)}"
        )
    module = AlignmentModule.from_spec(info.spec)
    try:
        state = load_file(weights)
    except SafetensorError as exc:
        raise WeightsError(f"{weights}: not a readable safetensors file ({exc})") from None
    reference = module.state_dict()
    wrong = sorted(
        set(reference) ^ set(state)
        | {
            name
            for name in set(reference) & set(state)
            if reference[name].shape != state[name].shape
        }
    )
    if wrong:
        raise WeightsError(
            f"{weights}: tensors do not fit the expected architecture ({info.spec}); "
            f"first mismatches: {', '.join(wrong[:3])}"
        )
    module.load_state_dict(state)
    return module.to(device), info
