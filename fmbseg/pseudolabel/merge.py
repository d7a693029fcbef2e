"""Subsample routes 1.2 and sam3 and merge them with route 1.1 into one label map per image.

Rule: every 1.1 mask is kept; each 1.2 mask is kept with probability ``route_12_fraction`` and
each sam3 mask with ``sam3_fraction``, drawn (1.2's first) from a generator seeded by (seed,
image id), so the choice does not depend on shard order or on resuming. Overlaps: a route
earlier in ``merge.priority`` wins (default 1.1, then sam3, then 1.2); within a route the
smaller mask wins (masks are painted largest first). Unlabelled pixels hold ``IGNORE_LABEL``.

Output folder::

    run.json                 merge params and the pseudo-label run they apply to
    labels/<image_id>.png    uint16 label maps at the image's size
    shards/NNNNN.parquet     the kept masks (same columns as the pseudo-label shards)
    shards/NNNNN.json        per-image labelled fraction and class pixel counts (completion marker)
    summary.json             totals, once every shard is merged
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmbseg.config import MergeConfig
from fmbseg.errors import InputError
from fmbseg.io.atomic import atomic_write, write_text_atomic
from fmbseg.io.runs import RUN_FILE, claim_output, write_run_record
from fmbseg.masks import IGNORE_LABEL, decode_rle, paint_label_map
from fmbseg.pseudolabel.routes import ROUTE_AUTOMATIC, ROUTE_POINTS, ROUTE_TEXT
from fmbseg.pseudolabel.stage import SHARD_DIR, SUMMARY_FILE

LABEL_DIR = "labels"


def image_generator(seed: int, image_id: str) -> np.random.Generator:
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


ROUTES = (ROUTE_POINTS, ROUTE_AUTOMATIC, ROUTE_TEXT)


def select_masks(
    routes: Sequence[str], areas: Sequence[int], config: MergeConfig, rng: np.random.Generator
) -> list[int]:
    """Indices of the kept masks in painting order: the lowest-priority route first, each
    route's masks largest first."""
    routes_array = np.asarray(routes)
    kept = {ROUTE_POINTS: np.flatnonzero(routes_array == ROUTE_POINTS)}
    for route, fraction in ((ROUTE_AUTOMATIC, config.route_12_fraction),
                            (ROUTE_TEXT, config.sam3_fraction)):  # fmt: skip
        candidates = np.flatnonzero(routes_array == route)
        kept[route] = candidates[rng.random(candidates.size) < fraction]
    painting = [r for r in reversed(config.priority) if r in kept]
    painting = [r for r in ROUTES if r not in config.priority] + painting  # unlisted: lowest
    order = []
    for route in painting:
        order += sorted(kept[route].tolist(), key=lambda i: -int(areas[i]))
    return order


def merge_image(
    height: int,
    width: int,
    routes: Sequence[str],
    areas: Sequence[int],
    class_ids: Sequence[int],
    masks: Sequence[np.ndarray],
    config: MergeConfig,
    image_id: str,
) -> tuple[np.ndarray, list[int]]:
    """One image's label map and the indices of the masks kept, per the module's rule."""
    order = select_masks(routes, areas, config, image_generator(config.seed, image_id))
    label_map = paint_label_map(
        height, width, [masks[i] for i in order], [class_ids[i] for i in order]
    )
    return label_map, sorted(order)


def label_map_path(out_dir: Path, image_id: str) -> Path:
    return out_dir / LABEL_DIR / f"{image_id}.png"


def write_label_map(path: Path, label_map: np.ndarray) -> None:
    from PIL import Image

    with atomic_write(path) as handle:
        Image.fromarray(label_map.astype(np.uint16)).save(handle, format="PNG")


def read_label_map(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image, dtype=np.uint16)


def _merge_shard(
    pseudo_dir: Path, out_dir: Path, info: dict[str, Any], config: MergeConfig, classes: int
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"{info['shard']:05d}"
    table = pq.read_table(pseudo_dir / SHARD_DIR / f"{name}.parquet")
    by_image: dict[str, list[int]] = {}
    for row, key in enumerate(table.column("image_id").to_pylist()):
        by_image.setdefault(key, []).append(row)
    columns = table.to_pydict()
    kept_rows: list[int] = []
    stats = []
    for image in info["images"]:
        rows = by_image.get(image["id"], [])
        height, width = image["height"], image["width"]
        masks = [decode_rle(columns["rle"][r], height, width) for r in rows]
        label_map, kept = merge_image(
            height,
            width,
            [columns["route"][r] for r in rows],
            [columns["area"][r] for r in rows],
            [columns["class_id"][r] for r in rows],
            masks,
            config,
            image["id"],
        )
        write_label_map(label_map_path(out_dir, image["id"]), label_map)
        kept_rows += [rows[i] for i in kept]
        labelled = label_map != IGNORE_LABEL
        pixels = np.bincount(label_map[labelled].astype(np.int64), minlength=classes)
        stats.append(
            {
                "id": image["id"],
                "labelled_fraction": float(labelled.mean()),
                "class_pixels": pixels.tolist(),
                "kept": {
                    route: sum(columns["route"][rows[i]] == route for i in kept) for route in ROUTES
                },
            }
        )
    with atomic_write(out_dir / SHARD_DIR / f"{name}.parquet") as handle:
        pq.write_table(table.take(pa.array(sorted(kept_rows), type=pa.int64())), handle)
    write_text_atomic(
        out_dir / SHARD_DIR / f"{name}.json", json.dumps({"shard": info["shard"], "images": stats})
    )


def run_merge(config: MergeConfig, pseudo_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Merge a finished pseudo-label run into label maps; resumable per shard."""
    source = Path(pseudo_dir)
    out = Path(out_dir)
    if not (source / SUMMARY_FILE).is_file():
        raise InputError(f"{source}: no finished pseudo-label run ({SUMMARY_FILE} missing)")
    source_run = json.loads((source / RUN_FILE).read_text(encoding="utf-8"))
    record = {"merge": config.model_dump(mode="json"), "pseudolabel_run": source_run}
    if not claim_output(out, record, kind="a merge", work=SHARD_DIR, restart_if_changed=False):
        write_run_record(out, record)
    vocabulary = source_run["vocabulary"]
    for info_path in sorted((source / SHARD_DIR).glob("*.json")):
        if not (out / SHARD_DIR / info_path.name).is_file():
            info = json.loads(info_path.read_text(encoding="utf-8"))
            _merge_shard(source, out, info, config, len(vocabulary))
    return _summarise(out, vocabulary)


def _summarise(out: Path, vocabulary: list[str]) -> dict[str, Any]:
    images = [
        image
        for path in sorted((out / SHARD_DIR).glob("*.json"))
        for image in json.loads(path.read_text(encoding="utf-8"))["images"]
    ]
    class_pixels = (
        np.sum([image["class_pixels"] for image in images], axis=0)
        if images
        else np.zeros(len(vocabulary))
    )
    summary = {
        "images": len(images),
        "mean_labelled_fraction": float(np.mean([i["labelled_fraction"] for i in images]))
        if images
        else 0.0,
        "masks_kept": {
            route: int(sum(i["kept"].get(route, 0) for i in images)) for route in ROUTES
        },
        "class_pixels": {
            name: int(count) for name, count in zip(vocabulary, class_pixels, strict=True)
        },
    }
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
