"""The steps of automatic mask generation that SAM and SAM 2 share, on one whole-image grid.

Both packages ship the same helpers in their own ``utils.amg`` module (``MaskData``, stability
score, boxes, RLEs); each segmenter passes its own, so each keeps its reference's arithmetic.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.models.base import ProposedMask

if TYPE_CHECKING:
    from fmbseg.config import AutoMaskConfig


def keep_candidates(data: Any, threshold: float, config: AutoMaskConfig, amg: ModuleType) -> Any:
    """A batch's candidates (``MaskData`` of ``logits`` at image size and ``iou_preds``) that
    pass the stability filter and area bounds, with their boxes and RLEs instead of logits."""
    data["stability_score"] = amg.calculate_stability_score(
        data["logits"], threshold, config.stability_score_offset
    )
    if config.stability_score_thresh > 0.0:
        data.filter(data["stability_score"] >= config.stability_score_thresh)
    masks = data["logits"] > threshold
    del data["logits"]
    image_area = masks.shape[-2] * masks.shape[-1]
    area = masks.flatten(1).sum(1)
    within = (area >= config.min_area_fraction * image_area) & (
        area <= config.max_area_fraction * image_area
    )
    data.filter(within)
    masks = masks[within]
    data["boxes"] = amg.batched_mask_to_box(masks)
    data["rles"] = amg.mask_to_rle_pytorch(masks)
    return data


def proposals_after_nms(data: Any, config: AutoMaskConfig, amg: ModuleType) -> list[ProposedMask]:
    """The grid's candidates de-duplicated by box NMS, as masks by decreasing predicted IoU."""
    import torch
    from torchvision.ops import batched_nms

    if len(data["rles"]) == 0:
        return []
    keep = batched_nms(
        data["boxes"].float(),
        data["iou_preds"],
        torch.zeros(len(data["boxes"]), device=data["boxes"].device),
        iou_threshold=config.box_nms_thresh,
    )
    data.filter(keep)
    return [
        ProposedMask(
            mask=np.ascontiguousarray(amg.rle_to_mask(rle)),
            predicted_iou=float(iou),
            stability_score=float(stab),
        )
        for rle, iou, stab in zip(
            data["rles"], data["iou_preds"], data["stability_score"], strict=True
        )
    ]
