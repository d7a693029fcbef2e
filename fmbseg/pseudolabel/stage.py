"""The pseudo-labelling stage over a folder of images: sharded, resumable, atomic.

Output folder::

    run.json            vocabulary, image list hash, params and model provenance (fingerprint)
    shards/NNNNN.parquet  one row per mask: image_id, class_id, route, score, area, size, RLE
    shards/NNNNN.json     per-image sizes, present classes, failures, timings; written last,
                          so its presence marks the shard finished
    summary.json        totals over all shards, written once every shard is finished

A rerun skips finished shards; ``worker=(i, n)`` processes shards ``i, i+n, ...`` so several
GPU workers can share one dataset. Images that cannot be read are recorded and skipped; the
stage fails at the end only when their share exceeds ``max_failed_fraction``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmbseg.config import Params
from fmbseg.errors import FmbsegError, InputError
from fmbseg.io.atomic import atomic_write, sha256_file, write_text_atomic
from fmbseg.io.images import image_id, list_images, read_rgb
from fmbseg.io.runs import claim_output, remove_partial_writes, write_run_record
from fmbseg.masks import encode_rle
from fmbseg.models.base import PromptableSegmenter, TextPromptedSegmenter, VisionLanguageModel
from fmbseg.models.vocabulary import validate_vocabulary

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
SHARD_DIR = "shards"


@dataclass(frozen=True)
class Backends:
    clip: VisionLanguageModel
    sam: PromptableSegmenter
    sam3: TextPromptedSegmenter | None = None  # route sam3 only


@dataclass(frozen=True)
class ShardPlan:
    index: int
    image_paths: tuple[Path, ...]

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


def plan_shards(paths: Sequence[Path], images_per_shard: int) -> list[ShardPlan]:
    return [
        ShardPlan(i // images_per_shard, tuple(paths[i : i + images_per_shard]))
        for i in range(0, len(paths), images_per_shard)
    ]


def shard_done(out_dir: Path, shard: ShardPlan) -> bool:
    return (out_dir / SHARD_DIR / f"{shard.name}.json").is_file()


def images_sha256(ids: Sequence[str], paths: Sequence[Path]) -> str:
    """Digest of every image's id and bytes: a resumed run must not keep the pseudo-labels
    of images replaced under the same names (DVC reruns the stage; the ids stay)."""
    digest = hashlib.sha256()
    for key, path in zip(ids, paths, strict=True):
        digest.update(f"{key}\t{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _run_record(
    params: Params,
    vocabulary: Sequence[str],
    ids: Sequence[str],
    paths: Sequence[Path],
    image_labels: bool,
) -> dict[str, Any]:
    return {
        "vocabulary": list(vocabulary),
        "images": len(ids),
        "images_sha256": images_sha256(ids, paths),
        "precision": params.models.precision,
        "semi_supervised": image_labels,
        "pseudolabel": params.pseudolabel.model_dump(mode="json"),
        "models": {
            "clip": params.models.clip.model_dump(mode="json"),
            "sam": params.models.sam.model_dump(mode="json"),
        }
        | (
            {"sam3": params.models.sam3.model_dump(mode="json")}
            if "sam3" in params.pseudolabel.routes
            else {}
        ),
    }


def _class_ids(names: Sequence[str], vocabulary: Sequence[str], image: str) -> list[int]:
    index = {name: i for i, name in enumerate(vocabulary)}
    unknown = [name for name in names if name not in index]
    if unknown:
        raise InputError(f"image labels of {image!r}: {unknown} not in the vocabulary")
    return [index[name] for name in names]


def write_shard(
    out_dir: Path, shard: ShardPlan, rows: dict[str, list[Any]], info: dict[str, Any]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("image_id", pa.string()),
            ("class_id", pa.int32()),
            ("route", pa.string()),
            ("score", pa.float32()),
            ("area", pa.int64()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("rle", pa.list_(pa.int32())),
        ]
    )
    with atomic_write(out_dir / SHARD_DIR / f"{shard.name}.parquet") as handle:
        pq.write_table(pa.Table.from_pydict(rows, schema=schema), handle)
    write_text_atomic(
        out_dir / SHARD_DIR / f"{shard.name}.json", json.dumps(info, ensure_ascii=False)
    )


def _process_shard(
    shard: ShardPlan,
    images_root: Path,
    backends: Backends,
    text_embeddings: Any,
    params: Params,
    image_classes: Mapping[str, list[int]] | None,
    progress: Any,
    class_names: Sequence[str] = (),
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    from fmbseg.pseudolabel.routes import pseudolabel_image

    columns = ("image_id", "class_id", "route", "score", "area", "height", "width", "rle")
    rows: dict[str, list[Any]] = {name: [] for name in columns}
    info: dict[str, Any] = {"shard": shard.index, "images": [], "failed": {}, "seconds": {}}
    for path in shard.image_paths:
        key = image_id(path, images_root)
        start = time.perf_counter()
        try:
            image = read_rgb(path, params.pseudolabel.max_image_pixels)
        except InputError as exc:
            info["failed"][key] = str(exc)
            log.warning("skipped %s", exc)
            progress.update(1)
            continue
        info["seconds"]["read"] = info["seconds"].get("read", 0.0) + time.perf_counter() - start
        result = pseudolabel_image(
            image,
            backends.clip,
            backends.sam,
            text_embeddings,
            params.pseudolabel,
            params.models.clip.batch_size,
            None if image_classes is None else image_classes.get(key, []),
            sam3=backends.sam3,
            class_names=class_names,
        )
        height, width = image.shape[:2]
        for labelled in result.masks:
            rows["image_id"].append(key)
            rows["class_id"].append(labelled.class_id)
            rows["route"].append(labelled.route)
            rows["score"].append(float(labelled.score))
            rows["area"].append(int(labelled.mask.sum()))
            rows["height"].append(height)
            rows["width"].append(width)
            rows["rle"].append(encode_rle(labelled.mask))
        info["images"].append(
            {"id": key, "height": height, "width": width, "present": result.present}
        )
        for phase, seconds in result.seconds.items():
            info["seconds"][phase] = info["seconds"].get(phase, 0.0) + seconds
        progress.update(1)
    return rows, info


def read_shard_infos(out_dir: Path) -> list[dict[str, Any]]:
    return [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted((out_dir / SHARD_DIR).glob("*.json"))
    ]


def summarise(out_dir: Path, total_shards: int) -> dict[str, Any]:
    infos = read_shard_infos(out_dir)
    seconds: dict[str, float] = {}
    for info in infos:
        for phase, value in info["seconds"].items():
            seconds[phase] = seconds.get(phase, 0.0) + value
    images = sum(len(info["images"]) for info in infos)
    failed = {key: reason for info in infos for key, reason in info["failed"].items()}
    provenance = next((info["provenance"] for info in infos if "provenance" in info), {})
    return {
        "shards": total_shards,
        "shards_done": len(infos),
        "images": images,
        "failed": len(failed),
        "failed_images": failed,
        "seconds": seconds,
        "provenance": provenance,
    }


def finish_summary(
    out_dir: Path, summary: dict[str, Any], images: int, max_failed_fraction: float
) -> None:
    """Once every shard is done: write ``summary.json``, then fail the run if more of the
    ``images`` could not be read than ``max_failed_fraction`` allows (the summary says which)."""
    if summary["shards_done"] != summary["shards"]:
        return
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False))
    if summary["failed"] > max_failed_fraction * images:
        raise FmbsegError(
            f"{summary['failed']} of {images} images could not be read (more than "
            f"pseudolabel.max_failed_fraction={max_failed_fraction}); see {out_dir / SUMMARY_FILE}"
        )


def run_pseudolabel(
    params: Params,
    images_dir: str | Path,
    vocabulary: Sequence[str],
    out_dir: str | Path,
    *,
    image_labels: Mapping[str, Sequence[str]] | None = None,
    limit: int | None = None,
    worker: tuple[int, int] = (0, 1),
    backends: Backends | None = None,
    show_progress: bool = True,
    restart_if_changed: bool = False,
) -> dict[str, Any]:
    """Pseudo-label every image below ``images_dir``; returns the run's summary.

    A rerun resumes: finished shards are kept. Outputs of other inputs or params in ``out_dir``
    are refused, or replaced with ``restart_if_changed`` (what a DVC stage wants).
    """
    names = validate_vocabulary(vocabulary)
    images_root = Path(images_dir)
    out = Path(out_dir)
    paths = list_images(images_root)[:limit]
    if not paths:
        raise InputError(f"{images_root}: no images found")
    ids = [image_id(path, images_root) for path in paths]
    image_classes = None
    if image_labels is not None:
        image_classes = {key: _class_ids(image_labels.get(key, []), names, key) for key in ids}
    index, count = worker
    if not 0 <= index < count:
        raise InputError(f"worker {index}/{count}: expected 0 <= index < count")

    shards = plan_shards(paths, params.pseudolabel.images_per_shard)
    record = _run_record(params, names, ids, paths, image_labels is not None)
    resuming = claim_output(
        out, record, kind="pseudo-labels", work=SHARD_DIR, restart_if_changed=restart_if_changed
    )
    pending = [s for s in shards if s.index % count == index and not shard_done(out, s)]
    for shard in shards:  # leftovers of kills; other workers' unfinished shards are theirs
        if shard in pending or shard_done(out, shard):
            remove_partial_writes(out / SHARD_DIR, (f"{shard.name}.parquet", f"{shard.name}.json"))
    if pending:
        backends = backends or _build_backends(params)
        if not resuming:  # the models loaded: only now does the run leave files
            write_run_record(out, record)
        _label_shards(
            pending, images_root, out, params, names, image_classes, backends, show_progress
        )

    summary = summarise(out, len(shards))
    finish_summary(out, summary, len(paths), params.pseudolabel.max_failed_fraction)
    return summary


def _build_backends(params: Params) -> Backends:
    from fmbseg.models.registry import (
        build_segmenter,
        build_text_prompted_segmenter,
        build_vision_language_model,
    )

    sam3 = (
        build_text_prompted_segmenter(params.models)
        if "sam3" in params.pseudolabel.routes
        else None
    )
    return Backends(
        build_vision_language_model(params.models), build_segmenter(params.models), sam3
    )


def _label_shards(
    pending: list[ShardPlan],
    images_root: Path,
    out: Path,
    params: Params,
    names: tuple[str, ...],
    image_classes: Mapping[str, list[int]] | None,
    backends: Backends,
    show_progress: bool,
) -> None:
    from tqdm import tqdm

    from fmbseg.models.vocabulary import VocabularyEncoder

    text_embeddings = (
        VocabularyEncoder(backends.clip, params.pseudolabel.templates)
        .embed(list(names))
        .float()
        .cpu()
    )
    total = sum(len(s.image_paths) for s in pending)
    with tqdm(total=total, unit="img", desc="pseudo-label", disable=not show_progress) as progress:
        for shard in pending:
            rows, info = _process_shard(
                shard,
                images_root,
                backends,
                text_embeddings,
                params,
                image_classes,
                progress,
                names,
            )
            info["provenance"] = {
                "clip": backends.clip.provenance.tag,
                "sam": backends.sam.provenance.tag,
            } | ({"sam3": backends.sam3.provenance.tag} if backends.sam3 is not None else {})
            write_shard(out, shard, rows, info)
