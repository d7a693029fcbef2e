"""Segmentation from an ONNX export (:mod:`fmbseg.export`) on onnxruntime and numpy: no torch.

It follows the segmenter step for step (:mod:`fmbseg.geometry`'s rescale and windows,
half-pixel bilinear resampling without antialias, window scores averaged per pixel or per
patch, one last upsampling, argmax), so its label maps equal ``fmbseg predict``'s on the same
model and vocabulary up to float rounding. The vocabulary is the one exported (any subset of
it, in any order); new class names need the text model, hence torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmbseg.errors import InputError, WeightsError
from fmbseg.geometry import plan_inference
from fmbseg.resample import resample_bilinear, resize_uint8

EXPORT_FILE = "export.json"
EXPORT_FORMAT = "fmbseg-onnx-export"
IMAGE_FILE = "image_embedder.onnx"
TEXT_FILE = "text_embeddings.safetensors"


class OnnxSegmenter:
    """An export folder, verified against the sha256 of its files, ready to segment."""

    def __init__(self, folder: str | Path, batch_size: int = 4) -> None:
        import onnxruntime

        from fmbseg.config import InferenceConfig
        from fmbseg.io.atomic import sha256_file

        self.folder = Path(folder)
        record_file = self.folder / EXPORT_FILE
        try:
            self.record: dict[str, Any] = json.loads(record_file.read_text(encoding="utf-8"))
            if self.record.get("format") != EXPORT_FORMAT:
                raise ValueError(f"format is {self.record.get('format')!r}")
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{record_file}: not an fmbseg ONNX export ({exc})") from None
        for name, digest in self.record["files"].items():
            path = self.folder / name
            if not path.is_file() or sha256_file(path) != digest:
                raise WeightsError(f"{path}: missing, or its sha256 differs from {record_file}")
        self.config = InferenceConfig.model_validate(self.record["inference"])
        self.patch = int(self.record["patch_size"])
        self.vocabulary = tuple(self.record["vocabulary"])
        self.text = _read_text(self.folder / TEXT_FILE)
        self.session = onnxruntime.InferenceSession(
            str(self.folder / IMAGE_FILE), providers=["CPUExecutionProvider"]
        )
        self.batch_size = batch_size

    def rows(self, class_names: Sequence[str]) -> np.ndarray:
        """Indices into the exported vocabulary of ``class_names``."""
        missing = [name for name in class_names if name not in self.vocabulary]
        if missing:
            raise InputError(
                f"class {missing[0]!r} is not in the exported vocabulary "
                f"({', '.join(self.vocabulary)}); export again with it"
            )
        return np.array([self.vocabulary.index(name) for name in class_names])

    def score(self, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        """(K, H, W) cosine scores of an (H, W, 3) uint8 image against (K, D) embeddings."""
        height, width = image.shape[:2]
        config, patch = self.config, self.patch
        plan = plan_inference(height, width, config, patch)
        resized = resize_uint8(image, plan.resized_size).transpose(2, 0, 1) / np.float32(255)
        cells = config.aggregate == "patches" and config.mode == "sliding"
        unit = patch if cells else 1
        grid = (plan.resized_size[0] // unit, plan.resized_size[1] // unit)
        total = np.zeros((len(text), *grid), np.float32)
        counts = np.zeros((1, *grid), np.float32)
        for start in range(0, len(plan.windows), self.batch_size):
            chunk = plan.windows[start : start + self.batch_size]
            crops = np.stack([resized[:, t:b, le:r] for t, le, b, r in chunk]).astype(np.float32)
            for (top, left, bottom, right), scores in zip(
                chunk, self._score_regions(crops, text, cells), strict=True
            ):
                rows = slice(top // unit, bottom // unit)
                cols = slice(left // unit, right // unit)
                total[:, rows, cols] += scores
                counts[:, rows, cols] += 1
        return resample_bilinear(total / counts, (height, width))

    def _score_regions(self, crops: np.ndarray, text: np.ndarray, cells: bool) -> np.ndarray:
        patch = self.patch
        height, width = crops.shape[-2:]
        pad_h, pad_w = -height % patch, -width % patch
        padded = np.pad(crops, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))
        embeddings = self.session.run(None, {"windows": padded})[0]
        scores = np.einsum("bhwd,kd->bkhw", embeddings, text)
        if cells:
            return scores
        size = (height + pad_h, width + pad_w)
        if scores.shape[-2:] != size:
            scores = np.stack([resample_bilinear(one, size) for one in scores])
        return scores[:, :, :height, :width]

    def segment(self, image: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
        """(H, W) int64 indices into ``class_names``."""
        return self.score(image, self.text[self.rows(class_names)]).argmax(0)


def _read_text(path: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(path)["text_embeddings"].astype(np.float32)


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_FILE).is_file()
