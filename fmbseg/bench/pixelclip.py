"""Benchmark case: one PixelCLIP training step, and the share of each of its parts.

The parts are the step's own code (:mod:`fmbseg.pixelclip.train`), timed one after another
in the order the step runs them; ``whole_step`` runs :func:`train_step` itself, so the parts
can be checked to add up. Sizes per preset: ``paper`` is PixelCLIP's ViT-B/16 configuration on
one GPU (320 px views, masks at 256, 12 images with ~100 SA-1B masks each, k = 64).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.bench.presets import build_clip

if TYPE_CHECKING:
    from fmbseg.bench.cases import CaseContext
    from fmbseg.bench.measure import Recorder


@dataclasses.dataclass(frozen=True)
class StepSize:
    clip_model: str | None  # None: the preset's CLIP
    image_size: int
    mask_size: int
    batch: int
    masks_per_image: int
    clusters: int


STEP_SIZES = {
    "tiny": StepSize(None, 64, 32, 2, 8, 8),
    "small": StepSize(None, 224, 64, 2, 16, 64),
    "quickstart": StepSize(None, 224, 64, 2, 16, 64),
    "paper": StepSize("ViT-B-16", 320, 256, 12, 100, 64),
}


def pixelclip_step(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """One step: EMA, prompts through the text tower, teacher + mask pooling, Sinkhorn,
    student, head + loss, backward, clipping + AdamW."""
    import torch
    import torch.nn.functional as F

    from fmbseg.bench.cases import _ellipses
    from fmbseg.config import PixelClipConfig
    from fmbseg.pixelclip.cluster import assign_clusters, cluster_targets, pool_masks
    from fmbseg.pixelclip.data import Views
    from fmbseg.pixelclip.train import (
        build_optimizer,
        build_parts,
        class_maps_to_logits,
        momentum_update,
        train_step,
    )

    size = STEP_SIZES[ctx.preset.name]
    preset = ctx.preset
    if size.clip_model is not None:
        preset = dataclasses.replace(preset, clip_model=size.clip_model)
    config = PixelClipConfig(
        clusters=size.clusters,
        image_size=size.image_size,
        mask_size=size.mask_size,
        batch_size=size.batch,
    )
    parts = build_parts(build_clip(preset, ctx.runtime), config)
    optimizer, scheduler = build_optimizer(parts, config)
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    side = size.image_size
    views = [
        Views(
            torch.rand(3, side, side, generator=generator),
            torch.rand(3, side, side, generator=generator),
            torch.from_numpy(
                np.stack(_ellipses(rng, size.masks_per_image, size.mask_size, size.mask_size))
            ),
        )
        for _ in range(size.batch)
    ]
    device = ctx.device
    weak = torch.stack([v.weak for v in views]).to(device)
    strong = torch.stack([v.strong for v in views]).to(device)
    masks = [v.masks.to(device) for v in views]

    def teacher_and_pooling() -> torch.Tensor:
        with torch.no_grad():
            features = F.normalize(parts.teacher.dense_patches(weak), dim=-1)
            return torch.cat(
                [pool_masks(features[i].permute(2, 0, 1), masks[i]) for i in range(len(masks))]
            )

    def head_and_loss(
        features: torch.Tensor, classes: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        cosine = torch.einsum("bhwd,kd->bkhw", F.normalize(features, dim=-1), classes)
        logits = class_maps_to_logits(parts.head, cosine, size.mask_size)
        return F.binary_cross_entropy_with_logits(logits, targets)

    def clip_and_update() -> None:
        torch.nn.utils.clip_grad_norm_(parts.trained_parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in rec.rounds():
        rec.time("ours.momentum_update", momentum_update, parts, config.momentum)
        classes = rec.time("ours.prompts_text_forward", parts.prompts)
        pooled = rec.time("ours.teacher_and_mask_pooling", teacher_and_pooling)
        assignment = rec.time(
            "ours.sinkhorn_clustering",
            assign_clusters,
            pooled,
            classes.detach(),
            config.epsilon,
            config.sinkhorn_iterations,
        )
        per_image = assignment.split([len(m) for m in masks])
        targets = torch.stack(
            [cluster_targets(m, a, config.clusters) for m, a in zip(masks, per_image, strict=True)]
        )
        features = rec.time("ours.student_forward", parts.student.dense_patches, strong)
        loss = rec.time("ours.head_and_loss_forward", head_and_loss, features, classes, targets)
        rec.time("ours.backward", loss.backward)
        rec.time("ours.clip_and_adamw", clip_and_update)
        rec.time("ours.whole_step", train_step, parts, views, config, optimizer, scheduler)
    fastest = {
        name: min(sample.seconds for sample in samples) for name, samples in rec.samples.items()
    }
    parts_total = sum(seconds for name, seconds in fastest.items() if name != "ours.whole_step")
    return {
        # Each part's share of the sum of the parts (fastest rounds); whole_step checks the sum.
        "shares": {
            name.removeprefix("ours."): round(seconds / parts_total, 4)
            for name, seconds in fastest.items()
            if name != "ours.whole_step" and parts_total > 0
        },
        "parts_over_whole_step": (
            round(parts_total / fastest["ours.whole_step"], 3)
            if fastest.get("ours.whole_step")
            else None
        ),
        "images": size.batch,
        "clip": preset.clip_model,
        "image_size": side,
        "mask_size": size.mask_size,
        "masks": size.batch * size.masks_per_image,
        "clusters": size.clusters,
        "units": {name: [size.batch, "image"] for name in rec.samples},
    }
