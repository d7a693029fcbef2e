"""Fusioner's trainable part: the fusion transformer, the conv decoder and the cosine head.

Written from the spec (docs/fusioner.md, after Ma et al., BMVC 2022); the reference code is
GPL-3.0 and none of it is used here. Shapes, for B windows of an h x w patch grid and N classes:

    visual tokens (B, h*w, Cv) -- LN, Linear(Cv -> D), LN --------------------\\
    text tokens   (B, N, Ct)   -- LN, Linear(Ct -> D), + type embedding e -----+- concat
    -> ``depth`` pre-LN transformer blocks (no positional embedding) -> LN
    -> patches @ W_p (B, h*w, D), classes @ W_c (B, N, D)
    -> decoder: (B, D, h, w), [conv3x3, InstanceNorm, ReLU, bilinear x2] per upsample, one more
       conv3x3 block, conv1x1 -> (B, D, h*2^u, w*2^u)
    -> logits (B, N, h*2^u, w*2^u) = cos(pixel, class) / temperature; one sigmoid per class.

Inputs are L2-normalised per token first (the spec normalises CLIP's patch tokens; for DINOv2
grids the LayerNorm that follows makes this a no-op up to its epsilon).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmbseg.align.module import architecture_path
from fmbseg.errors import WeightsError
from fmbseg.io.atomic import atomic_write, write_text_atomic

FORMAT = "fmbseg-fusioner"


@dataclass(frozen=True)
class FusionerSpec:
    """Everything that fixes the architecture (and so the shapes of the weights)."""

    visual_dim: int
    text_dim: int
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    decoder_upsamples: int = 3
    temperature: float = 0.07

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")


class FusionModule(nn.Module):
    """Early fusion of visual and text tokens in one transformer (the part trained with AdamW)."""

    def __init__(self, spec: FusionerSpec) -> None:
        super().__init__()
        width = spec.width
        self.visual_in = nn.Sequential(
            nn.LayerNorm(spec.visual_dim), nn.Linear(spec.visual_dim, width), nn.LayerNorm(width)
        )
        self.text_in = nn.Sequential(nn.LayerNorm(spec.text_dim), nn.Linear(spec.text_dim, width))
        # One learned vector on every text token: tells the blocks which tokens are classes.
        self.type_embedding = nn.Parameter(torch.randn(1, 1, width))
        block = nn.TransformerEncoderLayer(
            width,
            spec.heads,
            dim_feedforward=round(width * spec.mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(
            block, spec.depth, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )
        self.patch_projection = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
        self.class_projection = nn.Parameter(torch.randn(width, width) / math.sqrt(width))

    def forward(
        self, visual: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, Cv), (B, N, Ct) -> fused patches (B, P, D), fused classes (B, N, D)."""
        patches = self.visual_in(F.normalize(visual, dim=-1))
        classes = self.text_in(F.normalize(text, dim=-1)) + self.type_embedding
        fused = self.blocks(torch.cat([patches, classes], dim=1))
        count = visual.shape[1]
        return fused[:, :count] @ self.patch_projection, fused[:, count:] @ self.class_projection


class Decoder(nn.Module):
    """Fused patch grid -> per-pixel features at 2^upsamples times the grid (trained with Adam)."""

    def __init__(self, width: int, upsamples: int) -> None:
        super().__init__()

        def block(kernel: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(width, width, kernel, padding=kernel // 2),
                nn.InstanceNorm2d(width, affine=False),
                nn.ReLU(inplace=True),
            )

        self.blocks = nn.ModuleList([block(3) for _ in range(upsamples + 1)])
        self.upsamples = upsamples
        self.out = nn.Conv2d(width, width, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, h * 2^u, w * 2^u)."""
        for index, block in enumerate(self.blocks):
            grid = block(grid)
            if index < self.upsamples:
                grid = F.interpolate(grid, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.out(grid)


class Fusioner(nn.Module):
    """Visual tokens of a patch grid + class text embeddings -> per-class logits per pixel."""

    def __init__(self, spec: FusionerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.fusion = FusionModule(spec)
        self.decoder = Decoder(spec.width, spec.decoder_upsamples)

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """visual (B, h, w, Cv) patch grid, text (B, N, Ct) or (N, Ct) shared by the batch ->
        logits (B, N, h * 2^u, w * 2^u): cosine / temperature (sigmoid > 0.5 iff cosine > 0)."""
        batch, height, width, _ = visual.shape
        if text.ndim == 2:
            text = text.expand(batch, *text.shape)
        patches, classes = self.fusion(visual.flatten(1, 2), text.to(visual.dtype))
        grid = patches.transpose(1, 2).reshape(batch, -1, height, width)
        pixels = F.normalize(self.decoder(grid), dim=1)
        classes = F.normalize(classes, dim=-1)
        return torch.einsum("bdhw,bnd->bnhw", pixels, classes) / self.spec.temperature


def save_fusioner(model: Fusioner, path: Path, **details: Any) -> None:
    """Weights as safetensors and the architecture (plus ``details``) as JSON beside them."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as handle:
        handle.write(save(tensors))
    record = {"format": FORMAT, "spec": asdict(model.spec), **details}
    write_text_atomic(architecture_path(path), json.dumps(record, indent=2, ensure_ascii=False))


def load_fusioner(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[Fusioner, dict[str, Any]]:
    """A saved Fusioner in eval mode and the details saved with it."""
    from fmbseg.models.weights import load_state_dict_strictly, read_state_dict

    weights = Path(path)
    meta = architecture_path(weights)
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise ValueError(f"format is {record.get('format')!r}, expected {FORMAT!r}")
        spec = FusionerSpec(**record.pop("spec"))
    except FileNotFoundError:
        raise WeightsError(f"{meta}: architecture of {weights.name} not found") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise WeightsError(f"{meta}: not a Fusioner architecture record ({exc})") from None
    model = Fusioner(spec)
    load_state_dict_strictly(model, read_state_dict(weights), weights, f"Fusioner {spec}")
    record.pop("format")
    return model.to(device).eval(), record
