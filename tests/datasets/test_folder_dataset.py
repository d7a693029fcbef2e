"""The generic folder layout: pairing images with masks, and every way it can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmbseg.datasets import FolderDataset, folder_spec, read_mask, write_mask
from fmbseg.errors import InputError


def put_image(path: Path, width: int = 4, height: int = 3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path)


def put_mask(path: Path, labels: list[list[int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array(labels, dtype=np.uint8)).save(path)


MASK_4x3 = [[0, 1, 2, 255]] * 3


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "classes.txt").write_text("sky\ntree\nroad\n", encoding="utf-8")
    put_image(tmp_path / "images" / "b.jpg")
    put_image(tmp_path / "images" / "sub" / "a.png")
    put_mask(tmp_path / "masks" / "b.png", MASK_4x3)
    put_mask(tmp_path / "masks" / "sub" / "a.png", MASK_4x3)
    return tmp_path


def test_yields_id_image_and_mask_sorted(root: Path) -> None:
    dataset = FolderDataset(root)
    assert [tuple(s) for s in dataset] == [
        ("b", root / "images" / "b.jpg", root / "masks" / "b.png"),
        ("sub/a", root / "images" / "sub" / "a.png", root / "masks" / "sub" / "a.png"),
    ]
    assert len(dataset) == 2
    assert dataset.spec.class_names == ("sky", "tree", "road")
    assert dataset.spec.ignore_index == 255


def test_read_gives_rgb_and_labels(root: Path) -> None:
    dataset = FolderDataset(root)
    image, labels = dataset.read(dataset.samples[0])
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8
    assert labels.tolist() == MASK_4x3 and labels.dtype == np.int64


def test_missing_mask_names_the_mask_and_its_image(root: Path) -> None:
    (root / "masks" / "sub" / "a.png").unlink()
    with pytest.raises(InputError, match=r"masks/sub/a\.png: mask missing for .*images/sub/a\.png"):
        FolderDataset(root)


def test_size_mismatch_is_found_when_the_pair_is_read(root: Path) -> None:
    put_mask(root / "masks" / "b.png", [[0, 1], [1, 0]])
    dataset = FolderDataset(root)  # listing does not decode anything
    with pytest.raises(InputError, match=r"masks/b\.png: mask is 2x2 but image .*b\.jpg is 4x3"):
        dataset.read(dataset.samples[0])
    dataset.read(dataset.samples[1])  # the other pair is fine


def test_a_value_that_is_neither_class_nor_ignore_names_the_file(root: Path) -> None:
    put_mask(root / "masks" / "b.png", [[0, 1, 2, 7]] * 3)
    dataset = FolderDataset(root)
    with pytest.raises(InputError, match=r"b\.png: label values \[7\]"):
        dataset.read(dataset.samples[0])


def test_dataset_json_sets_ignore_and_background(root: Path) -> None:
    (root / "dataset.json").write_text(json.dumps({"ignore_index": 7, "background_index": 0}))
    put_mask(root / "masks" / "b.png", [[0, 1, 2, 7]] * 3)
    dataset = FolderDataset(root)
    assert (dataset.spec.ignore_index, dataset.spec.background_index) == (7, 0)
    assert dataset.read(dataset.samples[0])[1].tolist() == [[0, 1, 2, 7]] * 3


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"ignore_index": 2}, "ignore_index 2 must lie in 3..65535"),
        ({"ignore_index": "255"}, "ignore_index must be an integer"),
        ({"background_index": 3}, "background_index 3 is not a class index"),
    ],
)
def test_bad_dataset_json_is_refused(root: Path, meta: dict, message: str) -> None:
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=message):
        folder_spec(root)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sky\n\nroad\n", "line 2 is blank"),
        ("sky\nsky\n", "duplicate class name"),
        ("", "no class names given"),
    ],
)
def test_bad_class_lists_are_refused(root: Path, text: str, message: str) -> None:
    (root / "classes.txt").write_text(text)
    with pytest.raises(InputError, match=message):
        folder_spec(root)


def test_missing_class_list_is_named(root: Path) -> None:
    (root / "classes.txt").unlink()
    with pytest.raises(InputError, match=r"classes\.txt: class-name file not found"):
        FolderDataset(root)


def test_split_restricts_to_one_subfolder(root: Path) -> None:
    assert [s.image_id for s in FolderDataset(root, split="sub")] == ["a"]


def test_palette_masks_are_read_as_indices_not_colours(tmp_path: Path) -> None:
    mask = Image.new("P", (2, 2))
    mask.putdata([0, 1, 2, 255])
    mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
    mask.save(tmp_path / "m.png")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    assert read_mask(tmp_path / "m.png", folder_spec(tmp_path)).tolist() == [[0, 1], [2, 255]]


def test_colour_masks_are_refused(tmp_path: Path) -> None:
    put_image(tmp_path / "m.png")
    (tmp_path / "classes.txt").write_text("a\n")
    with pytest.raises(InputError, match="mode RGB; expected a single-channel"):
        read_mask(tmp_path / "m.png", folder_spec(tmp_path))


def test_more_than_255_classes_round_trip_through_16_bit_pngs(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("".join(f"c{k}\n" for k in range(400)))
    (tmp_path / "dataset.json").write_text(json.dumps({"ignore_index": 65535}))
    labels = np.array([[0, 255, 399], [300, 65535, 1]])
    write_mask(tmp_path / "m.png", labels)
    assert read_mask(tmp_path / "m.png", folder_spec(tmp_path)).tolist() == labels.tolist()


def test_an_unlabelled_training_set_is_refused_for_evaluation(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("sky\ntree\n")
    (tmp_path / "dataset.json").write_text(json.dumps({"has_masks": False}))
    put_image(tmp_path / "images" / "train" / "a.jpg")
    with pytest.raises(InputError) as error:
        FolderDataset(tmp_path, split="train")
    assert str(error.value).startswith(f"{tmp_path}: has no masks: an unlabelled training set")
    assert "\n" not in str(error.value)
    assert folder_spec(tmp_path).class_names == ("sky", "tree")  # its vocabulary still reads
