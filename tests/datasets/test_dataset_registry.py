"""The benchmark registry: names, class lists shipped with the package, specs' invariants."""

from __future__ import annotations

import pytest

from fmbseg.datasets import coco_stuff_stuff_names, get_dataset_spec, list_datasets
from fmbseg.errors import InputError

EXPECTED_CLASSES = {
    "voc21": 21,
    "voc20": 20,
    "context59": 59,
    "coco_object": 81,
    "coco_stuff": 171,
    "cityscapes": 19,
    "ade20k": 150,
}


def test_the_seven_benchmarks_are_registered() -> None:
    assert list_datasets() == sorted(EXPECTED_CLASSES)


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
    assert backgrounds == {n: (0 if n in {"voc21", "coco_object"} else None) for n in backgrounds}
    assert get_dataset_spec("voc21").class_names[0] == "background"
    assert get_dataset_spec("coco_object").class_names[0] == "background"


def test_pv20_is_pv21_without_background_and_co80_is_cs171s_things() -> None:
    assert get_dataset_spec("voc20").class_names == get_dataset_spec("voc21").class_names[1:]
    things = get_dataset_spec("coco_stuff").class_names[:80]
    assert get_dataset_spec("coco_object").class_names[1:] == things


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
        for name in EXPECTED_CLASSES
        if any(a.url is None for a in get_dataset_spec(name).archives)
    }
    assert manual == {"cityscapes"}


def test_checksums_name_an_algorithm_and_a_source() -> None:
    for name in EXPECTED_CLASSES:
        for archive in get_dataset_spec(name).archives:
            assert archive.checksum_source
            if archive.checksum is not None:
                algorithm, _, digest = archive.checksum.partition(":")
                width = {"md5": 32, "sha1": 40, "sha256": 64}[algorithm]
                assert len(digest) == width and int(digest, 16) >= 0
