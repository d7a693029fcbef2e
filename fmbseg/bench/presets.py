"""The model sizes the benchmark runs at: real architectures with random weights.

Cost does not depend on weight values, so every model is built from its architecture alone
(never a download, never the weight resolver) and seeded, so two runs build the same models.

- ``tiny``: two-layer CLIP, SAM and DINOv2 of the real code paths; seconds; for tests.
- ``small``: what a 2-core CPU affords in minutes. The quickstart's models (CLIP ViT-B/32,
  DINOv2 ViT-S/14 at 448 px) but SAM ViT-B's image encoder at a 512 px input: a quarter of its
  1024 px tokens, 10x cheaper, while SAM's mask decoding gets only 6x cheaper, so this size
  understates what sharing SAM's embedding saves.
- ``quickstart``: the models of params.yaml's quickstart, SAM ViT-B at its real 1024 px.
- ``paper``: the paper's models, for GPU machines: CLIP ViT-L/14 at short side 896, SAM ViT-H
  at 1024 px, DINOv2 ViT-L/14 at 448 px.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmbseg.models.sam import SamVariant, sam_variant

if TYPE_CHECKING:
    from fmbseg.models.clip import OpenClipModel
    from fmbseg.models.encoder import TimmPatchEncoder
    from fmbseg.models.runtime import Runtime
    from fmbseg.models.sam import SegmentAnythingModel

SEED = 0
TINY_CLIP = "fmbseg-bench-tiny-vit"


@dataclass(frozen=True)
class Preset:
    """Models and input sizes of one benchmark size; every case reads its sizes from here."""

    name: str
    clip_model: str  # an open_clip architecture
    clip_short_side: int  # route 1.1 resizes the image's short side to this before cropping
    clip_stride: int  # sliding-window stride, a multiple of CLIP's patch
    sam: SamVariant
    encoder_model: str  # a timm ViT (DINOv2)
    feature_size: int  # Stage 2 input side: 448 gives 32 x 32 = 1024 patches at /14
    image_size: tuple[int, int]  # (H, W) of the benchmark image
    classes: int  # vocabulary size K of the loss and of inference
    present: int  # classes route 1.1 prompts SAM for
    points_per_side: int  # route 1.2's grid
    quick_points_per_side: int
    cache_images: int
    quick_cache_images: int
    encoder_batch: int
    encoder_overrides: Mapping[str, int] = field(default_factory=dict)
    clip_config: Mapping[str, Any] | None = None  # an architecture open_clip does not ship

    def describe(self) -> dict[str, Any]:
        """The preset as plain data for the report."""
        record = dataclasses.asdict(self)
        record["sam"] = {
            "variant": self.sam.name,
            "width": self.sam.encoder_embed_dim,
            "depth": self.sam.encoder_depth,
            "image_size": self.sam.image_size,
        }
        record.pop("clip_config")
        return record


_TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "layers": 2, "width": 64, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "layers": 2, "width": 64, "heads": 2},
}

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        clip_model=TINY_CLIP,
        clip_short_side=128,
        clip_stride=32,
        sam=SamVariant("bench_tiny", 32, 2, 2, (1,), "bench_tiny.pth", "", None, image_size=256),
        encoder_model="vit_small_patch14_dinov2.lvd142m",
        encoder_overrides={"depth": 2, "embed_dim": 32, "num_heads": 2},
        feature_size=112,
        image_size=(96, 128),
        classes=8,
        present=2,
        points_per_side=4,
        quick_points_per_side=4,
        cache_images=4,
        quick_cache_images=2,
        encoder_batch=2,
        clip_config=_TINY_CLIP_CONFIG,
    ),
    "small": Preset(
        name="small",
        clip_model="ViT-B-32",
        clip_short_side=448,
        clip_stride=96,
        sam=dataclasses.replace(sam_variant("vit_b"), name="vit_b@512", image_size=512),
        encoder_model="vit_small_patch14_dinov2.lvd142m",
        feature_size=448,
        image_size=(480, 640),
        classes=171,
        present=5,
        points_per_side=16,
        quick_points_per_side=8,
        cache_images=8,
        quick_cache_images=4,
        encoder_batch=4,
    ),
    "quickstart": Preset(
        name="quickstart",
        clip_model="ViT-B-32",
        clip_short_side=448,
        clip_stride=96,
        sam=sam_variant("vit_b"),
        encoder_model="vit_small_patch14_dinov2.lvd142m",
        feature_size=448,
        image_size=(480, 640),
        classes=171,
        present=5,
        points_per_side=8,
        quick_points_per_side=8,
        cache_images=8,
        quick_cache_images=4,
        encoder_batch=4,
    ),
    "paper": Preset(
        name="paper",
        clip_model="ViT-L-14",
        clip_short_side=896,
        clip_stride=112,
        sam=sam_variant("vit_h"),
        encoder_model="vit_large_patch14_dinov2.lvd142m",
        feature_size=448,
        image_size=(480, 640),
        classes=171,
        present=5,
        points_per_side=32,
        quick_points_per_side=16,
        cache_images=32,
        quick_cache_images=16,
        encoder_batch=8,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark size {name!r} (sizes: {', '.join(PRESETS)})") from None


def register_clip_architecture(preset: Preset, folder: Path) -> None:
    """Give open_clip the preset's own architecture, as a user adds a custom config."""
    if preset.clip_config is None:
        return
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{preset.clip_model}.json").write_text(json.dumps(preset.clip_config))
    open_clip.add_model_config(folder)


