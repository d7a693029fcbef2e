"""The image table of a dataset split: what the pipeline will read, checked before it does.

``manifest.parquet`` has one row per image file: ``image_id``, ``path`` (relative to the
dataset folder), ``split``, ``width``, ``height``, ``decodable``, ``error``, ``bytes``. Every
image is fully decoded once here, so later stages meet no surprise.

Beside it, ``classes.txt`` is the vocabulary the training split is pseudo-labelled with: the
``data.vocabulary`` param when set, else the dataset folder's own ``classes.txt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fmbseg.errors import InputError
from fmbseg.io.atomic import atomic_write, write_text_atomic
from fmbseg.io.images import DEFAULT_MAX_PIXELS, image_id, list_images, read_rgb
from fmbseg.models.vocabulary import read_vocabulary_file, validate_vocabulary

MANIFEST_FILE = "manifest.parquet"
VOCABULARY_FILE = "classes.txt"


def training_vocabulary(dataset_dir: str | Path, names: Sequence[str] | None) -> tuple[str, ...]:
    """``names`` (the ``data.vocabulary`` param) when given, else the folder's classes.txt."""
    if names is not None:
        return validate_vocabulary(names)
    file = Path(dataset_dir) / VOCABULARY_FILE
    if not file.is_file():
        raise InputError(
            f"{file}: no class names for pseudo-labelling; write the classes to look for there "
            "(one per line) or set data.vocabulary: [name, ...] in params.yaml"
        )
    return read_vocabulary_file(file)


def write_vocabulary(names: Sequence[str], out_dir: str | Path) -> Path:
    target = Path(out_dir) / VOCABULARY_FILE
    write_text_atomic(target, "".join(f"{name}\n" for name in names))
    return target


def build_manifest(
    dataset_dir: str | Path, splits: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, list[Any]]:
    root = Path(dataset_dir)
    columns: dict[str, list[Any]] = {
        name: []
        for name in ("image_id", "path", "split", "width", "height", "decodable", "error", "bytes")
    }
    for split in splits:
        images_root = root / "images" / split
        if not images_root.is_dir():
            raise InputError(
                f"{images_root}: split {split!r} has no image folder (a dataset folder holds "
                "its images in images/<split>/)"
            )
        for path in list_images(images_root):
            try:
                height, width = read_rgb(path, max_pixels).shape[:2]
                error = None
            except InputError as exc:
                height = width = 0
                error = str(exc)
            columns["image_id"].append(image_id(path, images_root))
            columns["path"].append(path.relative_to(root).as_posix())
            columns["split"].append(split)
            columns["width"].append(width)
            columns["height"].append(height)
            columns["decodable"].append(error is None)
            columns["error"].append(error)
            columns["bytes"].append(path.stat().st_size)
    return columns


def write_manifest(columns: dict[str, list[Any]], out_dir: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("image_id", pa.string()),
            ("path", pa.string()),
            ("split", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("decodable", pa.bool_()),
            ("error", pa.string()),
            ("bytes", pa.int64()),
        ]
    )
    target = Path(out_dir) / MANIFEST_FILE
    with atomic_write(target) as handle:
        pq.write_table(pa.Table.from_pydict(columns, schema=schema), handle)
    return target
