"""``fmbseg predict``: segment images with any list of class names.

For each image it writes ``<id>.png`` (palette label map, pixel value = class index) and
``<id>_overlay.png`` (the image blended with the labels, with a legend). Unreadable images are
reported and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmbseg.config import Params
from fmbseg.errors import InputError
from fmbseg.io.atomic import atomic_write
from fmbseg.io.images import image_id, list_images, read_rgb
from fmbseg.models.vocabulary import validate_vocabulary

log = logging.getLogger(__name__)


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(output id, path) for image files and every image below folders; ids must be unique."""
    found: dict[str, Path] = {}
    for item in map(Path, inputs):
        if item.is_dir():
            pairs = [(image_id(path, item), path) for path in list_images(item)]
        elif item.exists():
            pairs = [(item.stem, item)]
        else:
            raise InputError(f"{item}: no such image or folder")
        for key, path in pairs:
            if key in found:
                raise InputError(f"{path} and {found[key]} would both be written as {key!r}")
            found[key] = path
    if not found:
        raise InputError(f"no images found in {', '.join(map(str, inputs))}")
    return list(found.items())


def palette() -> np.ndarray:
    """(256, 3) uint8 colours, class index -> colour (the Pascal VOC colour map)."""
    import imgviz

    return imgviz.label_colormap()


def write_label_png(path: Path, labels: np.ndarray, count: int) -> None:
    """A palette PNG when the classes fit in 256 colours, else a 16-bit grey PNG."""
    from PIL import Image

    if count <= 256:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        image.putpalette(palette().flatten().tolist())
    else:
        image = Image.fromarray(labels.astype(np.uint16))
    with atomic_write(path) as handle:
        image.save(handle, format="PNG")


def write_overlay_png(
    path: Path, image: np.ndarray, labels: np.ndarray, names: Sequence[str]
) -> None:
    import imgviz
    from PIL import Image

    present = {int(k): names[int(k)] for k in np.unique(labels)}
    font_size = max(10, min(image.shape[:2]) // 30)
    overlay = imgviz.label2rgb(
        labels, image=image, label_names=present, colormap=palette(), font_size=font_size
    )
    with atomic_write(path) as handle:
        Image.fromarray(overlay).save(handle, format="PNG")


def run_predict(
    params: Params,
    inputs: Sequence[str | Path],
    class_names: Sequence[str],
    model: str | Path,
    out_dir: str | Path,
    *,
    show_progress: bool = True,
) -> dict[str, Any]:
    from tqdm import tqdm

    from fmbseg.registry import resolve_module
    from fmbseg.segmenter import load_segmenter

    names = validate_vocabulary(class_names)
    images = collect_images(inputs)
    segmenter = load_segmenter(params, resolve_module(model))
    out = Path(out_dir)
    failed: dict[str, str] = {}
    for key, path in tqdm(images, unit="img", desc="predict", disable=not show_progress):
        try:
            image = read_rgb(path)
        except InputError as exc:
            log.warning("skipped %s", exc)
            failed[key] = str(exc)
            continue
        labels = segmenter.segment(image, names).labels
        write_label_png(out / f"{key}.png", labels, len(names))
        write_overlay_png(out / f"{key}_overlay.png", image, labels, names)
    return {"images": len(images) - len(failed), "failed": failed, "out": str(out)}
