"""The one on-disk layout that evaluation reads, for users' own data and converted benchmarks::

    root/images/<relative path>.<jpg|png|...>   any image format that read_rgb reads
    root/masks/<same relative path>.png          single-channel label PNG (8 or 16 bit)
    root/classes.txt                             one class name per line; line k is class k
    root/dataset.json                            optional: {"ignore_index": 255,
                                                 "background_index": null, "name": "..."}

An unlabelled training split has images, classes.txt (its vocabulary) and ``"has_masks": false``
in dataset.json, no masks; Stage 1 pseudo-labels it, and evaluation refuses it.

Masks hold class indices 0..N-1 and the ignore index; any other value is an error naming the
file. The download stage writes exactly this layout, so one evaluation path serves everything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fmbseg.datasets.labels import UnknownLabelError, identity
from fmbseg.datasets.registry import IGNORE_INDEX, DatasetSpec
from fmbseg.errors import InputError
from fmbseg.io.atomic import atomic_write
from fmbseg.io.images import DEFAULT_MAX_PIXELS, image_id, list_images, read_rgb
from fmbseg.models.vocabulary import read_vocabulary_file

IMAGES_DIR = "images"
MASKS_DIR = "masks"
CLASSES_FILE = "classes.txt"
META_FILE = "dataset.json"
HAS_MASKS_KEY = "has_masks"
MASK_SUFFIX = ".png"
_LABEL_MODES = {"L", "P", "1", "I", "I;16", "I;16L", "I;16B"}


class Sample(NamedTuple):
    image_id: str
    image_path: Path
    mask_path: Path


def read_label_array(path: str | Path) -> np.ndarray:
    """Raw label values of a single-channel PNG (palette indices, not colours) or of the
    ``LabelMap`` in a PASCAL-Context .mat file."""
    file = Path(path)
    if file.suffix.lower() == ".mat":
        return _read_mat_label_map(file)
    from PIL import Image

    try:
        with Image.open(file) as image:
            if image.mode not in _LABEL_MODES:
                raise InputError(
                    f"{file}: mask has mode {image.mode}; expected a single-channel label image "
                    "(class indices), not colours"
                )
            return np.asarray(image)
    except FileNotFoundError:
        raise InputError(f"{file}: no such mask") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{file}: cannot decode mask ({exc})") from None


def _read_mat_label_map(file: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(file)
    except FileNotFoundError:
        raise InputError(f"{file}: no such mask") from None
    except (OSError, ValueError, NotImplementedError) as exc:
        raise InputError(f"{file}: cannot read .mat file ({exc})") from None
    if "LabelMap" not in content:
        raise InputError(f"{file}: .mat file has no LabelMap")
    return np.asarray(content["LabelMap"])


def read_mask(path: str | Path, spec: DatasetSpec) -> np.ndarray:
    """(H, W) int64 class indices with ``spec``'s label transform applied; ignored pixels hold
    ``spec.ignore_index``."""
    raw = read_label_array(path)
    if raw.ndim != 2:
        raise InputError(f"{path}: mask has shape {raw.shape}; expected (height, width)")
    try:
        return spec.label_transform.apply(raw, spec.ignore_index)
    except UnknownLabelError as exc:
        raise InputError(
            f"{path}: label values {exc.values[:10]} are neither a class index "
            f"(0..{spec.num_classes - 1}) nor the ignore index {spec.ignore_index}"
        ) from None
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None


def write_mask(path: str | Path, labels: np.ndarray) -> None:
    """Save class indices as a PNG: 8 bit when every value fits, 16 bit otherwise (atomic)."""
    from PIL import Image

    values = np.asarray(labels)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"{path}: label values must lie in 0..65535")
    dtype = np.uint8 if values.size == 0 or values.max() <= 255 else np.uint16
    with atomic_write(path, "wb") as handle:
        Image.fromarray(values.astype(dtype)).save(handle, format="PNG")


def _read_meta(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{file}: expected a JSON object")
    return meta


def _optional_int(meta: dict[str, Any], key: str, default: int | None, file: Path) -> int | None:
    value = meta.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(f"{file}: {key} must be an integer, got {value!r}")
    return value


def folder_spec(root: str | Path) -> DatasetSpec:
    """The spec of a dataset in the folder layout: masks already hold class indices."""
    folder = Path(root)
    names = read_vocabulary_file(folder / CLASSES_FILE)
    meta_file = folder / META_FILE
    meta = _read_meta(meta_file)
    ignore_index = _optional_int(meta, "ignore_index", IGNORE_INDEX, meta_file)
    if ignore_index is None or not len(names) <= ignore_index <= 65535:
        raise InputError(
            f"{meta_file}: ignore_index {ignore_index} must lie in {len(names)}..65535 "
            f"(0..{len(names) - 1} are the classes of {CLASSES_FILE})"
        )
    background = _optional_int(meta, "background_index", None, meta_file)
    if background is not None and not 0 <= background < len(names):
        raise InputError(f"{meta_file}: background_index {background} is not a class index")
    name = meta.get("name", folder.name)
    return DatasetSpec(
        name=str(name),
        display_name=str(meta.get("display_name", name)),
        class_names=names,
        ignore_index=ignore_index,
        background_index=background,
        label_transform=identity(len(names)),
    )


class FolderDataset:
    """Images with their masks below ``root`` (or below ``images/<split>``), sorted by id.

    Iterating yields :class:`Sample` ``(image_id, image_path, mask_path)``; :meth:`read` loads
    one and checks that image and mask have the same size.
    """

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        self.root = Path(root)
        if _read_meta(self.root / META_FILE).get(HAS_MASKS_KEY) is False:
            raise InputError(
                f"{self.root}: has no masks: an unlabelled training set (images and a vocabulary "
                "to pseudo-label); evaluate on a labelled split"
            )
        self.spec = folder_spec(self.root)
        sub = Path(split) if split else Path()
        self.image_dir = self.root / IMAGES_DIR / sub
        self.mask_dir = self.root / MASKS_DIR / sub
        self.samples = self._pair(list_images(self.image_dir))

    def _pair(self, images: list[Path]) -> tuple[Sample, ...]:
        samples: dict[str, Sample] = {}
        missing: list[Sample] = []
        for path in images:
            key = image_id(path, self.image_dir)
            if key in samples:
                raise InputError(f"{path}: same id {key!r} as {samples[key].image_path}")
            sample = Sample(key, path, self.mask_dir / f"{key}{MASK_SUFFIX}")
            samples[key] = sample
            if not sample.mask_path.is_file():
                missing.append(sample)
        if missing:
            first = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(f"{first.mask_path}: mask missing for {first.image_path}{more}")
        return tuple(samples.values())

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def read(
        self, sample: Sample, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB and (H, W) int64 labels; a size mismatch is an InputError.

        Images keep their stored orientation (no EXIF rotation): masks are drawn on it.
        """
        image = read_rgb(sample.image_path, max_pixels=max_pixels, exif_transpose=False)
        mask = read_mask(sample.mask_path, self.spec)
        if image.shape[:2] != mask.shape:
            raise InputError(
                f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{sample.image_path} is {image.shape[1]}x{image.shape[0]}"
            )
        return image, mask
