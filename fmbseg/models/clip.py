"""open_clip backend of the vision-language role: text, image and dense patch embeddings.

Any open_clip architecture with open_clip's own ViT image tower works (ViT-B-32, ViT-B-16,
ViT-L-14, ViT-L-14-336, ...). The pretrained tag (``models.clip.pretrained``) describes the
weights' family: its standard download, its activation (OpenAI's weights need QuickGELU) and its
pixel mean/std. A local checkpoint or weights-directory file replaces only the download.

Image path: blocks ``0..L-2`` run once; only the last block branches.

- Class embedding: the ordinary last block, open_clip's pooling, ``ln_post`` and ``proj``.
- Dense patch embeddings: the last block rebuilt from ``ln_1`` of its input ``x`` as one of the
  published recipes (``models.clip.dense_attention``), each equal to its reference code:

  ============  =================================================  ==============  =====
  preset        token mixing (per head, scale ``1/√d``, CLS too)   residual        MLP
  ============  =================================================  ==============  =====
  ``maskclip``  none: the value projection of each token           block input     yes
  ``sclip``     ``(softmax(q qᵀ) + softmax(k kᵀ)) v``              block input     yes
  ``clearclip`` ``softmax(q qᵀ) v``                                none            no
  ``naclip``    ``softmax(k kᵀ + Ω) v``, Ω a Gaussian over         none            no
                patch-grid distances (0 for the class token)
  ``pixelclip`` none: the value projection of each token           class token     yes
  ============  =================================================  ==============  =====

  then the attention's output projection (and layer scale, if any), the residual, the MLP in
  its residual form ``v + mlp(ln_2(v))``, ``ln_post`` and ``proj``; the class token is dropped
  last. ``models.clip.dense_residual`` and ``models.clip.dense_mlp`` override the preset's
  residual and MLP ("auto" keeps them), so recipes compose. ClearCLIP's analysis is why
  Stage 1 defaults to ``clearclip``: the residual stream carries an image-level signal that
  blurs where a class is (docs/method.md).

Inputs of any size whose sides are multiples of the patch size work: the positional embedding
grid is resized bicubically (as open_clip does when it loads weights) and cached per grid size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

from fmbseg.config import ClipConfig, ModelsConfig
from fmbseg.errors import ConfigError
from fmbseg.models.base import DenseEmbeddings, WeightProvenance
from fmbseg.models.runtime import Runtime
from fmbseg.models.weights import (
    WeightsRequest,
    load_state_dict_strictly,
    read_state_dict,
    resolve_weights,
)

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HF_HUB_URL = "https://huggingface.co"

# Image-tower options that replace the attention block or the pooling this backend branches.
_UNSUPPORTED_VISION_OPTIONS = (
    "timm_model_name",
    "attentional_pool",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
)

Residual = Literal["none", "input", "cls"]


@dataclass(frozen=True)
class DenseRecipe:
    """How the last block makes dense embeddings: token mixing, residual, MLP."""

    attention: str
    residual: Residual
    mlp: bool


# Each preset's residual and MLP in its published code (see the module docstring).
PUBLISHED_RESIDUAL_AND_MLP: dict[str, tuple[Residual, bool]] = {
    "maskclip": ("input", True),
    "sclip": ("input", True),
    "clearclip": ("none", False),
    "naclip": ("none", False),
    "pixelclip": ("cls", True),
}


def dense_recipe(cfg: ClipConfig) -> DenseRecipe:
    """The configured recipe, "auto" switches replaced by the preset's published choice."""
    residual, mlp = PUBLISHED_RESIDUAL_AND_MLP[cfg.dense_attention]
    return DenseRecipe(
        attention=cfg.dense_attention,
        residual=residual if cfg.dense_residual == "auto" else cfg.dense_residual,
        mlp=mlp if cfg.dense_mlp == "auto" else cfg.dense_mlp,
    )


