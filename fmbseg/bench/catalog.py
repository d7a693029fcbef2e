"""Every benchmark case by name (the workers and the harness look cases up here)."""

from __future__ import annotations

from fmbseg.bench.cases import (
    CaseFn,
    cache_features,
    clip_dense,
    inference,
    masks,
    onnx_image_side,
    sam_routes,
    scale_features,
    scale_pseudolabel,
    train_step,
)
from fmbseg.bench.foundation import sam2_automatic_masks, sam3_prompts
from fmbseg.bench.fusioner import fusioner_inference, fusioner_train_step
from fmbseg.bench.pixelclip import pixelclip_step

CASES: dict[str, CaseFn] = {
    "clip_dense": clip_dense,
    "sam_routes": sam_routes,
    "masks": masks,
    "cache_features": cache_features,
    "train_step": train_step,
    "inference": inference,
    "onnx_image_side": onnx_image_side,
    "pixelclip_step": pixelclip_step,
    "fusioner_train_step": fusioner_train_step,
    "fusioner_inference": fusioner_inference,
    "sam2_automatic_masks": sam2_automatic_masks,
    "sam3_prompts": sam3_prompts,
}
SCALING_CASES: dict[str, CaseFn] = {
    "scale_pseudolabel": scale_pseudolabel,
    "scale_features": scale_features,
}
