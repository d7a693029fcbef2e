"""The class folds of the few-/zero-shot protocols Fusioner reports (PASCAL-5i, COCO-20i).

A fold's *novel* classes are held out of training and are the only ones queried at test time.
PASCAL-5i: fold i holds VOC ids 5i+1 ... 5i+5 (aeroplane ... bottle for fold 0). COCO-20i: fold
i holds the interleaved COCO ids i+1, i+5, ..., i+77 (person, aeroplane, boat, ... for fold 0).
Ids count from 1 in the standard class order (fmbseg/datasets/classes/voc21.txt,
coco_object.txt, whose line 0 is background).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from fmbseg.errors import ConfigError

FOLDS = 4
PROTOCOLS = ("pascal5i", "coco20i")


@cache
def _classes(protocol: str) -> tuple[str, ...]:
    """Foreground classes in id order (id = position + 1)."""
    from fmbseg.datasets.registry import read_packaged_class_names

    return read_packaged_class_names("voc21" if protocol == "pascal5i" else "coco_object")[1:]


def novel_classes(protocol: str, fold: int) -> tuple[str, ...]:
    """The class names fold ``fold`` of ``protocol`` holds out (5 for PASCAL, 20 for COCO)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if not 0 <= fold < FOLDS:
        raise ConfigError(f"{protocol} fold {fold}: expected 0..{FOLDS - 1}")
    names = _classes(protocol)
    if protocol == "pascal5i":
        ids = range(5 * fold + 1, 5 * fold + 6)
    else:
        ids = range(fold + 1, len(names) + 1, FOLDS)
    return tuple(names[i - 1] for i in ids)


def parse_holdout(text: str) -> tuple[str, int]:
    """``"pascal5i:0"`` -> ("pascal5i", 0); a :class:`ConfigError` otherwise."""
    protocol, sep, fold = text.partition(":")
    if not sep or protocol not in PROTOCOLS or not fold.isdigit():
        raise ConfigError(
            f"train.fusioner.holdout={text!r}: expected <protocol>:<fold> with protocol one of "
            f"{', '.join(PROTOCOLS)}, e.g. pascal5i:0"
        )
    return protocol, int(fold)


def name_key(name: str) -> str:
    """Spelling-insensitive class key: "Potted Plant", "potted_plant", "pottedplant" agree."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def matching(vocabulary: Iterable[str], names: Iterable[str]) -> set[int]:
    """Indices of ``vocabulary`` whose name matches one of ``names`` (by :func:`name_key`)."""
    keys = {name_key(name) for name in names}
    return {index for index, name in enumerate(vocabulary) if name_key(name) in keys}
