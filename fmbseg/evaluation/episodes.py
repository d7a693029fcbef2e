"""Fusioner's own evaluation: 1-way, zero-shot episodes (one image, one class name queried).

``pascal5i`` / ``coco20i`` (fold i): every (image, novel class of fold i present in its mask)
pair of a labelled dataset folder (VOC / COCO classes; names matched spelling-insensitively).
``mosaic4``: 2x2 mosaics of four images of distinct classes from any folder of class-labelled
images with masks (FSS-1000's layout: ``<root>/<class>/<n>.jpg`` + ``<n>.png``), seeded; each
of a mosaic's four names is queried.

An episode asks the segmenter for ("background", name) with the background rule of the scorer's
method (Fusioner: sigmoid > 0.5) or ``inference.background_threshold``. Metrics, as the spec:
per class, foreground and background intersections and unions summed over its episodes; mIoU =
mean foreground IoU over the queried classes; FB-IoU = mean over {background, foreground} of
the intersections over the unions summed over all episodes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmbseg.config import Params
from fmbseg.errors import InputError
from fmbseg.io.atomic import write_text_atomic

EPISODE_PROTOCOLS = ("pascal5i", "coco20i", "mosaic4")
MOSAIC_TILE = 224


@dataclass
class EpisodeMetrics:
    """Foreground/background intersection and union per queried class."""

    counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [Ifg, Ufg, Ibg, Ubg]

    def update(self, name: str, predicted: np.ndarray, target: np.ndarray, valid: np.ndarray):
        p, t = predicted[valid], target[valid]
        row = self.counts.setdefault(name, np.zeros(4, np.int64))
        row += [(p & t).sum(), (p | t).sum(), (~p & ~t).sum(), (~p | ~t).sum()]

    def summary(self) -> dict[str, Any]:
        per_class = {
            name: float(row[0] / row[1]) if row[1] else 0.0 for name, row in self.counts.items()
        }
        total = sum(self.counts.values(), np.zeros(4, np.int64))
        fb = [total[2] / max(total[3], 1), total[0] / max(total[1], 1)]
        return {
            "mIoU": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
            "FB-IoU": float(np.mean(fb)),
            "per_class": per_class,
        }


def build_mosaics(
    source: str | Path, out: str | Path, *, count: int = 1000, seed: int = 0, split: str = "val"
) -> Path:
    """A dataset folder of ``count`` 2x2 mosaics (448x448) of four images of distinct classes;
    mask value k+1 = class k of ``classes.txt`` where that tile's mask is set, else 0."""
    from PIL import Image

    from fmbseg.datasets.folder import write_mask

    root, target = Path(source), Path(out)
    pairs: dict[str, list[tuple[Path, Path]]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        found = [(i, i.with_suffix(".png")) for i in images if i.with_suffix(".png").is_file()]
        if found:
            pairs[folder.name] = found
    if len(pairs) < 4:
        raise InputError(
            f"{root}: mosaics need 4 classes of <class>/<n>.jpg + <n>.png, found {len(pairs)}"
        )
    names = sorted(pairs)
    rng = np.random.default_rng(seed)
    (target / "images" / split).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        chosen = rng.choice(len(names), size=4, replace=False)
        image = np.zeros((2 * MOSAIC_TILE, 2 * MOSAIC_TILE, 3), np.uint8)
        mask = np.zeros((2 * MOSAIC_TILE, 2 * MOSAIC_TILE), np.uint16)
        for tile, k in enumerate(chosen):
            picture, labels = pairs[names[k]][rng.integers(len(pairs[names[k]]))]
            size = (MOSAIC_TILE, MOSAIC_TILE)
            rgb = Image.open(picture).convert("RGB").resize(size, Image.Resampling.BILINEAR)
            fg = np.asarray(Image.open(labels).convert("L").resize(size, Image.Resampling.NEAREST))
            top, left = (tile // 2) * MOSAIC_TILE, (tile % 2) * MOSAIC_TILE
            image[top : top + MOSAIC_TILE, left : left + MOSAIC_TILE] = np.asarray(rgb)
            mask[top : top + MOSAIC_TILE, left : left + MOSAIC_TILE] = np.where(fg > 127, k + 1, 0)
        Image.fromarray(image).save(target / "images" / split / f"{index:05d}.png")
        write_mask(target / "masks" / split / f"{index:05d}.png", mask)
    write_text_atomic(target / "classes.txt", "\n".join(["background", *names]) + "\n")
    write_text_atomic(target / "dataset.json", json.dumps({"background_index": 0}))
    return target


def _queried(protocol: str, fold: int | None, names: Sequence[str]) -> set[int]:
    from fmbseg.evaluation.folds import matching, novel_classes

    if protocol == "mosaic4":
        return set(range(1, len(names)))
    if fold is None:
        raise InputError(f"--protocol {protocol} needs --fold 0..3")
    queried = matching(names, novel_classes(protocol, fold))
    if not queried:
        raise InputError(f"the dataset has none of {protocol} fold {fold}'s novel classes")
    return queried


def run_episodes(
    params: Params,
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    protocol: str,
    model: str | Path,
    fold: int | None = None,
    split: str | None = None,
    limit: int | None = None,
    mosaics: int = 1000,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` on the protocol's 1-way episodes; writes ``metrics.json``. A registry
    model runs with its registered ``models`` params and ``params.inference``."""
    from tqdm import tqdm

    from fmbseg.datasets.folder import FolderDataset
    from fmbseg.predict import open_model
    from fmbseg.segmenter import Background

    out = Path(out_dir)
    if protocol not in EPISODE_PROTOCOLS:
        raise InputError(f"protocol {protocol!r}: expected one of {', '.join(EPISODE_PROTOCOLS)}")
    if protocol == "mosaic4":
        dataset_dir = build_mosaics(dataset_dir, out / "mosaics", count=mosaics, seed=seed)
        split = "val"
    dataset = FolderDataset(dataset_dir, split)
    names = dataset.spec.class_names
    queried = _queried(protocol, fold, names)
    segmenter, _ = open_model(params, model, inference=params.inference)
    threshold = getattr(segmenter.scorer, "background_threshold", None)
    if threshold is None:
        threshold = params.inference.background_threshold
    rule = Background(0, threshold=threshold)
    metrics = EpisodeMetrics()
    episodes = 0
    for sample in tqdm(list(dataset)[:limit], unit="img", disable=not show_progress):
        image, target = dataset.read(sample)
        valid = target != dataset.spec.ignore_index
        for k in sorted(queried & set(np.unique(target[valid]).tolist())):
            labels = segmenter.segment(image, ("background", names[k]), rule).labels
            metrics.update(names[k], labels == 1, target == k, valid)
            episodes += 1
    summary = metrics.summary() | {"episodes": episodes, "protocol": protocol, "fold": fold}
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
