"""Raw benchmark annotations -> class indices, checked on tiny hand-made label arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmbseg.datasets import get_dataset_spec, read_mask
from fmbseg.errors import InputError

I = 255  # the ignore index, short so the tables below stay readable


def convert(name: str, raw: list[list[int]], dtype: type = np.uint8) -> np.ndarray:
    spec = get_dataset_spec(name)
    return spec.label_transform.apply(np.array(raw, dtype=dtype), spec.ignore_index)


def test_cityscapes_label_ids_become_the_19_train_ids() -> None:
    raw = [[0, 7, 8], [26, 33, 29], [15, 24, 255]]  # unlabeled road sidewalk / car bicycle caravan
    assert convert("cityscapes", raw).tolist() == [[I, 0, 1], [13, 18, I], [I, 11, I]]
    names = get_dataset_spec("cityscapes").class_names
    assert (names[0], names[13], names[18], names[11]) == ("road", "car", "bicycle", "person")


def test_coco_stuff_ids_become_171_contiguous_classes() -> None:
    raw = [[0, 12, 80], [91, 181, 255], [11, 90, 182]]
    assert convert("coco_stuff", raw).tolist() == [[0, 11, 71], [80, 170, I], [I, I, I]]
    names = get_dataset_spec("coco_stuff").class_names
    assert (names[11], names[71], names[80], names[170]) == ("stop sign", "sink", "banner", "wood")


def test_coco_object_keeps_things_and_makes_stuff_and_unlabeled_background() -> None:
    raw = [[0, 80, 91], [181, 255, 11]]
    assert convert("coco_object", raw).tolist() == [[1, 72, 0], [0, 0, I]]
    names = get_dataset_spec("coco_object").class_names
    assert (names[1], names[72]) == ("person", "sink")


def test_ade20k_reduces_the_zero_label() -> None:
    assert convert("ade20k", [[0, 1, 150], [151, 255, 7]]).tolist() == [[I, 0, 149], [I, I, 6]]
    assert get_dataset_spec("ade20k").class_names[7] == "bed"


def test_pv20_ignores_background_and_shifts_the_classes() -> None:
    assert convert("voc20", [[0, 1, 20], [15, 255, 0]]).tolist() == [[I, 0, 19], [14, I, I]]
    assert get_dataset_spec("voc20").class_names[14] == "person"


def test_pv21_keeps_background_and_borders_stay_ignored() -> None:
    assert convert("voc21", [[0, 1, 20], [15, 255, 0]]).tolist() == [[0, 1, 20], [15, I, 0]]


def test_pascal_context_459_ids_become_the_59_classes() -> None:
    raw = [[0, 2, 9], [458, 1, 284]]  # unlabeled aeroplane bag / wood accordion person
    out = convert("context59", raw, dtype=np.uint16)
    assert out.tolist() == [[I, 0, 1], [58, I, 36]]
    names = get_dataset_spec("context59").class_names
    assert (names[0], names[1], names[36], names[58]) == ("aeroplane", "bag", "person", "wood")


def test_pascal_context_60_counts_unlabelled_and_the_other_400_as_background() -> None:
    raw = [[0, 2, 9], [458, 1, 284], [459, 3, 2]]  # 1 accordion, 3 and 459: not among the 59
    out = convert("context60", raw, dtype=np.uint16)
    assert out.tolist() == [[0, 1, 2], [59, 0, 37], [0, 0, 1]]
    assert get_dataset_spec("context60").ignore_index not in out


def test_read_mask_rejects_a_value_that_is_no_class_of_an_exact_dataset(tmp_path: Path) -> None:
    mask = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 21]], dtype=np.uint8)).save(mask)
    with pytest.raises(InputError, match=r"m\.png: label values \[21\]"):
        read_mask(mask, get_dataset_spec("voc21"))


def test_read_mask_returns_int64_with_the_transform_applied(tmp_path: Path) -> None:
    mask = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1], [150, 0]], dtype=np.uint8)).save(mask)
    labels = read_mask(mask, get_dataset_spec("ade20k"))
    assert labels.dtype == np.int64
    assert labels.tolist() == [[I, 0], [149, I]]
