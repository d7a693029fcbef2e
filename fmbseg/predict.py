"""``fmbseg predict``: segment images with any list of class names.

For each image it writes ``<id>.png`` (palette label map, pixel value = class index) and
``<id>_overlay.png`` (the image blended with the labels, with a legend), and once
``classes.json`` (label value -> class name). Unreadable images are reported and skipped; the
summary lists them and the command exits non-zero.

A local trained folder runs with the given params; a registry model (``models:/...``) runs
with the ``models`` and ``inference`` params it was registered with, exactly as when served.
"""

from __future__ import annotations

import colorsys
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.config import InferenceConfig, Params
from fmbseg.errors import InputError
from fmbseg.io.atomic import atomic_write, write_text_atomic
from fmbseg.io.images import image_id, list_images, read_rgb
from fmbseg.models.vocabulary import validate_vocabulary

if TYPE_CHECKING:
    from fmbseg.segmenter import OpenVocabularySegmenter

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"


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


def label_palette(count: int) -> np.ndarray:
    """(count, 3) uint8 colours, class index -> colour: bright saturated colours only (no
    black, grey or white, so no class looks like shadow or like the image's own muted
    colours), each as far from the ones before it as the set allows, so the few classes of a
    typical vocabulary are the easiest to tell apart. A class keeps its colour for any count."""
    order = _palette_order()
    return np.resize(order, (count, 3)) if count > len(order) else order[:count].copy()


@functools.cache
def _palette_order() -> np.ndarray:
    """Farthest-point order (from pure red) over 72 hues x 2 saturations x 2 brightnesses."""
    candidates = np.array(
        [
            colorsys.hsv_to_rgb(hue / 72, saturation, value)
            for hue in range(72)
            for saturation in (0.95, 0.7)
            for value in (1.0, 0.8)
        ]
    )
    candidates = np.round(candidates * 255)
    order = [0]
    distance = np.linalg.norm(candidates - candidates[0], axis=1)
    for _ in range(len(candidates) - 1):
        chosen = int(distance.argmax())
        order.append(chosen)
        distance = np.minimum(distance, np.linalg.norm(candidates - candidates[chosen], axis=1))
    return candidates[order].astype(np.uint8)


def write_label_png(path: Path, labels: np.ndarray, count: int) -> None:
    """A palette PNG when the classes fit in 256 colours, else a 16-bit grey PNG."""
    from PIL import Image

    if count <= 256:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        image.putpalette(label_palette(count).flatten().tolist())
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
        labels,
        image=image,
        label_names=present,
        colormap=label_palette(len(names)),
        font_size=font_size,
    )
    with atomic_write(path) as handle:
        Image.fromarray(overlay).save(handle, format="PNG")


def open_model(
    params: Params, model: str | Path, *, inference: InferenceConfig | None = None
) -> tuple[OpenVocabularySegmenter, Params]:
    """The segmenter of a trained folder (with ``params``) or of a registry model (with its
    registered params, its files and weights checked), and the params it runs with. Evaluation
    gives ``inference``: its protocol's settings then replace either's."""
    from fmbseg.registry import resolve_model
    from fmbseg.segmenter import load_segmenter
    from fmbseg.serving import SERVING_FILE, load_registered

    folder = resolve_model(model)
    if (folder / SERVING_FILE).is_file():
        return load_registered(folder, inference)
    if inference is not None:
        params = params.model_copy(update={"inference": inference})
    return load_segmenter(params, folder), params


def write_classes(out: Path, names: Sequence[str]) -> None:
    """``classes.json`` (label value -> name); refuses a folder predicted with other classes,
    whose label PNGs would then mean two things."""
    file = out / CLASSES_FILE
    mapping = {str(index): name for index, name in enumerate(names)}
    if file.is_file():
        try:
            previous = json.loads(file.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
        if previous != mapping:
            raise InputError(
                f"{file}: the folder holds predictions for other classes; "
                "choose another --out or empty it"
            )
    write_text_atomic(file, json.dumps(mapping, indent=2, ensure_ascii=False) + "\n")


def _labeller(
    params: Params, model: str | Path, names: tuple[str, ...], background: str | None
) -> Callable[[np.ndarray], np.ndarray]:
    """image -> label map, with a trained or registered model, or an ONNX export folder
    (onnxruntime and numpy alone, no torch)."""
    from fmbseg.onnx_runtime import OnnxSegmenter, is_export

    if is_export(model):
        if background is not None:
            raise InputError(f"{model}: --background is not available with an ONNX export")
        runtime = OnnxSegmenter(model)
        runtime.rows(names)  # unknown class names fail before any image is read
        return lambda image: runtime.segment(image, names)
    from fmbseg.protocols import background_rule

    segmenter, used = open_model(params, model)
    rule = background_rule(used.inference, names, background)
    return lambda image: segmenter.segment(image, names, rule).labels


def run_predict(
    params: Params,
    inputs: Sequence[str | Path],
    class_names: Sequence[str],
    model: str | Path,
    out_dir: str | Path,
    *,
    background: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Segment every image; ``failed`` in the summary maps the ones that could not be read
    to why."""
    from tqdm import tqdm

    names = validate_vocabulary(class_names)
    images = collect_images(inputs)
    segment = _labeller(params, model, names, background)
    out = Path(out_dir)
    write_classes(out, names)
    failed: dict[str, str] = {}
    for key, path in tqdm(images, unit="img", desc="predict", disable=not show_progress):
        try:
            image = read_rgb(path)
        except InputError as exc:
            log.warning("skipped %s", exc)
            failed[key] = str(exc)
            continue
        labels = segment(image)
        write_label_png(out / f"{key}.png", labels, len(names))
        write_overlay_png(out / f"{key}_overlay.png", image, labels, names)
    return {"images": len(images) - len(failed), "failed": failed, "out": str(out)}