def neighbourhood_bias(grid: tuple[int, int], std: float) -> torch.Tensor:
    """NACLIP's Ω over ``1 + rows*cols`` tokens: ``exp(-|p_i - p_j|² / 2σ²)`` between patch
    positions on the grid (row-major), 0 in the class token's row and column."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32),
        torch.arange(grid[1], dtype=torch.float32),
        indexing="ij",
    )
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    squared = torch.cdist(positions, positions).square()
    bias = torch.zeros(1 + positions.shape[0], 1 + positions.shape[0])
    bias[1:, 1:] = torch.exp(-squared / (2 * std**2))
    return bias


def build(models: ModelsConfig) -> OpenClipModel:
    """The registry's factory: check the architecture, resolve weights, load, freeze."""
    cfg = models.clip
    runtime = Runtime.from_config(models)
    device = runtime.torch_device()
    if cfg.batch_size < 1:
        raise ConfigError(f"models.clip.batch_size: must be at least 1 (got {cfg.batch_size})")
    name = cfg.model.replace("/", "-")
    _check_architecture(name)
    pretrained_cfg = _pretrained_cfg(name, cfg.pretrained)
    resolved = resolve_weights(
        _weights_request(name, cfg.pretrained, pretrained_cfg),
        checkpoint=cfg.checkpoint,
        weights_dir=models.weights_dir,
        allow_random_init=cfg.allow_random_init,
    )
    network = _create_network(name, pretrained_cfg)
    if resolved.path is not None:
        _load_weights(network, resolved.path, name)
    return OpenClipModel(
        network.to(device),
        open_clip.get_tokenizer(name),
        runtime,
        resolved.provenance,
        cfg,
    )


def build_patch_encoder(models: ModelsConfig) -> ClipPatchEncoder:
    """The ``encoder`` role's ``clip`` backend: the patch tokens of the model ``models.clip``
    names (its weights resolved as the clip role's)."""
    return ClipPatchEncoder(build(models))


class ClipPatchEncoder:
    """A CLIP ViT's last-layer patch tokens in its joint space as the :class:`PatchEncoder`
    role: what Fusioner fuses with text tokens (its spec: ``ln_post`` and ``proj`` on every
    patch, class token dropped, L2-normalised)."""

    def __init__(self, clip: OpenClipModel) -> None:
        self.clip = clip
        self.provenance = dataclasses.replace(clip.provenance, role="encoder")

    @property
    def patch_size(self) -> int:
        return self.clip.patch_size

    @property
    def embed_dim(self) -> int:
        return self.clip.embed_dim

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.patch_tokens(images)


