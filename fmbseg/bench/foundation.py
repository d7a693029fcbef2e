"""Benchmark cases for the newer foundation-model backends, beside the ones they would replace.

``sam2_automatic_masks``: SAM 2 hiera-small against the preset's SAM (ViT-B, or ViT-H for
``paper``) on the same image, the same point grid and filters and the same encoder input side;
image encoder and automatic masks are timed apart, so the ratio says where SAM 2 gains.
Random weights, as every preset: cost does not depend on weight values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fmbseg.bench.presets import SEED, build_sam

if TYPE_CHECKING:
    from fmbseg.bench.cases import CaseContext
    from fmbseg.bench.measure import Recorder
    from fmbseg.models.sam2 import Sam2Segmenter, Sam2Variant

SAM2_POINTS_PER_BATCH = 64

# The tiny preset's SAM 2: hiera-t's layout with a narrow two-stage-deep trunk (the tests' own).
TINY_HIERA = (
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    "++model.memory_attention.num_layers=1",
)


def sam2_variant_for(ctx: CaseContext) -> Sam2Variant:
    """hiera-small (tiny: the tests' tiny Hiera) at the preset SAM's input side."""
    import dataclasses

    from fmbseg.models.sam2 import sam2_variant

    base = sam2_variant("sam2.1_hiera_t" if ctx.preset.name == "tiny" else "sam2.1_hiera_s")
    side = ctx.preset.sam.image_size
    shape = TINY_HIERA if ctx.preset.name == "tiny" else ()
    return dataclasses.replace(
        base,
        name=f"{base.name}@{side}",
        overrides=(*shape, f"++model.image_size={side}"),
    )


def build_sam2(ctx: CaseContext) -> Sam2Segmenter:
    import torch

    from fmbseg.models.base import WeightProvenance
    from fmbseg.models.sam2 import Sam2Segmenter, build_sam2_module

    variant = sam2_variant_for(ctx)
    torch.manual_seed(SEED)
    provenance = WeightProvenance("sam", variant.name, "random-init")
    return Sam2Segmenter(
        build_sam2_module(variant), variant, provenance, ctx.runtime, SAM2_POINTS_PER_BATCH
    )


def sam2_automatic_masks(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """SAM 2 hiera-small vs SAM, embed + automatic masks on one grid, same image and filters."""
    sam = build_sam(ctx.preset, ctx.runtime)
    sam2 = build_sam2(ctx)
    image = ctx.image()
    auto = ctx.automask()
    for _ in rec.rounds():
        embedding = rec.time("reference.sam_encoder", sam.embed_image, image)
        masks_sam = rec.time("reference.sam_automatic_masks", sam.generate_masks, embedding, auto)
        embedding2 = rec.time("ours.sam2_encoder", sam2.embed_image, image)
        masks_sam2 = rec.time("ours.sam2_automatic_masks", sam2.generate_masks, embedding2, auto)
    return {
        "grid": auto.points_per_side,
        "encoder_input": ctx.preset.sam.image_size,
        "sam": ctx.preset.sam.name,
        "sam2": sam2.variant.name,
        "masks_sam": len(masks_sam),
        "masks_sam2": len(masks_sam2),
        "units": {name: [1, "image"] for name in rec.samples},
    }
