"""High-resolution dense CLIP features by sliding window, and class presence by crop votes.

The image is resized so its short side is ``short_side`` pixels, each side then rounded to
whole CLIP patches, so every crop offset falls on the patch grid and the crops' patch
embeddings stitch into one map without resampling. Overlaps are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.config import PseudoLabelConfig
from fmbseg.errors import ConfigError
from fmbseg.geometry import slide_starts
from fmbseg.models.base import VisionLanguageModel


@dataclass(frozen=True)
class WindowGrid:
    """Where the crops of one image lie, in the resized image's pixels."""

    original_size: tuple[int, int]  # (H, W) of the image as read
    resized_size: tuple[int, int]  # (H', W'), multiples of ``patch``
    crop: int
    patch: int
    offsets: tuple[tuple[int, int], ...]  # (top, left) of every crop

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.resized_size[0] // self.patch, self.resized_size[1] // self.patch

    def patch_centres_xy(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Centres of patch cells as (x, y) in original-image pixel coordinates."""
        scale_y = self.resized_size[0] / self.original_size[0]
        scale_x = self.resized_size[1] / self.original_size[1]
        x = (cols + 0.5) * self.patch / scale_x
        y = (rows + 0.5) * self.patch / scale_y
        return np.stack([x, y], axis=1).astype(np.float32)


def plan_windows(
    height: int,
    width: int,
    *,
    short_side: int,
    crop: int,
    stride: int,
    patch: int,
    stride_key: str = "pseudolabel.crop_stride",
) -> WindowGrid:
    """Resize so the short side is ``short_side`` (each side rounded to whole patches, and at
    least one crop), then place crops every ``stride`` pixels, the last flush with the edge."""
    if crop % patch or stride % patch or stride <= 0:
        raise ConfigError(
            f"{stride_key}: {stride} (and the crop {crop}) must be positive multiples of the "
            f"patch size {patch}"
        )
    scale = short_side / min(height, width)
    resized = tuple(max(crop, round(side * scale / patch) * patch) for side in (height, width))
    offsets = tuple(
        (top, left)
        for top in slide_starts(resized[0], crop, stride)
        for left in slide_starts(resized[1], crop, stride)
    )
    return WindowGrid((height, width), resized, crop, patch, offsets)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DenseClipFeatures:
    patch_map: torch.Tensor  # (h, w, D) normalised, on CPU
    crop_embeddings: torch.Tensor  # (n_crops, D) normalised, on CPU
    windows: WindowGrid


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return (
        torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
        / 255.0
    )


@torch.no_grad()
def dense_clip_features(
    image: np.ndarray, model: VisionLanguageModel, config: PseudoLabelConfig, batch_size: int
) -> DenseClipFeatures:
    patch = model.patch_size
    windows = plan_windows(
        image.shape[0],
        image.shape[1],
        short_side=config.short_side,
        crop=model.image_size,
        stride=config.crop_stride,
        patch=patch,
    )
    resized = F.interpolate(
        image_to_tensor(image), size=windows.resized_size, mode="bilinear", antialias=True
    )[0]
    grid_h, grid_w = windows.grid_size
    cells = windows.crop // patch
    total: torch.Tensor | None = None
    counts = torch.zeros(grid_h, grid_w, 1)
    crop_embeddings = []
    for start in range(0, len(windows.offsets), batch_size):
        chunk = windows.offsets[start : start + batch_size]
        crops = torch.stack(
            [
                resized[:, top : top + windows.crop, left : left + windows.crop]
                for top, left in chunk
            ]
        )
        dense = model.encode_images(crops)
        patches = dense.patches.float().cpu()
        if total is None:
            total = torch.zeros(grid_h, grid_w, patches.shape[-1])
        for (top, left), crop_patches in zip(chunk, patches, strict=True):
            rows = slice(top // patch, top // patch + cells)
            cols = slice(left // patch, left // patch + cells)
            total[rows, cols] += crop_patches
            counts[rows, cols] += 1
        crop_embeddings.append(dense.image.float().cpu())
    assert total is not None
    patch_map = F.normalize(total / counts, dim=-1)
    return DenseClipFeatures(patch_map, torch.cat(crop_embeddings), windows)


def detect_present_classes(
    crop_embeddings: torch.Tensor, text_embeddings: torch.Tensor, min_crops: int
) -> list[int]:
    """Classes that are the best match of at least ``min_crops`` crops, by class id."""
    votes = torch.bincount(
        (crop_embeddings @ text_embeddings.T).argmax(dim=1), minlength=text_embeddings.shape[0]
    )
    return torch.nonzero(votes >= min_crops).flatten().tolist()


def top_patch_points(
    features: DenseClipFeatures, text_embedding: torch.Tensor, count: int
) -> np.ndarray:
    """Centres of the ``count`` patches most similar to a class, (x, y) original pixels."""
    grid_w = features.windows.grid_size[1]
    similarity = features.patch_map.reshape(-1, features.patch_map.shape[-1]) @ text_embedding
    best = torch.topk(similarity, k=min(count, similarity.numel())).indices.numpy()
    return features.windows.patch_centres_xy(best // grid_w, best % grid_w)


def mean_embeddings_under_masks(
    features: DenseClipFeatures, masks: list[np.ndarray], chunk: int = 32
) -> torch.Tensor:
    """(M, D) normalised mean patch embedding under each (H, W) mask, weighted by coverage."""
    grid = features.windows.grid_size
    flat_map = features.patch_map.reshape(-1, features.patch_map.shape[-1])
    means = []
    for start in range(0, len(masks), chunk):
        stack = torch.from_numpy(np.stack(masks[start : start + chunk])).float()[:, None]
        coverage = F.interpolate(stack, size=grid, mode="area").flatten(1)
        means.append(coverage @ flat_map)
    if not means:
        return torch.zeros(0, flat_map.shape[-1])
    return F.normalize(torch.cat(means), dim=-1)
