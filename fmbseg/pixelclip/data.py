"""PixelCLIP's training views: a weak view for the teacher, a strong one for the student, and
the image's masks cropped to the weak view.

Weak view: the short side resized to ``short_side`` (long side capped at ``max_side``), a random
square ``crop_size`` crop, SSD-style colour distortion, a horizontal flip. Strong view: the weak
view with colour jitter (0.5, 0.5, 0.5, 0.25; p 0.8), grayscale (p 0.2), Gaussian blur
(sigma in [0.1, 2]; p 0.5) and always a black cutout box, each side 10-50% of the view. Masks:
the crop nearest-sampled at ``mask_size``, flipped with the view, cutout pixels removed, masks
of at most one pixel dropped.

The crop is taken from the original image and resized once, straight to the towers' input
(``image_size``), instead of resizing the whole image first: the same view, fewer pixels
touched. All randomness comes from the generator the caller passes, so a step's views depend
only on (seed, sample position): resuming needs no RNG state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.config import PixelClipConfig


@dataclass(frozen=True)
class Views:
    weak: torch.Tensor  # (3, S, S) float in [0, 1], the teacher's input
    strong: torch.Tensor  # (3, S, S) float in [0, 1], the student's input
    masks: torch.Tensor  # (N, M, M) bool at mask_size, each with at least two pixels


@dataclass(frozen=True)
class Crop:
    """A square crop of the original image, in original pixels, and whether it is flipped."""

    top: float
    left: float
    side: float
    flip: bool


def random_crop(height: int, width: int, config: PixelClipConfig, rng: np.random.Generator) -> Crop:
    scale = min(config.short_side / min(height, width), config.max_side / max(height, width))
    resized = (height * scale, width * scale)
    side = min(config.crop_size, resized[0], resized[1])
    top = rng.uniform(0, resized[0] - side)
    left = rng.uniform(0, resized[1] - side)
    return Crop(top / scale, left / scale, side / scale, bool(rng.random() < 0.5))


def crop_image(image: np.ndarray, crop: Crop, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float in [0, 1]: the crop, resized (bilinear,
    antialiased), flipped."""
    top, left = int(crop.top), int(crop.left)
    bottom = min(image.shape[0], math.ceil(crop.top + crop.side))
    right = min(image.shape[1], math.ceil(crop.left + crop.side))
    pixels = torch.from_numpy(np.array(image[top:bottom, left:right]))
    pixels = pixels.permute(2, 0, 1)[None].float() / 255.0
    view = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)[0]
    return view.flip(-1) if crop.flip else view


def crop_masks(masks: np.ndarray, crop: Crop, size: int) -> torch.Tensor:
    """(N, H, W) bool -> (N, size, size): the crop nearest-sampled at cell centres, flipped."""
    height, width = masks.shape[1:]
    centres = (np.arange(size) + 0.5) * crop.side / size
    rows = np.clip((crop.top + centres).astype(int), 0, height - 1)
    cols = np.clip((crop.left + centres).astype(int), 0, width - 1)
    sampled = torch.from_numpy(masks[:, rows][:, :, cols])
    return sampled.flip(-1) if crop.flip else sampled


def ssd_colour(view: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """SSD's photometric distortion (detectron2 ColorAugSSDTransform): brightness +-32/255,
    then contrast x[0.5, 1.5] before or after saturation x[0.5, 1.5] and hue +-18/180, each
    applied with probability 0.5."""
    import torchvision.transforms.functional as TF

    if rng.random() < 0.5:
        view = (view + rng.uniform(-32, 32) / 255.0).clamp(0, 1)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        view = (view * rng.uniform(0.5, 1.5)).clamp(0, 1)
    if rng.random() < 0.5:
        view = TF.adjust_saturation(view, rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        view = TF.adjust_hue(view, rng.uniform(-18, 18) / 180.0)
    if not contrast_first and rng.random() < 0.5:
        view = (view * rng.uniform(0.5, 1.5)).clamp(0, 1)
    return view


def strong_colour(view: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """ColorJitter(0.5, 0.5, 0.5, 0.25) with p 0.8 (its four parts in random order), grayscale
    with p 0.2, Gaussian blur with sigma in [0.1, 2] with p 0.5."""
    import torchvision.transforms.functional as TF

    if rng.random() < 0.8:
        factors = {
            "brightness": rng.uniform(0.5, 1.5),
            "contrast": rng.uniform(0.5, 1.5),
            "saturation": rng.uniform(0.5, 1.5),
            "hue": rng.uniform(-0.25, 0.25),
        }
        adjust = {
            "brightness": TF.adjust_brightness,
            "contrast": TF.adjust_contrast,
            "saturation": TF.adjust_saturation,
            "hue": TF.adjust_hue,
        }
        for name in rng.permutation(list(factors)):
            view = adjust[str(name)](view, factors[str(name)])
    if rng.random() < 0.2:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if rng.random() < 0.5:
        sigma = rng.uniform(0.1, 2.0)
        kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * (view.shape[-1] // 2) - 1)
        view = TF.gaussian_blur(view, [kernel, kernel], [sigma, sigma])
    return view


def cutout_box(rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) as fractions of the view: each side 10-50% of the view's."""
    box_h, box_w = rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.5)
    top, left = rng.uniform(0, 1 - box_h), rng.uniform(0, 1 - box_w)
    return top, left, top + box_h, left + box_w


def box_mask(box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """(size, size) bool: the cells whose centres lie in ``box`` (fractions)."""
    centres = (torch.arange(size) + 0.5) / size
    rows = (centres >= box[0]) & (centres < box[2])
    cols = (centres >= box[1]) & (centres < box[3])
    return rows[:, None] & cols[None, :]


def make_views(
    image: np.ndarray, masks: np.ndarray, config: PixelClipConfig, rng: np.random.Generator
) -> Views:
    """Both views of one (H, W, 3) uint8 image and its (N, H, W) masks."""
    crop = random_crop(image.shape[0], image.shape[1], config, rng)
    weak = ssd_colour(crop_image(image, crop, config.image_size), rng)
    cropped = crop_masks(masks, crop, config.mask_size)
    box = cutout_box(rng)
    strong = strong_colour(weak, rng)
    strong = strong.masked_fill(box_mask(box, config.image_size), 0.0)
    cropped = cropped & ~box_mask(box, config.mask_size)
    kept = cropped.flatten(1).sum(dim=1) > 1
    return Views(weak, strong, cropped[kept])