def clip_facts(preset: Preset) -> tuple[int, int, int]:
    """(crop side, patch side, joint embedding dim) from the architecture, without building it."""
    import open_clip

    config = open_clip.get_model_config(preset.clip_model)
    vision = config["vision_cfg"]
    return int(vision["image_size"]), int(vision["patch_size"]), int(config["embed_dim"])


def build_clip(preset: Preset, runtime: Runtime) -> OpenClipModel:
    """The open_clip backend with no pretrained tag, so the resolver has nothing to fetch."""
    import torch

    from fmbseg.config import ClipConfig, ModelsConfig
    from fmbseg.models.clip import build

    models = ModelsConfig(
        clip=ClipConfig(model=preset.clip_model, pretrained=None, allow_random_init=True),
        weights_dir=None,
        device=runtime.device,
        precision=runtime.precision,
    )
    torch.manual_seed(SEED)
    return build(models)


def build_sam(preset: Preset, runtime: Runtime) -> SegmentAnythingModel:
    import torch

    from fmbseg.models.base import WeightProvenance
    from fmbseg.models.sam import SegmentAnythingModel, build_sam_module

    torch.manual_seed(SEED)
    provenance = WeightProvenance("sam", preset.sam.name, "random-init")
    return SegmentAnythingModel(
        build_sam_module(preset.sam), preset.sam, provenance, runtime, points_per_batch=64
    )


def build_encoder(model: str, overrides: Mapping[str, int], runtime: Runtime) -> TimmPatchEncoder:
    import torch

    from fmbseg.config import EncoderConfig
    from fmbseg.models.base import WeightProvenance
    from fmbseg.models.encoder import TimmPatchEncoder, create_timm_model

    torch.manual_seed(SEED)
    network = create_timm_model(EncoderConfig(model=model, overrides=dict(overrides)))
    return TimmPatchEncoder(network, WeightProvenance("encoder", model, "random-init"), runtime)


def encoder_facts(preset: Preset) -> tuple[int, int]:
    """(patch side, feature width) of the encoder, from a weightless (meta-device) build."""
    import torch

    from fmbseg.config import EncoderConfig
    from fmbseg.models.encoder import create_timm_model

    config = EncoderConfig(model=preset.encoder_model, overrides=dict(preset.encoder_overrides))
    with torch.device("meta"):
        network = create_timm_model(config)
    return int(network.patch_embed.patch_size[0]), int(network.embed_dim)
