"""Image and score resampling in numpy, shared by the torch segmenter and the torch-free ONNX
runtime so both see the same pixels."""

from __future__ import annotations

import numpy as np

RESIZE_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: bilinear weights in 1/2048


def _linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's half-pixel taps along one axis: the two source indices of each output pixel and
    the fixed-point weight of the second (the first's is 2048 minus it), clamped at borders."""
    position = ((np.arange(target, dtype=np.float64) + 0.5) * (source / target) - 0.5).astype(
        np.float32
    )
    first = np.floor(position)
    fraction = position - first
    first = first.astype(np.int64)
    fraction[(first < 0) | (first >= source - 1)] = 0.0
    first = first.clip(0, source - 1)
    weight = np.round(fraction * (1 << RESIZE_COEF_BITS)).astype(np.int32)
    return first, np.minimum(first + 1, source - 1), weight


def resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C) uint8 as mmcv's ``imresize`` (OpenCV ``INTER_LINEAR`` on
    uint8) returns it: half-pixel bilinear without antialias in OpenCV's fixed-point arithmetic
    (11-bit weights, the rounding of its vectorised vertical pass). Integer arithmetic also
    makes the result independent of the thread count, which float interpolation rounded to
    uint8 is not."""
    # int32 holds every intermediate: 255 * 2048 across, then (that >> 4) * 2048 down.
    pixels = image.astype(np.int32)
    rows_a, rows_b, row_weight = _linear_taps(image.shape[0], size[0])
    cols_a, cols_b, col_weight = _linear_taps(image.shape[1], size[1])
    one = np.int32(1 << RESIZE_COEF_BITS)
    weight = col_weight[None, :, None]
    across = (pixels[:, cols_a] * (one - weight) + pixels[:, cols_b] * weight) >> 4
    weight = row_weight[:, None, None]
    top = (across[rows_a] * (one - weight)) >> 16
    bottom = (across[rows_b] * weight) >> 16
    return ((top + bottom + 2) >> 2).clip(0, 255).astype(np.uint8)


def _source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's half-pixel source coordinates (``align_corners=False``): left index, right
    index and the right neighbour's weight for every output position."""
    scale = np.float32(in_size / out_size)
    source = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + 0.5) - 0.5, 0)
    left = np.minimum(source.astype(np.int64), in_size - 1)
    right = np.minimum(left + 1, in_size - 1)
    return left, right, (source - left).astype(np.float32)


def resample_bilinear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float32 -> (C, H, W): ``F.interpolate(mode="bilinear", antialias=False)``."""
    height, width = size
    top, bottom, dy = _source_index(height, array.shape[1])
    left, right, dx = _source_index(width, array.shape[2])
    rows = array[:, top] * (1 - dy)[None, :, None] + array[:, bottom] * dy[None, :, None]
    return rows[:, :, left] * (1 - dx) + rows[:, :, right] * dx
