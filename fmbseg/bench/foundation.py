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


SAM3_MAX_CLASSES = 32  # beyond the tiny preset: the class prompts timed per image


def sam3_prompts(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """SAM 3 on K class names: one vision embedding and the prompts batched against it, vs
    transformers' one call per class (``processor(images, text)`` then ``model(**inputs)``,
    as its model card shows), which re-embeds the image for every class."""
    import torch

    from fmbseg.models.base import WeightProvenance
    from fmbseg.models.sam3 import TINY_SAM3, TransformersSam3, random_init

    torch.manual_seed(SEED)
    model, processor = random_init(TINY_SAM3 if ctx.preset.name == "tiny" else {})
    classes = min(ctx.preset.classes, SAM3_MAX_CLASSES)
    sam3 = TransformersSam3(
        model, processor, WeightProvenance("sam3", "sam3", "random-init"), ctx.runtime, classes
    )
    names = [f"class {index}" for index in range(classes)]
    image = ctx.image()

    def batched() -> int:
        return len(sam3.segment_prompts(sam3.embed_image(image), names, 0.5, 0.5))

    def one_call_per_class() -> int:
        found = 0
        for name in names:
            inputs = processor(images=image, text=name, return_tensors="pt").to(sam3.device)
            with torch.no_grad():
                outputs = model(**inputs)
            (result,) = processor.post_process_instance_segmentation(
                outputs, threshold=0.5, mask_threshold=0.5, target_sizes=[image.shape[:2]]
            )
            found += len(result["scores"])
        return found

    for _ in rec.rounds():
        rec.time("ours.vision_embedding", sam3.embed_image, image)
        rec.time("ours.batched_prompts", batched)
        rec.time("reference.one_call_per_class", one_call_per_class)
    return {
        "classes": classes,
        "image_side": int(model.config.vision_config.backbone_config.image_size),
        "units": {
            "ours.vision_embedding": [1, "image"],
            "ours.batched_prompts": [classes, "class"],
            "reference.one_call_per_class": [classes, "class"],
        },
    }
