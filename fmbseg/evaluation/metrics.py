"""Semantic-segmentation metrics from a streaming confusion matrix.

The matrix (rows: ground truth, columns: prediction) is all the state there is, so memory stays
N x N however large the dataset, partial matrices from several workers merge by addition, and
every metric is computed at the end. IoU follows the standard (mmseg) convention: a class with
an empty union -- absent from both ground truth and prediction -- has IoU NaN and is left out of
the mean. Metrics are fractions in [0, 1].
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmbseg.errors import InputError
from fmbseg.io.atomic import atomic_write, write_text_atomic


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        """Count one batch (any shape, equal for both); target pixels at the ignore index are
        skipped."""
        pred, true = np.asarray(prediction), np.asarray(target)
        if pred.shape != true.shape:
            raise ValueError(f"prediction shape {pred.shape} != target shape {true.shape}")
        keep = true != self.ignore_index
        pred, true = pred[keep].astype(np.int64), true[keep].astype(np.int64)
        n = self.num_classes
        for name, values in (("target", true), ("prediction", pred)):
            bad = (values < 0) | (values >= n)
            if bad.any():
                raise ValueError(f"{name} holds {int(values[bad][0])}, outside 0..{n - 1}")
        self.matrix += np.bincount(true * n + pred, minlength=n * n).reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts (e.g. another worker's) into this matrix; returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) "
                f"into a {self.num_classes}-class one (ignore {self.ignore_index})"
            )
        self.matrix += other.matrix
        return self

    def iou(self) -> np.ndarray:
        """Per-class intersection over union; NaN where the class is in neither map."""
        intersection = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - intersection
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, intersection / union, np.nan)

    def mean_iou(self) -> float:
        values = self.iou()
        present = values[~np.isnan(values)]
        return float(present.mean()) if present.size else math.nan

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else math.nan

    def per_class_table(self, class_names: Sequence[str]) -> list[dict[str, Any]]:
        """One row per class: name, IoU (None when absent), ground-truth and predicted pixels."""
        self._check_names(class_names)
        iou = self.iou()
        truth, predicted = self.matrix.sum(axis=1), self.matrix.sum(axis=0)
        return [
            {
                "class": name,
                "iou": _json_float(iou[k]),
                "gt_pixels": int(truth[k]),
                "pred_pixels": int(predicted[k]),
            }
            for k, name in enumerate(class_names)
        ]

    def metrics(self, class_names: Sequence[str]) -> dict[str, Any]:
        """A JSON-ready dict for DVC/MLflow; '@' (not allowed in metric names) becomes '_'."""
        self._check_names(class_names)
        return {
            "mIoU": _json_float(self.mean_iou()),
            "pixel_accuracy": _json_float(self.pixel_accuracy()),
            "per_class": {
                name.replace("@", "_"): _json_float(value)
                for name, value in zip(class_names, self.iou(), strict=True)
            },
        }

    def save(self, path: str | Path) -> None:
        """Plain JSON (no pickle): class count, ignore index and the integer matrix."""
        payload = {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "matrix": self.matrix.tolist(),
        }
        write_text_atomic(path, json.dumps(payload) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ConfusionMatrix:
        file = Path(path)
        try:
            payload = json.loads(file.read_text(encoding="utf-8"))
            result = cls(int(payload["num_classes"]), int(payload["ignore_index"]))
            matrix = np.asarray(payload["matrix"], dtype=np.int64)
        except FileNotFoundError:
            raise InputError(f"{file}: no such confusion matrix") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{file}: not a saved confusion matrix ({exc})") from None
        if matrix.shape != result.matrix.shape or (matrix < 0).any():
            raise InputError(
                f"{file}: matrix of shape {matrix.shape} with non-negative counts expected "
                f"{result.matrix.shape}"
            )
        result.matrix = matrix
        return result

    def plot(self, path: str | Path, class_names: Sequence[str]) -> None:
        """Save the row-normalised matrix (each ground-truth class sums to 1) as an image."""
        self._check_names(class_names)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.matrix.sum(axis=1, keepdims=True)
        normalised = np.divide(self.matrix, rows, out=np.zeros(self.matrix.shape), where=rows > 0)
        n = self.num_classes
        side = min(4 + 0.25 * n, 40)
        font = max(3.0, min(9.0, 400 / n))
        figure, axes = plt.subplots(figsize=(side, side))
        try:
            image = axes.imshow(normalised, cmap="viridis", vmin=0, vmax=1)
            axes.set_xticks(range(n), labels=list(class_names), rotation=90, fontsize=font)
            axes.set_yticks(range(n), labels=list(class_names), fontsize=font)
            axes.set_xlabel("prediction")
            axes.set_ylabel("ground truth")
            axes.set_title(f"confusion matrix (mIoU {self.mean_iou():.3f})")
            figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
            figure.tight_layout()
            target = Path(path)
            with atomic_write(target, "wb") as handle:
                figure.savefig(handle, format=target.suffix.lstrip(".") or "png", dpi=150)
        finally:
            plt.close(figure)

    def _check_names(self, class_names: Sequence[str]) -> None:
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
