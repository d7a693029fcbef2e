"""Raw annotation values -> contiguous class indices, one lookup table per benchmark.

Every standard conversion (reduce-zero-label, Cityscapes label ids -> train ids, COCO-Stuff's
182 ids -> 171 classes, ...) is a table from raw value to class index; a raw value the table
does not list becomes the ignore index. A *strict* table instead rejects unlisted values, which
is what a user's own, already contiguous masks need: a stray value there is a labelling error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


class UnknownLabelError(ValueError):
    """A strict table met raw values it does not list."""

    def __init__(self, values: Iterable[int]) -> None:
        self.values = sorted(int(v) for v in values)
        super().__init__(f"unexpected label values {self.values[:10]}")


@dataclass(frozen=True)
class LabelTransform:
    """A named table ``raw value -> class index``; unlisted values become the ignore index."""

    name: str
    table: tuple[tuple[int, int], ...]
    strict: bool = False
    _sources: np.ndarray = field(init=False, repr=False, compare=False)
    _targets: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pairs = np.asarray(self.table, dtype=np.int64).reshape(-1, 2)
        if (pairs < 0).any():
            raise ValueError(f"label transform {self.name!r}: negative value in table")
        object.__setattr__(self, "_sources", pairs[:, 0])
        object.__setattr__(self, "_targets", pairs[:, 1])

    def apply(self, raw: np.ndarray, ignore_index: int) -> np.ndarray:
        """int64 class indices; raises :class:`UnknownLabelError` for a strict table's strays."""
        values = np.asarray(raw)
        if values.dtype.kind not in "biu":
            raise ValueError(f"label values must be integers, got {values.dtype}")
        if values.size and int(values.min()) < 0:
            raise UnknownLabelError(np.unique(values[values < 0]))
        top = int(values.max()) if values.size else 0
        size = max(top, int(self._sources.max(initial=0))) + 1
        lut = np.full(size, -1, dtype=np.int64)
        lut[self._sources] = self._targets
        out = lut[values.astype(np.int64, copy=False)]
        unmapped = out < 0
        if self.strict:
            strays = unmapped & (values != ignore_index)
            if strays.any():
                raise UnknownLabelError(np.unique(values[strays]))
        out[unmapped] = ignore_index
        return out


def identity(num_classes: int) -> LabelTransform:
    """Masks that already hold 0..num_classes-1 (and the ignore index): anything else is an error."""
    return LabelTransform("identity", tuple((k, k) for k in range(num_classes)), strict=True)


def reduce_zero_label(num_classes: int) -> LabelTransform:
    """0 is 'unlabelled' (ignored) and class k is stored as k+1 (ADE20K, and PV-20's background)."""
    return LabelTransform("reduce_zero_label", tuple((k + 1, k) for k in range(num_classes)))


# Cityscapes label id -> train id for the 19 evaluated classes (cityscapesScripts
# helpers/labels.py); every other id (void, parking, rail track, guard rail, bridge, tunnel,
# polegroup, caravan, trailer) is ignored.
# fmt: off
CITYSCAPES_ID_TO_TRAIN_ID: tuple[tuple[int, int], ...] = (
    (7, 0), (8, 1), (11, 2), (12, 3), (13, 4), (17, 5), (19, 6), (20, 7), (21, 8), (22, 9),
    (23, 10), (24, 11), (25, 12), (26, 13), (27, 14), (28, 15), (31, 16), (32, 17), (33, 18),
)
# fmt: on

# COCO-Stuff stuffthingmaps store 0-based ids 0..181 (things 0..90, stuff 91..181) and 255 for
# 'unlabeled'. Eleven thing ids of COCO have no segmentation annotations and never occur.
COCO_UNUSED_THING_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_THING_IDS = tuple(i for i in range(91) if i not in COCO_UNUSED_THING_IDS)
COCO_STUFF_IDS = tuple(range(91, 182))
COCO_UNLABELED_ID = 255


def coco_stuff_171() -> LabelTransform:
    """The 80 thing and 91 stuff ids in id order -> 0..170 (mmseg's coco_stuff164k converter)."""
    ids = COCO_THING_IDS + COCO_STUFF_IDS
    return LabelTransform("coco_stuff_171", tuple((raw, k) for k, raw in enumerate(ids)))


def coco_object_81() -> LabelTransform:
    """Things -> 1..80, stuff *and* unlabeled -> 0 'background' (TCL/GroupViT's COCO-Object)."""
    table = [(raw, k + 1) for k, raw in enumerate(COCO_THING_IDS)]
    table += [(raw, 0) for raw in COCO_STUFF_IDS]
    table.append((COCO_UNLABELED_ID, 0))
    return LabelTransform("coco_object_81", tuple(table))


# PASCAL-Context: ids (1-based, in the official 459-class labels.txt, alphabetical) of the 59
# evaluated classes, ascending, so position k is class k of the alphabetical 59-class list
# that mmseg's PascalContextDataset59 uses. Id 0 (unlabelled) and the other 400 classes are
# ignored, as mmseg's reduce_zero_label does after its converter maps them to 0.
# fmt: off
PASCAL_CONTEXT_59_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105,
    113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308,
    324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454,
    458,
)
# fmt: on
PASCAL_CONTEXT_CLASSES = 459  # ids 1..459 in the official labels.txt, 0 unlabelled


def pascal_context_59() -> LabelTransform:
    return LabelTransform(
        "pascal_context_459_to_59", tuple((raw, k) for k, raw in enumerate(PASCAL_CONTEXT_59_IDS))
    )


def pascal_context_60() -> LabelTransform:
    """The 59 classes -> 1..59 and every other raw value (unlabelled, the other 400 classes)
    -> 0 'background': mmseg's PascalContextDataset (60 classes, no ignored pixels)."""
    foreground = {raw: k + 1 for k, raw in enumerate(PASCAL_CONTEXT_59_IDS)}
    return LabelTransform(
        "pascal_context_459_to_60",
        tuple((raw, foreground.get(raw, 0)) for raw in range(PASCAL_CONTEXT_CLASSES + 1)),
    )


def cityscapes_train_ids() -> LabelTransform:
    return LabelTransform("cityscapes_label_id_to_train_id", CITYSCAPES_ID_TO_TRAIN_ID)
