"""mIoU of a trained segmenter (or of Stage 1 alone) on a labelled dataset folder.

Outputs: ``metrics.json`` (the summary for DVC metrics: mIoU, pixel accuracy, images, class
counts; the same keys in every run, so ``dvc exp show`` stays narrow), ``per_class.csv`` (IoU
per class, for DVC plots) and ``per_class.png``, ``confusion.json`` and ``confusion.png``.

Stage 1 alone (the paper's training-free variant) is scored from a merge folder's label maps:
its vocabulary must be the dataset's classes; pixels it leaves unlabelled count as background
where the dataset has one, else as a wrong answer (an extra "unlabelled" prediction column that
is not averaged into mIoU).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.config import Params
from fmbseg.datasets.folder import FolderDataset
from fmbseg.errors import InputError
from fmbseg.evaluation.metrics import ConfusionMatrix
from fmbseg.io.atomic import write_text_atomic
from fmbseg.io.runs import RUN_FILE
from fmbseg.masks import IGNORE_LABEL

if TYPE_CHECKING:
    from fmbseg.protocols import Protocol
    from fmbseg.segmenter import Background

log = logging.getLogger(__name__)

UNLABELLED = "(unlabelled)"


def _background_rule(protocol: Protocol, scorer: object) -> Background | None:
    """The protocol's background rule, or the scorer's own threshold where its method defines
    one (Fusioner: no class's sigmoid above 0.5)."""
    from fmbseg.segmenter import Background

    background = protocol.background
    own = getattr(scorer, "background_threshold", None)
    if background is None or own is None:
        return background
    return Background(background.index, threshold=own, rule=f"method_threshold:{own}")


def _pseudolabel_predictor(merged_dir: Path, class_names: tuple[str, ...], background: int | None):
    from fmbseg.pseudolabel.merge import label_map_path, read_label_map

    run = json.loads((merged_dir / RUN_FILE).read_text(encoding="utf-8"))
    vocabulary = tuple(run["pseudolabel_run"]["vocabulary"])
    if vocabulary != class_names:
        raise InputError(
            f"{merged_dir}: pseudo-labels use another vocabulary than the dataset's classes"
        )
    unlabelled = len(class_names) if background is None else background

    def predict(image_id: str, image: np.ndarray) -> np.ndarray:
        path = label_map_path(merged_dir, image_id)
        if not path.is_file():
            raise InputError(f"{path}: no pseudo-label map for image {image_id!r}")
        labels = read_label_map(path).astype(np.int64)
        return np.where(labels == IGNORE_LABEL, unlabelled, labels)

    return predict


def run_evaluate(
    params: Params,
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str | None = None,
    model: str | Path | None = None,
    pseudolabels: str | Path | None = None,
    limit: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` (a module path or MLflow URI) or a merge folder on a dataset folder.

    A registry model runs with the ``models`` params it was registered with, a trained folder
    with ``params``'s; either with the inference settings of the evaluation's protocol."""
    from tqdm import tqdm

    provenance: dict[str, str] = {}
    if (model is None) == (pseudolabels is None):
        raise InputError("evaluate: give either a model or a pseudo-label folder")
    dataset = FolderDataset(dataset_dir, split)
    spec = dataset.spec
    names = spec.class_names
    extra = pseudolabels is not None and spec.background_index is None
    matrix = ConfusionMatrix(len(names) + int(extra), spec.ignore_index)
    if model is not None:
        from fmbseg.predict import open_model
        from fmbseg.protocols import resolve_protocol

        protocol = resolve_protocol(params.inference, spec)
        segmenter, _ = open_model(params, model, inference=protocol.inference)
        background = _background_rule(protocol, segmenter.scorer)
        described = protocol.record() | {
            "background_rule": "none" if background is None else background.rule
        }
        provenance = {role: item.tag for role, item in segmenter.scorer.provenance.items()}

        def predict(image_id: str, image: np.ndarray) -> np.ndarray:
            return segmenter.segment(image, names, background).labels

    else:
        predict = _pseudolabel_predictor(Path(pseudolabels), names, spec.background_index)  # type: ignore[arg-type]
        described = STAGE1_PROTOCOL
    samples = list(dataset)[:limit]
    for sample in tqdm(
        samples, unit="img", desc=f"evaluate {spec.name}", disable=not show_progress
    ):
        image, target = dataset.read(sample)
        matrix.update(predict(sample.image_id, image), target)
    return write_results(matrix, names, Path(out_dir), extra, len(samples), described) | {
        "provenance": provenance
    }


SUMMARY_KEYS = ("mIoU", "pixel_accuracy", "images", "classes", "classes_present")
"""What ``metrics.json`` holds besides how the numbers were made (``protocol``,
``background_rule``, ...: :meth:`fmbseg.protocols.Protocol.record`); per-class IoU lives in
``per_class.csv`` only (which classes are present changes from run to run)."""

STAGE1_PROTOCOL = {"protocol": "stage1_label_maps", "background_rule": "unlabelled_pixels"}
"""Stage 1 alone is scored on its label maps as they are: no resize, windows or prompts."""


def write_results(
    matrix: ConfusionMatrix,
    names: tuple[str, ...],
    out: Path,
    extra: bool,
    images: int,
    protocol: Mapping[str, Any],
) -> dict[str, Any]:
    """Write the reports; returns the summary plus ``per_class`` (IoU by class name)."""
    from fmbseg.charts import write_iou_bars_png

    columns = (*names, UNLABELLED) if extra else names
    metrics = matrix.metrics(columns)
    if extra:
        metrics["mIoU"] = float(np.nanmean(matrix.iou()[: len(names)]))
        metrics["per_class"].pop(UNLABELLED, None)
    iou = [metrics["per_class"].get(name.replace("@", "_")) for name in names]
    metrics |= {
        "images": images,
        "classes": len(names),
        "classes_present": sum(value is not None for value in iou),
    }
    summary = {key: metrics[key] for key in SUMMARY_KEYS} | dict(protocol)
    metrics |= protocol
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2, ensure_ascii=False))
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["class", "iou"])
    for name, value in zip(names, iou, strict=True):
        writer.writerow([name, "" if value is None else f"{value:.6f}"])
    write_text_atomic(out / "per_class.csv", table.getvalue())
    write_iou_bars_png(out / "per_class.png", names, iou)
    matrix.save(out / "confusion.json")
    matrix.plot(out / "confusion.png", columns)
    return metrics
