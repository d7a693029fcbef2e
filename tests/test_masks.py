"""Run-length encoding round trips, and painting order decides overlaps."""

from __future__ import annotations

import numpy as np
import pytest

from fmbseg.masks import IGNORE_LABEL, decode_rle, encode_rle, paint_label_map, rle_area


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (32, 32), (0, 5)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_rle_round_trip(shape: tuple[int, int], density: float) -> None:
    mask = np.random.default_rng(0).random(shape) < density
    runs = encode_rle(mask)
    assert np.array_equal(decode_rle(runs, *shape), mask)
    assert rle_area(runs) == mask.sum()


def test_rle_starts_with_zero_run_and_is_row_major() -> None:
    mask = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    assert encode_rle(mask).tolist() == [0, 2, 2, 2]


def test_rle_of_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 2x2"):
        decode_rle([1, 2], 2, 2)


def test_later_masks_win_and_unpainted_pixels_are_ignored() -> None:
    big = np.ones((4, 4), dtype=bool)
    small = np.zeros((4, 4), dtype=bool)
    small[1:3, 1:3] = True
    label_map = paint_label_map(
        5,
        4,
        [np.vstack([big, np.zeros((1, 4), bool)]), np.vstack([small, np.zeros((1, 4), bool)])],
        [3, 7],
    )
    assert label_map.dtype == np.uint16
    assert label_map[0, 0] == 3 and label_map[1, 1] == 7
    assert (label_map[4] == IGNORE_LABEL).all()
