"""Stage 1 on one image: route 1.1 (CLIP points prompt SAM), 1.2 (CLIP names SAM's masks) and
sam3 (SAM 3 segments class names, no CLIP points involved).

SAM's image embedding is computed once and shared by both routes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fmbseg.config import PseudoLabelConfig, TextPromptedRouteConfig
from fmbseg.models.base import PromptableSegmenter, TextPromptedSegmenter, VisionLanguageModel
from fmbseg.pseudolabel.dense import (
    DenseClipFeatures,
    dense_clip_features,
    detect_present_classes,
    mean_embeddings_under_masks,
    top_patch_points,
)

ROUTE_POINTS = "1.1"
ROUTE_AUTOMATIC = "1.2"
ROUTE_TEXT = "sam3"


@dataclass(frozen=True)
class LabelledMask:
    class_id: int
    route: str  # ROUTE_POINTS, ROUTE_AUTOMATIC or ROUTE_TEXT
    score: float  # SAM's predicted quality of the mask (SAM 3: its instance score)
    mask: np.ndarray  # (H, W) bool at the image's original size


def route_text_prompted(
    image: np.ndarray,
    segmenter: TextPromptedSegmenter,
    class_names: Sequence[str],
    candidates: Sequence[int],
    config: TextPromptedRouteConfig,
) -> list[LabelledMask]:
    """Route ``sam3``: SAM 3's instances of each candidate class on one (H, W, 3) uint8 image.

    The candidates are the whole vocabulary or the classes CLIP's crop votes found
    (``pseudolabel.sam3.candidates``); the image is embedded once and the class names are
    prompted in batches against that embedding. Every instance above
    ``pseudolabel.sam3.score_threshold`` (SAM 3's query score times its presence score) becomes
    a mask of its class, scored by SAM 3. With ``pseudolabel.sam3.present_from: sam3`` the
    classes SAM 3 found replace CLIP's vote for routes 1.1 and 1.2. The merge stage keeps a
    ``merge.sam3_fraction`` share of these masks and paints them per ``merge.priority``.
    """
    if not candidates:
        return []
    embedding = segmenter.embed_image(image)
    prompts = [class_names[class_id] for class_id in candidates]
    detections = segmenter.segment_prompts(
        embedding, prompts, config.score_threshold, config.mask_threshold
    )
    return [
        LabelledMask(candidates[d.prompt], ROUTE_TEXT, d.score, d.mask)
        for d in detections
        if d.mask.any()
    ]


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
    *,
    sam3: TextPromptedSegmenter | None = None,
    class_names: Sequence[str] = (),
) -> ImagePseudoLabels:
    """The configured routes on one (H, W, 3) uint8 image.

    ``image_classes`` (the semi-supervised variant) replaces CLIP's presence detection. Route
    ``sam3`` needs ``sam3`` and the vocabulary's ``class_names``.
    """
    seconds: dict[str, float] = {}
    watch = _Stopwatch(seconds)
    start = time.perf_counter()
    sam_routes = ROUTE_POINTS in config.routes or ROUTE_AUTOMATIC in config.routes
    text_route = ROUTE_TEXT in config.routes
    vote = image_classes is None and (sam_routes or config.sam3.candidates == "clip_votes")
    features = (
        dense_clip_features(image, clip, config, clip_batch_size) if sam_routes or vote else None
    )
    if image_classes is not None:
        present = sorted(set(image_classes))
    elif vote:
        present = detect_present_classes(
            features.crop_embeddings, text_embeddings, config.min_crops
        )
    else:  # only route sam3, over the whole vocabulary: SAM 3 decides what is present
        present = list(range(len(text_embeddings)))
    start = watch.lap("clip", start)
    masks: list[LabelledMask] = []
    if text_route:
        if sam3 is None or len(class_names) != len(text_embeddings):
            raise ValueError("route sam3 needs a text-prompted segmenter and the class names")
        candidates = present if config.sam3.candidates == "clip_votes" else range(len(class_names))
        masks += route_text_prompted(image, sam3, class_names, list(candidates), config.sam3)
        if config.sam3.present_from == "sam3" or not (vote or image_classes is not None):
            present = sorted({m.class_id for m in masks})
        start = watch.lap("route_sam3", start)
    if not present or not sam_routes:
        return ImagePseudoLabels(present, masks, seconds)
    assert features is not None
    sam_embedding = sam.embed_image(image)
    start = watch.lap("sam_encoder", start)
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
