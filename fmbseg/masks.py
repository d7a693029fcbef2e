"""Binary masks as run lengths, and label maps painted from labelled masks.

Run-length encoding is row-major and starts with a run of zeros (possibly empty), so a mask
of any size is a short int array that Parquet stores compactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_LABEL = 65535  # label-map value of pixels no mask labels (label maps are uint16)


def encode_rle(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> int32 run lengths, alternating 0-runs and 1-runs, 0-run first."""
    flat = np.asarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        return np.zeros(1, dtype=np.int32)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs.astype(np.int32)


def decode_rle(runs: Sequence[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`encode_rle`."""
    counts = np.asarray(runs, dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"run lengths sum to {counts.sum()}, expected {height}x{width}")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(height, width)


def rle_area(runs: Sequence[int] | np.ndarray) -> int:
    return int(np.asarray(runs, dtype=np.int64)[1::2].sum())


def paint_label_map(
    height: int, width: int, masks: Sequence[np.ndarray], labels: Sequence[int]
) -> np.ndarray:
    """Paint masks in the given order onto an ignore-filled uint16 map; later masks win."""
    label_map = np.full((height, width), IGNORE_LABEL, dtype=np.uint16)
    for mask, label in zip(masks, labels, strict=True):
        label_map[mask] = label
    return label_map
