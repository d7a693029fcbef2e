"""Where an image is scored: mmseg's keep-ratio rescale and sliding windows, as pure arithmetic.

No numpy or torch here, so the torch-free ONNX runtime plans exactly as the segmenter does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fmbseg.errors import ConfigError

if TYPE_CHECKING:
    from fmbseg.config import InferenceConfig


def slide_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window starts along one axis as mmseg's ``slide_inference`` places them: every
    ``stride`` pixels, the last snapped back to end at the border, and a single window (the
    whole axis, shorter than ``crop``) when the axis is shorter than a crop."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]


def rescale_size(height: int, width: int, short_side: int, long_side: int) -> tuple[int, int]:
    """(H', W') of mmcv's keep-ratio ``rescale_size`` for ``img_scale=(long_side, short_side)``."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass(frozen=True)
class WindowPlan:
    """Where one image is scored, in the rescaled image's pixels."""

    resized_size: tuple[int, int]  # (H', W')
    windows: tuple[tuple[int, int, int, int], ...]  # (top, left, bottom, right)


def plan_inference(height: int, width: int, config: InferenceConfig, patch: int) -> WindowPlan:
    """The rescaled size and the windows of an (height, width) image under ``config``."""
    if config.mode == "whole" and config.square_side is not None:
        side = config.square_side
        return WindowPlan((side, side), ((0, 0, side, side),))
    size = rescale_size(height, width, config.short_side, config.long_side)
    if config.mode == "whole":
        return WindowPlan(size, ((0, 0, *size),))
    window, stride = config.window, config.stride
    if window % patch:
        raise ConfigError(
            f"inference.window: {window} must be a multiple of the encoder's patch size {patch}"
        )
    if config.aggregate == "patches":
        if stride % patch:
            raise ConfigError(
                f"inference.stride: {stride} must be a multiple of the patch size {patch} with "
                "inference.aggregate=patches"
            )
        size = (
            max(window, round(size[0] / patch) * patch),
            max(window, round(size[1] / patch) * patch),
        )
    rows = [(top, min(top + window, size[0])) for top in slide_starts(size[0], window, stride)]
    cols = [(left, min(left + window, size[1])) for left in slide_starts(size[1], window, stride)]
    return WindowPlan(size, tuple((t, le, b, r) for t, b in rows for le, r in cols))
