"""The benchmark registry: names, class lists shipped with the package, specs' invariants, and
the unlabelled training splits beside the benchmarks."""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath

import pytest

from fmbseg.datasets import Archive, coco_stuff_stuff_names, get_dataset_spec, list_datasets
from fmbseg.errors import InputError

EXPECTED_CLASSES = {
    "voc21": 21,
    "voc20": 20,
    "context59": 59,
    "context60": 60,
    "coco_object": 81,
    "coco_stuff": 171,
    "cityscapes": 19,
    "ade20k": 150,
}
# training split -> the benchmark whose vocabulary it is pseudo-labelled with
TRAINING_SPLITS = {
    "coco_train2017": "coco_stuff",
    "voc_train": "voc20",
    "context_train": "context59",
    "cityscapes_train": "cityscapes",
    "ade20k_train": "ade20k",
}


def test_the_eight_benchmarks_and_five_training_splits_are_registered() -> None:
    assert list_datasets() == sorted([*EXPECTED_CLASSES, *TRAINING_SPLITS])


def test_training_splits_have_no_masks_and_their_benchmarks_vocabulary() -> None:
    for name, benchmark in TRAINING_SPLITS.items():
        spec = get_dataset_spec(name)
        assert spec.layout is not None and spec.layout.masks is None
        assert spec.layout.split == "train"
        assert spec.class_names == get_dataset_spec(benchmark).class_names
        assert spec.background_index is None
    for name in EXPECTED_CLASSES:
        layout = get_dataset_spec(name).layout
        assert layout is not None and layout.masks is not None


def test_specs_sharing_an_archive_agree_on_it_and_need_disjoint_parts() -> None:
    """Same file, same source and checksum; and no member prefix nested in another's, which
    would make a parent folder pass for an extracted part."""
    by_file: dict[str, list[Archive]] = {}
    for name in list_datasets():
        for archive in get_dataset_spec(name).archives:
            by_file.setdefault(archive.filename, []).append(archive)
    assert len(by_file["ADEChallengeData2016.zip"]) == 2  # ade20k and ade20k_train
    for archives in by_file.values():
        first = archives[0]
        assert all(dataclasses.replace(a, members=first.members) == first for a in archives)
        prefixes = {PurePosixPath(p) for archive in archives for p in archive.members}
        for a in prefixes:
            assert not any(a != b and a in b.parents for b in prefixes), (first.filename, a)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_class_lists_ship_with_the_package_and_are_clean(name: str) -> None:
    spec = get_dataset_spec(name)
    assert spec.num_classes == EXPECTED_CLASSES[name]
    assert len(set(spec.class_names)) == spec.num_classes
    assert all(n and n == n.strip() for n in spec.class_names)
    assert spec.ignore_index == 255


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(InputError, match="unknown dataset 'voc' .*ade20k.*voc21"):
        get_dataset_spec("voc")


def test_background_class_is_exposed_where_the_protocol_has_one() -> None:
    backgrounds = {name: get_dataset_spec(name).background_index for name in EXPECTED_CLASSES}
    with_background = {"voc21", "context60", "coco_object"}
    assert backgrounds == {n: (0 if n in with_background else None) for n in backgrounds}
    for name in with_background:
        assert get_dataset_spec(name).class_names[0] == "background"


def test_pv20_is_pv21_without_background_and_co80_is_cs171s_things() -> None:
    assert get_dataset_spec("voc20").class_names == get_dataset_spec("voc21").class_names[1:]
    things = get_dataset_spec("coco_stuff").class_names[:80]
    assert get_dataset_spec("coco_object").class_names[1:] == things


def test_pc60_is_background_and_pc59_from_the_same_context_source() -> None:
    pc59, pc60 = get_dataset_spec("context59"), get_dataset_spec("context60")
    assert pc60.class_names[1:] == pc59.class_names
    assert (pc60.archives, pc60.layout) == (pc59.archives, pc59.layout)


def test_the_91_coco_stuff_stuff_names() -> None:
    stuff = coco_stuff_stuff_names()
    assert len(stuff) == 91
    assert (stuff[0], stuff[-1]) == ("banner", "wood")
    assert stuff == get_dataset_spec("coco_stuff").class_names[80:]
    assert "person" not in stuff


def test_pascal_context_classes_are_mmseg_alphabetical_order() -> None:
    names = get_dataset_spec("context59").class_names
    assert list(names) == sorted(names)


def test_only_cityscapes_needs_a_manual_download() -> None:
    manual = {
        name
        for name in list_datasets()
        if any(a.url is None for a in get_dataset_spec(name).archives)
    }
    assert manual == {"cityscapes", "cityscapes_train"}


def test_checksums_name_an_algorithm_and_a_source() -> None:
    for name in list_datasets():
        for archive in get_dataset_spec(name).archives:
            assert archive.checksum_source
            if archive.checksum is not None:
                algorithm, _, digest = archive.checksum.partition(":")
                width = {"md5": 32, "sha1": 40, "sha256": 64}[algorithm]
                assert len(digest) == width and int(digest, 16) >= 0
