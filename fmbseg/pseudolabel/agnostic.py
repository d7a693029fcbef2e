"""Class-agnostic masks for every image: what PixelCLIP trains on, in Stage 1's table format.

Sources (``masks.source``):

- ``sam``: SAM's automatic masks with ``pseudolabel.automask``, on every image, its two
  filters replaceable by ``masks.pred_iou_thresh`` and ``masks.stability_score_thresh``. Route
  1.2 computes exactly these masks, but only on images where CLIP found a class; given that
  run (``pseudolabels``) with the same settings, its masks are reused wherever it has them and
  SAM runs on the rest.
- ``dino``: PixelCLIP's DINO option: k-means (``masks.kmeans_clusters``) over the frozen
  encoder's (``models.encoder``) patch tokens of the image resized to a square, each cluster
  nearest-upsampled to the image: one mask per non-empty cluster.

Output folder, as :mod:`fmbseg.pseudolabel.stage` writes it (same Parquet/RLE shards, same
resume): ``run.json``, ``shards/NNNNN.parquet`` with ``class_id`` -1 and ``route`` "sam",
"1.2" (reused) or "dino", ``shards/NNNNN.json`` (written last), ``summary.json``. When
``train.method`` trains on no masks, the stage writes only a ``summary.json`` that says so.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.config import AutoMaskConfig, Params
from fmbseg.errors import InputError
from fmbseg.io.atomic import sha256_file, write_text_atomic
from fmbseg.io.images import image_id, list_images, read_rgb
from fmbseg.io.runs import RUN_FILE, claim_output, remove_partial_writes, write_run_record
from fmbseg.masks import decode_rle, encode_rle
from fmbseg.pseudolabel.stage import (
    SHARD_DIR,
    SUMMARY_FILE,
    ShardPlan,
    finish_summary,
    images_sha256,
    plan_shards,
    read_shard_infos,
    shard_done,
    summarise,
    write_shard,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AGNOSTIC_CLASS = -1
ROUTE_SAM = "sam"
ROUTE_REUSED = "1.2"
ROUTE_DINO = "dino"
COLUMNS = ("image_id", "class_id", "route", "score", "area", "height", "width", "rle")


def method_needs_masks(method: str) -> bool:
    """Whether the Stage 2 method ``train.method`` names trains on class-agnostic masks."""
    from fmbseg.methods import get_method

    return "masks" in getattr(get_method(method), "inputs", ())


def kmeans(
    points: torch.Tensor, clusters: int, iterations: int, tolerance: float, seed: int
) -> torch.Tensor:
    """(N, C) points -> (N,) cluster index. Euclidean k-means (fast_pytorch_kmeans' defaults: ``clusters`` random points as initial
    centres, at most ``iterations`` rounds, stop when no centre moves by more than
    ``tolerance``); an empty cluster keeps its centre."""
    import torch

    points = points.float()
    generator = torch.Generator().manual_seed(seed)
    count = min(clusters, len(points))
    centres = points[torch.randperm(len(points), generator=generator)[:count].to(points.device)]
    labels = torch.zeros(len(points), dtype=torch.int64, device=points.device)
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        sizes = torch.bincount(labels, minlength=count).to(points.dtype)[:, None]
        moved = torch.where(sizes > 0, sums / sizes.clamp(min=1), centres)
        shift = (moved - centres).norm(dim=1).max()
        centres = moved
        if shift <= tolerance:
            break
    return torch.cdist(points, centres).argmin(dim=1)


def automask_config(params: Params) -> AutoMaskConfig:
    """``pseudolabel.automask`` with the filters that ``masks`` sets in place of its own."""
    config = params.masks
    update = {
        key: value
        for key, value in (
            ("pred_iou_thresh", config.pred_iou_thresh),
            ("stability_score_thresh", config.stability_score_thresh),
        )
        if value is not None
    }
    return params.pseudolabel.automask.model_copy(update=update)


@dataclass(frozen=True)
class MaskSources:
    """The models that make masks (each built only when the source needs it)."""

    sam: Any = None  # PromptableSegmenter
    encoder: Any = None  # PatchEncoder


def _dino_masks(image: np.ndarray, encoder: Any, params: Params) -> list[np.ndarray]:
    import torch
    from PIL import Image

    config = params.masks
    side = config.kmeans_image_size
    if side % encoder.patch_size:
        raise InputError(
            f"masks.kmeans_image_size: {side} must be a multiple of the encoder's patch size "
            f"{encoder.patch_size}"
        )
    resized = Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    with torch.no_grad():
        tokens = encoder.encode(pixels[None])[0].float()
    grid = tokens.shape[:2]
    labels = kmeans(
        tokens.reshape(-1, tokens.shape[-1]),
        config.kmeans_clusters,
        config.kmeans_iterations,
        config.kmeans_tolerance,
        config.seed,
    ).reshape(grid)
    height, width = image.shape[:2]
    rows = (np.arange(height) + 0.5) * grid[0] / height
    cols = (np.arange(width) + 0.5) * grid[1] / width
    upsampled = labels.cpu().numpy()[rows.astype(int)][:, cols.astype(int)]
    return [upsampled == k for k in np.unique(upsampled)]


def _reusable_route_12(params: Params, pseudolabels: Path | None, digest: str) -> dict | None:
    """Route 1.2's masks per image id (None where route 1.2 did not run on an image), when
    ``pseudolabels`` ran SAM as this stage would on the same images; else None."""
    if pseudolabels is None or params.masks.source != "sam":
        return None
    run_file = pseudolabels / RUN_FILE
    if not (pseudolabels / SUMMARY_FILE).is_file() or not run_file.is_file():
        raise InputError(f"{pseudolabels}: not a finished pseudolabel folder")
    run = json.loads(run_file.read_text(encoding="utf-8"))
    same = (
        run.get("images_sha256") == digest
        and run.get("precision") == params.models.precision
        and run.get("models", {}).get("sam") == params.models.sam.model_dump(mode="json")
        and run["pseudolabel"]["automask"] == automask_config(params).model_dump(mode="json")
        and ROUTE_REUSED in run["pseudolabel"]["routes"]
    )
    if not same:
        log.info("%s: other images, SAM or automask settings; not reused", pseudolabels)
        return None
    import pyarrow.parquet as pq

    reused: dict[str, list[tuple[float, np.ndarray]] | None] = {}
    for info in read_shard_infos(pseudolabels):
        for image in info["images"]:
            reused[image["id"]] = [] if image["present"] else None
        table = pq.read_table(
            pseudolabels / SHARD_DIR / f"{info['shard']:05d}.parquet",
            columns=["image_id", "route", "score", "rle"],
        ).to_pydict()
        for key, route, score, rle in zip(
            table["image_id"], table["route"], table["score"], table["rle"], strict=True
        ):
            if route == ROUTE_REUSED and reused.get(key) is not None:
                reused[key].append((score, np.asarray(rle, dtype=np.int32)))  # type: ignore[union-attr]
    return reused


def _image_masks(
    key: str,
    image: np.ndarray,
    params: Params,
    sources: MaskSources,
    reused: dict | None,
    seconds: dict[str, float],
) -> list[tuple[str, float, np.ndarray]]:
    """(route, score, RLE) of every non-empty mask of one image."""
    start = time.perf_counter()
    if params.masks.source == "dino":
        masks = _dino_masks(image, sources.encoder, params)
        seconds["dino"] = seconds.get("dino", 0.0) + time.perf_counter() - start
        return [(ROUTE_DINO, float("nan"), encode_rle(mask)) for mask in masks if mask.any()]
    if reused is not None and reused.get(key) is not None:
        return [(ROUTE_REUSED, score, rle) for score, rle in reused[key]]
    embedding = sources.sam.embed_image(image)
    proposals = sources.sam.generate_masks(embedding, automask_config(params))
    seconds["sam"] = seconds.get("sam", 0.0) + time.perf_counter() - start
    return [(ROUTE_SAM, p.predicted_iou, encode_rle(p.mask)) for p in proposals if p.mask.any()]


def _process_shard(
    shard: ShardPlan,
    images_root: Path,
    params: Params,
    sources: MaskSources,
    reused: dict | None,
    progress: Any,
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    rows: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    info: dict[str, Any] = {"shard": shard.index, "images": [], "failed": {}, "seconds": {}}
    for path in shard.image_paths:
        key = image_id(path, images_root)
        try:
            image = read_rgb(path, params.pseudolabel.max_image_pixels)
        except InputError as exc:
            info["failed"][key] = str(exc)
            log.warning("skipped %s", exc)
            progress.update(1)
            continue
        height, width = image.shape[:2]
        masks = _image_masks(key, image, params, sources, reused, info["seconds"])
        for route, score, rle in masks:
            rows["image_id"].append(key)
            rows["class_id"].append(AGNOSTIC_CLASS)
            rows["route"].append(route)
            rows["score"].append(float(score))
            rows["area"].append(int(rle[1::2].sum()))
            rows["height"].append(height)
            rows["width"].append(width)
            rows["rle"].append(rle)
        info["images"].append({"id": key, "height": height, "width": width, "masks": len(masks)})
        progress.update(1)
    return rows, info


def _run_record(params: Params, ids: Sequence[str], digest: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "source": params.masks.source,
        "images": len(ids),
        "images_sha256": digest,
        "precision": params.models.precision,
    }
    if params.masks.source == "sam":
        record["sam"] = params.models.sam.model_dump(mode="json")
        record["automask"] = automask_config(params).model_dump(mode="json")
    else:
        record["encoder"] = params.models.encoder.model_dump(mode="json")
        record["kmeans"] = params.masks.model_dump(
            mode="json",
            exclude={"images_per_shard", "pred_iou_thresh", "stability_score_thresh"},
        )
    return record


def run_masks(
    params: Params,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    pseudolabels: str | Path | None = None,
    limit: int | None = None,
    sources: MaskSources | None = None,
    show_progress: bool = True,
    restart_if_changed: bool = False,
) -> dict[str, Any]:
    """Class-agnostic masks of every image below ``images_dir``; returns the run's summary.

    Resumes like the pseudo-labelling stage. When ``train.method`` trains on no masks, writes
    only a ``summary.json`` saying so (the DVC stage then costs nothing).
    """
    out = Path(out_dir)
    if not method_needs_masks(params.train.method):
        summary = {"skipped": f"train.method {params.train.method!r} trains on no masks"}
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2))
        return summary
    images_root = Path(images_dir)
    paths = list_images(images_root)[:limit]
    if not paths:
        raise InputError(f"{images_root}: no images found")
    ids = [image_id(path, images_root) for path in paths]
    digest = images_sha256(ids, paths)
    shards = plan_shards(paths, params.masks.images_per_shard)
    record = _run_record(params, ids, digest)
    resuming = claim_output(
        out, record, kind="masks", work=SHARD_DIR, restart_if_changed=restart_if_changed
    )
    pending = [shard for shard in shards if not shard_done(out, shard)]
    for shard in pending:
        remove_partial_writes(out / SHARD_DIR, (f"{shard.name}.parquet", f"{shard.name}.json"))
    if pending:
        reused = _reusable_route_12(params, Path(pseudolabels) if pseudolabels else None, digest)
        sources = sources or _build_sources(params, reused, pending, images_root)
        if not resuming:
            write_run_record(out, record)
        _mask_shards(pending, images_root, out, params, sources, reused, show_progress)
    summary = summarise(out, len(shards)) | {"source": params.masks.source}
    infos = read_shard_infos(out)
    summary["masks"] = sum(image["masks"] for info in infos for image in info["images"])
    finish_summary(out, summary, len(paths), params.pseudolabel.max_failed_fraction)
    return summary


def _build_sources(
    params: Params, reused: dict | None, pending: list[ShardPlan], images_root: Path
) -> MaskSources:
    from fmbseg.models.registry import build_patch_encoder, build_segmenter

    if params.masks.source == "dino":
        return MaskSources(encoder=build_patch_encoder(params.models))
    keys = [image_id(path, images_root) for shard in pending for path in shard.image_paths]
    if reused is not None and all(reused.get(key) is not None for key in keys):
        return MaskSources()  # route 1.2 has every image: SAM is not needed
    return MaskSources(sam=build_segmenter(params.models))


def _mask_shards(
    pending: list[ShardPlan],
    images_root: Path,
    out: Path,
    params: Params,
    sources: MaskSources,
    reused: dict | None,
    show_progress: bool,
) -> None:
    from tqdm import tqdm

    provenance = {
        role: model.provenance.tag
        for role, model in (("sam", sources.sam), ("encoder", sources.encoder))
        if model is not None
    }
    total = sum(len(shard.image_paths) for shard in pending)
    with tqdm(total=total, unit="img", desc="masks", disable=not show_progress) as progress:
        for shard in pending:
            rows, info = _process_shard(shard, images_root, params, sources, reused, progress)
            info["provenance"] = provenance
            write_shard(out, shard, rows, info)


class MaskTable:
    """Read side of a finished mask folder: the masks of one image, decoded, by image id.

    Shards are read whole and the few most recent kept, so a training run that visits images in
    random order reads one Parquet file per image at worst.
    """

    def __init__(self, folder: str | Path, cached_shards: int = 4) -> None:
        self.folder = Path(folder)
        summary_file = self.folder / SUMMARY_FILE
        if not summary_file.is_file():
            raise InputError(f"{self.folder}: not a finished mask folder ({SUMMARY_FILE} missing)")
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        if "skipped" in summary:
            raise InputError(
                f"{self.folder}: holds no masks ({summary['skipped']} when the masks stage ran); "
                "rerun it with this train.method"
            )
        self.summary = summary
        self.run = json.loads((self.folder / RUN_FILE).read_text(encoding="utf-8"))
        self.shard_of: dict[str, int] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        for info in read_shard_infos(self.folder):
            for image in info["images"]:
                self.shard_of[image["id"]] = int(info["shard"])
                self.sizes[image["id"]] = (int(image["height"]), int(image["width"]))
        self._cache: OrderedDict[int, dict[str, list[np.ndarray]]] = OrderedDict()
        self._cached_shards = cached_shards

    @property
    def source(self) -> str:
        return str(self.run["source"])

    def content_sha256(self) -> str:
        """Digest of every shard file: a training run resumes only on the same masks."""
        import hashlib

        digest = hashlib.sha256()
        for path in sorted((self.folder / SHARD_DIR).glob("*.parquet")):
            digest.update(f"{path.name}\t{sha256_file(path)}\n".encode())
        return digest.hexdigest()

    def image_ids(self) -> list[str]:
        return sorted(self.shard_of)

    def rles(self, key: str) -> list[np.ndarray]:
        """Run lengths of every mask of image ``key``, at its size (:attr:`sizes`)."""
        index = self.shard_of.get(key)
        if index is None:
            raise InputError(f"{self.folder}: no masks for image {key!r}")
        if index not in self._cache:
            import pyarrow.parquet as pq

            table = pq.read_table(
                self.folder / SHARD_DIR / f"{index:05d}.parquet", columns=["image_id", "rle"]
            ).to_pydict()
            by_image: dict[str, list[np.ndarray]] = {}
            for image, rle in zip(table["image_id"], table["rle"], strict=True):
                by_image.setdefault(image, []).append(np.asarray(rle, dtype=np.int32))
            self._cache[index] = by_image
            if len(self._cache) > self._cached_shards:
                self._cache.popitem(last=False)
        self._cache.move_to_end(index)
        return self._cache[index].get(key, [])

    def masks(self, key: str) -> np.ndarray:
        """(N, H, W) bool masks of image ``key``."""
        height, width = self.sizes[key]
        decoded = [decode_rle(rle, height, width) for rle in self.rles(key)]
        return np.stack(decoded) if decoded else np.zeros((0, height, width), dtype=bool)