class OpenClipModel:
    """A frozen open_clip CLIP behind the :class:`VisionLanguageModel` interface."""

    def __init__(
        self,
        network: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        runtime: Runtime,
        provenance: WeightProvenance,
        cfg: ClipConfig,
    ) -> None:
        self.network = network.eval().requires_grad_(False)
        self.provenance = provenance
        self.dense = dense_recipe(cfg)
        self._neighbourhood_std = cfg.dense_neighbourhood_std
        self._neighbourhoods: dict[tuple[int, int], torch.Tensor] = {}
        self._tokenizer = tokenizer
        self._runtime = runtime
        self._batch_size = cfg.batch_size
        self._device = runtime.torch_device()
        preprocess = network.visual.preprocess_cfg
        self._mean, self._std = (
            torch.tensor(preprocess[key], device=self._device).view(1, 3, 1, 1)
            for key in ("mean", "std")
        )
        self._positions: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}

    @property
    def image_size(self) -> int:
        return int(self.network.visual.image_size[0])

    @property
    def patch_size(self) -> int:
        return int(self.network.visual.patch_size[0])

    @property
    def embed_dim(self) -> int:
        return int(self.network.visual.output_dim)

    @property
    def tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        return self._tokenizer

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of prompts, not a single string")
        chunks = [
            self._encode_text_batch(list(texts[start : start + self._batch_size]))
            for start in range(0, len(texts), self._batch_size)
        ]
        if not chunks:
            return torch.empty(0, self.embed_dim, device=self._device)
        return torch.cat(chunks)

    def encode_images(self, images: torch.Tensor) -> DenseEmbeddings:
        self._check_images(images)
        pairs = [self._encode_image_batch(chunk) for chunk in images.split(self._batch_size)]
        return DenseEmbeddings(
            image=torch.cat([image for image, _ in pairs]),
            patches=torch.cat([patches for _, patches in pairs]),
        )

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self._tokenizer(texts).to(self._device)
        with torch.no_grad(), self._runtime.autocast():
            features = self.network.encode_text(tokens)
        return F.normalize(features.float(), dim=-1)

    def _encode_image_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.network.visual
        batch, _, height, width = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        with torch.no_grad(), self._runtime.autocast():
            pixels = (images.to(self._device, torch.float32) - self._mean) / self._std
            tokens = self._input_tokens(pixels, grid)
            *shared_blocks, last_block = visual.transformer.resblocks
            for block in shared_blocks:
                tokens = block(tokens)
            # open_clip's own pooling: class token or patch average, its final-norm placement.
            pooled, _ = visual._pool(last_block(tokens))
            image = pooled @ visual.proj
            dense = self._dense_last_block(last_block, tokens, grid)
            patches = visual.ln_post(dense)[:, 1:] @ visual.proj
        image = F.normalize(image.float(), dim=-1)
        patches = F.normalize(patches.float(), dim=-1).reshape(batch, *grid, -1)
        return image, patches

    def dense_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, H/p, W/p, D) dense patch embeddings before L2
        normalisation, with autograd: what trains the image tower (PixelCLIP) and what its
        inference upsamples before normalising. The class-embedding path is skipped."""
        self._check_images(images)
        visual = self.network.visual
        batch, _, height, width = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        with self._runtime.autocast():
            pixels = (images.to(self._device, torch.float32) - self._mean) / self._std
            tokens = self._input_tokens(pixels, grid)
            *shared_blocks, last_block = visual.transformer.resblocks
            for block in shared_blocks:
                tokens = block(tokens)
            dense = self._dense_last_block(last_block, tokens, grid)
            patches = visual.ln_post(dense)[:, 1:] @ visual.proj
        return patches.float().reshape(batch, *grid, -1)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, H/p, W/p, D) unit vectors: every block as
        trained, then ``ln_post`` and ``proj`` on each patch token (Fusioner's visual input)."""
        self._check_images(images)
        visual = self.network.visual
        batch, _, height, width = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        with torch.no_grad(), self._runtime.autocast():
            pixels = (images.to(self._device, torch.float32) - self._mean) / self._std
            tokens = visual.transformer(self._input_tokens(pixels, grid))
            patches = visual.ln_post(tokens)[:, 1:] @ visual.proj
        return F.normalize(patches.float(), dim=-1).reshape(batch, *grid, -1)

    def _input_tokens(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens after the class token, positions for this grid and ``ln_pre``."""
        visual = self.network.visual
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)
        class_token = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([class_token, patches], dim=1)
        return visual.ln_pre(tokens + self._positional_embedding(grid).to(tokens.dtype))

    def _positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The learnt table at the pretraining grid, else its bicubic resize, cached per grid
        until the table changes (a momentum teacher's does every step); while the table is
        being trained, resized in every forward so gradients reach it."""
        visual = self.network.visual
        table = visual.positional_embedding
        if grid == tuple(visual.grid_size):
            return table
        training_table = table.requires_grad and torch.is_grad_enabled()
        cached = self._positions.get(grid)
        if cached is not None and cached[0] == table._version and not training_table:
            return cached[1]
        width = table.shape[-1]
        trained = table[1:].reshape(1, *visual.grid_size, width).permute(0, 3, 1, 2)
        resized = F.interpolate(
            trained.float(), size=grid, mode="bicubic", antialias=True, align_corners=False
        )
        patch_rows = resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)
        positions = torch.cat([table[:1].float(), patch_rows]).to(table.dtype)
        if not training_table:
            self._positions[grid] = (table._version, positions)
        return positions

    def _dense_last_block(
        self, block: ResidualAttentionBlock, tokens: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """The last block as :attr:`dense` says: token mixing, then residual, then MLP."""
        attention = block.attn
        query, key, value = F.linear(
            block.ln_1(tokens), attention.in_proj_weight, attention.in_proj_bias
        ).chunk(3, dim=-1)
        kind = self.dense.attention
        if kind in ("maskclip", "pixelclip"):
            mixed = value
        else:
            heads = attention.num_heads
            query, key, value = (_split_heads(t, heads) for t in (query, key, value))
            if kind == "clearclip":
                mixed = F.scaled_dot_product_attention(query, query, value)
            elif kind == "sclip":
                mixed = F.scaled_dot_product_attention(
                    query, query, value
                ) + F.scaled_dot_product_attention(key, key, value)
            else:  # naclip
                bias = self._neighbourhood_bias(grid).to(key.device, key.dtype)
                mixed = F.scaled_dot_product_attention(key, key, value, attn_mask=bias)
            mixed = _merge_heads(mixed)
        out = block.ls_1(attention.out_proj(mixed))
        if self.dense.residual == "input":
            out = out + tokens
        elif self.dense.residual == "cls":
            out = out + tokens[:, :1]
        if self.dense.mlp:
            out = out + block.ls_2(block.mlp(block.ln_2(out)))
        return out

    def _neighbourhood_bias(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._neighbourhoods:
            self._neighbourhoods[grid] = neighbourhood_bias(grid, self._neighbourhood_std)
        return self._neighbourhoods[grid]

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise ValueError(f"expected images shaped (B>0, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float RGB in [0, 1], got {images.dtype}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )


def _split_heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = tokens.shape
    return tokens.reshape(batch, length, heads, width // heads).transpose(1, 2)


def _merge_heads(tokens: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_width = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, length, heads * head_width)


def _check_architecture(name: str) -> None:
    """Refuse, before any weights are looked for, architectures whose last block we cannot branch."""
    model_cfg = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    if model_cfg is None:
        raise ConfigError(
            f"models.clip.model: {name!r} is not an open_clip architecture "
            "(see open_clip.list_models())"
        )
    vision = model_cfg["vision_cfg"]
    options = [option for option in _UNSUPPORTED_VISION_OPTIONS if vision.get(option)]
    if isinstance(vision.get("layers"), (list, tuple)):
        options.append("ResNet image tower")
    if vision.get("block_type") not in (None, "default"):
        options.append(f"block_type={vision['block_type']}")
    if options:
        raise ConfigError(
            f"models.clip.model: {name} has no plain open_clip ViT image tower "
            f"({', '.join(options)}); Stage 1's dense patch embeddings need a CLIP-style ViT "
            "(its text tower can still be Stage 2's text space: models.text.backend=open_clip)"
        )


def _pretrained_cfg(name: str, tag: str | None, role: str = "clip") -> dict[str, Any]:
    if tag is None:
        return {}
    pretrained_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not pretrained_cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ConfigError(
            f"models.{role}.pretrained: {tag!r} is not an open_clip tag of {name} (known: {known})"
        )
    return pretrained_cfg


def _weights_request(
    name: str, tag: str | None, pretrained_cfg: dict[str, Any], role: str = "clip"
) -> WeightsRequest:
    stem = f"{name}-{tag}" if tag else name
    source_url: str | None = None
    hub = pretrained_cfg.get("hf_hub", "")
    url = pretrained_cfg.get("url", "")
    if hub and open_clip.pretrained.has_hf_hub():
        # open_clip's hub entries read "org/repo/" or "org/repo/file": the repository is the head.
        source_url = f"{HF_HUB_URL}/{hub.rsplit('/', 1)[0]}"
    elif url:
        source_url = url

    def download() -> Path:
        return Path(open_clip.download_pretrained(pretrained_cfg))

    return WeightsRequest(
        role=role,
        model=f"{name}:{tag}" if tag else name,
        filenames=tuple(f"{stem}{suffix}" for suffix in CHECKPOINT_SUFFIXES),
        source_url=source_url,
        download=download if source_url is not None else None,
    )


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def _without_random_init_notice() -> Iterator[None]:
    """open_clip reports random init for every model built without a tag; ours may load next."""
    notice_filter = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice_filter)
    try:
        yield
    finally:
        root.removeFilter(notice_filter)


def _create_network(name: str, pretrained_cfg: dict[str, Any]) -> torch.nn.Module:
    normalisation = {key: pretrained_cfg[key] for key in ("mean", "std") if key in pretrained_cfg}
    with _without_random_init_notice():
        return open_clip.create_model(
            name,
            pretrained=None,
            force_quick_gelu=bool(pretrained_cfg.get("quick_gelu", False)),
            force_preprocess_cfg=normalisation,
        )


def _load_weights(network: torch.nn.Module, path: Path, name: str) -> None:
    load_state_dict_strictly(network, read_state_dict(path), path, f"open_clip {name}")
