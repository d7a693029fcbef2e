"""A frozen timm ViT (DINOv2 by default) as the :class:`PatchEncoder` role of Stage 2.

DINOv2 checkpoints come from timm's Hugging Face hub repositories (already in timm's key
layout, so they load strictly); local ``.safetensors`` / ``.pth`` / ``.bin`` files in the same
layout load the same way. Inputs of any size that is a multiple of the patch size work: the
model is built with ``dynamic_img_size`` so its position embeddings are resampled per input.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from fmbseg.errors import ConfigError
from fmbseg.models.base import WeightProvenance
from fmbseg.models.runtime import Runtime
from fmbseg.models.weights import (
    WeightsRequest,
    load_state_dict_strictly,
    read_state_dict,
    resolve_weights,
)

if TYPE_CHECKING:
    import torch

    from fmbseg.config import EncoderConfig, ModelsConfig

HUB_WEIGHTS_FILE = "model.safetensors"  # what timm's hub repositories hold
LOCAL_SUFFIXES = (".safetensors", ".pth", ".bin")


class TimmPatchEncoder:
    """Normalises images with the model's own statistics and returns its patch-token grid."""

    def __init__(
        self, model: torch.nn.Module, provenance: WeightProvenance, runtime: Runtime
    ) -> None:
        import torch

        patch_h, patch_w = model.patch_embed.patch_size
        if patch_h != patch_w:
            raise ConfigError(f"models.encoder.model: non-square patches {patch_h}x{patch_w}")
        self.device = runtime.torch_device()
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.provenance = provenance
        self.runtime = runtime
        self._patch_size = patch_h
        cfg = model.pretrained_cfg
        self._mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)

    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> patch features (B, H/p, W/p, C), float32.

        The class token and any register tokens (the model's prefix tokens) are dropped.
        """
        import torch

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder input must be (B, 3, H, W), got {tuple(images.shape)}")
        batch, _, height, width = images.shape
        p = self._patch_size
        if height % p or width % p:
            raise ValueError(
                f"encoder input {height}x{width}: height and width must be multiples of the "
                f"patch size {p}"
            )
        pixels = (images.to(self.device, torch.float32) - self._mean) / self._std
        with torch.no_grad(), self.runtime.autocast():
            tokens = self.model.forward_features(pixels)
        patches = tokens[:, self.model.num_prefix_tokens :]
        return patches.float().reshape(batch, height // p, width // p, patches.shape[-1])


def create_timm_model(config: EncoderConfig) -> torch.nn.Module:
    """The configured architecture, randomly initialised, without any download."""
    import timm

    if "pretrained" in config.overrides:
        raise ConfigError(
            "models.encoder.overrides: 'pretrained' is decided by the weight resolver"
        )
    try:
        model = timm.create_model(
            config.model, pretrained=False, dynamic_img_size=True, **config.overrides
        )
    except TypeError as exc:  # an architecture keyword the model does not take
        raise ConfigError(f"models.encoder.overrides: {exc}") from None
    if not hasattr(model, "num_prefix_tokens") or not hasattr(model, "patch_embed"):
        raise ConfigError(f"models.encoder.model: {config.model} is not a ViT with patch tokens")
    return model


def _download_from_hub(repo: str, filename: str) -> Path:
    """The file from the hub into huggingface_hub's own cache, where other tools find it too."""
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = repo.partition("@")
    return Path(hf_hub_download(repo_id, filename, revision=revision or None))


def weights_request(config: EncoderConfig) -> WeightsRequest:
    """Local file names for the model and its timm hub file as the standard download."""
    import timm
    from huggingface_hub import constants as hub
    from timm.models import get_pretrained_cfg

    if not timm.is_model(config.model):
        raise ConfigError(f"models.encoder.model: unknown timm model {config.model!r}")
    pretrained = get_pretrained_cfg(config.model)
    repo = pretrained.hf_hub_id if pretrained is not None else None
    filename = (pretrained.hf_hub_filename if pretrained is not None else None) or HUB_WEIGHTS_FILE
    return WeightsRequest(
        role="encoder",
        model=config.model,
        filenames=tuple(f"{config.model}{suffix}" for suffix in LOCAL_SUFFIXES),
        # hub.ENDPOINT is $HF_ENDPOINT (a mirror) when set, as for huggingface_hub itself.
        source_url=f"{hub.ENDPOINT}/{repo.partition('@')[0]}" if repo else None,
        download=functools.partial(_download_from_hub, repo, filename) if repo else None,
    )


def build(models: ModelsConfig) -> TimmPatchEncoder:
    """The ``timm`` backend; weights are resolved before the (possibly large) model is built."""
    config = models.encoder
    resolved = resolve_weights(
        weights_request(config),
        checkpoint=config.checkpoint,
        weights_dir=models.weights_dir,
        allow_random_init=config.allow_random_init,
    )
    model = create_timm_model(config)
    if resolved.path is not None:
        shape = f" with {config.overrides}" if config.overrides else ""
        load_state_dict_strictly(
            model, read_state_dict(resolved.path), resolved.path, f"timm {config.model}{shape}"
        )
    return TimmPatchEncoder(model, resolved.provenance, Runtime.from_config(models))
