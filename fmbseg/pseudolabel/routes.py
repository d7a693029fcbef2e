"""Stage 1 on one image: route 1.1 (CLIP points prompt SAM) and 1.2 (CLIP names SAM's masks).

SAM's image embedding is computed once and shared by both routes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fmbseg.config import PseudoLabelConfig
from fmbseg.models.base import PromptableSegmenter, VisionLanguageModel
from fmbseg.pseudolabel.dense import (
    DenseClipFeatures,
    dense_clip_features,
    detect_present_classes,
    mean_embeddings_under_masks,
    top_patch_points,
)

ROUTE_POINTS = "1.1"
ROUTE_AUTOMATIC = "1.2"


@dataclass(frozen=True)
class LabelledMask:
    class_id: int
    route: str  # ROUTE_POINTS or ROUTE_AUTOMATIC
    score: float  # SAM's predicted quality of the mask
    mask: np.ndarray  # (H, W) bool at the image's original size


@dataclass
class ImagePseudoLabels:
    present: list[int]
    masks: list[LabelledMask]
    seconds: dict[str, float] = field(default_factory=dict)


class _Stopwatch:
    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def lap(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        return now


def route_points(
    features: DenseClipFeatures,
    text_embeddings: torch.Tensor,
    present: Sequence[int],
    sam: PromptableSegmenter,
    sam_embedding: object,
    points_per_class: int,
) -> list[LabelledMask]:
    """Route 1.1: the top patches of each present class prompt SAM; its best mask is kept."""
    masks = []
    for class_id in present:
        points = top_patch_points(features, text_embeddings[class_id], points_per_class)
        result = sam.predict_from_points(
            sam_embedding, points, np.ones(len(points), dtype=np.int64)
        )
        if result.mask.any():
            masks.append(LabelledMask(class_id, ROUTE_POINTS, result.score, result.mask))
    return masks


def name_masks(
    features: DenseClipFeatures,
    text_embeddings: torch.Tensor,
    present: Sequence[int],
    masks: Sequence[np.ndarray],
) -> list[int]:
    """Route 1.2's naming: the present class closest to the mean CLIP embedding under a mask."""
    if not masks or not present:
        return []
    means = mean_embeddings_under_masks(features, list(masks))
    candidates = torch.as_tensor(list(present))
    similarity = means @ text_embeddings[candidates].T
    return candidates[similarity.argmax(dim=1)].tolist()


def pseudolabel_image(
    image: np.ndarray,
    clip: VisionLanguageModel,
    sam: PromptableSegmenter,
    text_embeddings: torch.Tensor,
    config: PseudoLabelConfig,
    clip_batch_size: int,
    image_classes: Sequence[int] | None = None,
) -> ImagePseudoLabels:
    """Both routes on one (H, W, 3) uint8 image.

    ``image_classes`` (the semi-supervised variant) replaces CLIP's presence detection.
    """
    seconds: dict[str, float] = {}
    watch = _Stopwatch(seconds)
    start = time.perf_counter()
    features = dense_clip_features(image, clip, config, clip_batch_size)
    if image_classes is None:
        present = detect_present_classes(
            features.crop_embeddings, text_embeddings, config.min_crops
        )
    else:
        present = sorted(set(image_classes))
    start = watch.lap("clip", start)
    if not present:
        return ImagePseudoLabels([], [], seconds)
    sam_embedding = sam.embed_image(image)
    start = watch.lap("sam_encoder", start)
    masks: list[LabelledMask] = []
    if ROUTE_POINTS in config.routes:
        masks += route_points(
            features, text_embeddings, present, sam, sam_embedding, config.points_per_class
        )
        start = watch.lap("route_1_1", start)
    if ROUTE_AUTOMATIC in config.routes:
        proposals = [p for p in sam.generate_masks(sam_embedding, config.automask) if p.mask.any()]
        labels = name_masks(features, text_embeddings, present, [p.mask for p in proposals])
        masks += [
            LabelledMask(label, ROUTE_AUTOMATIC, p.predicted_iou, p.mask)
            for p, label in zip(proposals, labels, strict=True)
        ]
        watch.lap("route_1_2", start)
    return ImagePseudoLabels(present, masks, seconds)
