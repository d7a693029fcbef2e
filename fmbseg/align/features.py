"""Stage 2's feature cache: frozen-encoder patch features and patch pseudo-labels, in shards.

The encoder is frozen, so its features are computed once and every training epoch (and every
fine-tuning run) reads them back instead of re-running DINOv2.

Input: a folder of images and a finished merge folder (Stage 1's output: ``run.json`` naming the
vocabulary, ``labels/<image_id>.png`` label maps). Images without a label map are skipped and
listed in ``index.json`` (``images_without_labels``): Stage 1 writes no label map for an image it
could not read, so such images are expected and must not stop the stage. Images that cannot be
read now are recorded per shard (``failed``) and skipped the same way. A label map whose size
differs from its image, or holding a class id outside the vocabulary, belongs to other inputs and
stops the stage with an :class:`InputError`.

Geometry (``features.geometry``): ``tiles`` (default) caches images the way inference sees them:
rescaled with their aspect kept so the short side is ``features.image_size`` (bilinear without
antialias, as the segmenter), then cut into square tiles of that size, placed as inference places
its windows (every tile size, the last one flush with the border); each tile is an entry of its
own, named ``<image id>#<k>``. ``square`` resizes each image to one ``features.image_size``
square (PIL bilinear): the whole image in one entry, its aspect distorted (a 640x480 image is
scaled 0.70 across and 0.93 down). The label map is resized the same way by nearest neighbour
and cut with its image; a patch of an entry takes its majority class when that class covers at
least ``features.min_label_fraction`` of the patch's pixels, else -1 (ignored). ``index.json``
records the geometry; a cache written before it existed is ``square``.

Output folder::

    run.json                  fingerprint: params, vocabulary, label run, bytes of every image
                              and label map
    shards/NNNNN.safetensors  features (n, h, w, C) float16; labels (n, h, w) int16 (int32 for
                              vocabularies over 32767 classes), -1 = ignored; with
                              ``features.label_map_size`` S > 0 also label_maps (n, S, S), the
                              label map nearest-resized, -1 = unlabelled (Fusioner's targets)
    shards/NNNNN.json         image ids, shapes, sha256 of the .safetensors, encoder provenance,
                              failed images; written last, so it marks the shard finished
    index.json                every shard with its shapes and sha256, vocabulary, encoder, totals;
                              written once all shards are finished

A rerun skips finished shards. Nothing is ever unpickled: shards are safetensors, tables JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.config import Params
from fmbseg.errors import ConfigError, FmbsegError, InputError
from fmbseg.io.atomic import atomic_write, sha256_file, write_text_atomic
from fmbseg.io.images import image_id, list_images, read_rgb
from fmbseg.io.runs import RUN_FILE, claim_output, write_run_record
from fmbseg.masks import IGNORE_LABEL
from fmbseg.models.base import PatchEncoder
from fmbseg.models.vocabulary import validate_vocabulary
from fmbseg.pseudolabel.merge import label_map_path, read_label_map

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SHARD_DIR = "shards"
IGNORE_PATCH = -1
"""Patch label of a patch without a clear majority class (the loss's ``ignore_index``)."""


def label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


def resize_nearest(label_map: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W) -> (size, size) or (h, w), each output pixel taking the input pixel under its
    centre."""
    height, width = label_map.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    rows = ((np.arange(out_h) + 0.5) * height / out_h).astype(np.int64)
    cols = ((np.arange(out_w) + 0.5) * width / out_w).astype(np.int64)
    return label_map[rows[:, None], cols[None, :]]


TILE_SEPARATOR = "#"


def plan_tiles(height: int, width: int, size: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """``tiles`` geometry: the size an image is rescaled to (short side ``size``, aspect kept,
    each side ``int(side * scale + 0.5)`` as the segmenter's rescale) and the (top, left) of its
    ``size`` x ``size`` tiles, placed as the segmenter places windows with stride = size."""
    from fmbseg.geometry import slide_starts

    scale = size / min(height, width)
    resized = (max(size, int(height * scale + 0.5)), max(size, int(width * scale + 0.5)))
    tops, lefts = (slide_starts(side, size, size) for side in resized)
    return resized, [(top, left) for top in tops for left in lefts]


def patch_labels(
    label_map: np.ndarray, patch_size: int, num_classes: int, min_fraction: float
) -> np.ndarray:
    """(H, W) label map at the encoder's input size -> (h, w) int32 patch labels.

    A patch takes the class with most pixels when it covers at least ``min_fraction`` of all the
    patch's pixels (unlabelled pixels count in the area but never win). A tie for the most pixels
    is no majority, so that patch is ignored (-1), as is a patch with no labelled pixel.
    """
    height, width = label_map.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"label map {height}x{width} is not a multiple of patch size {patch_size}")
    values = label_map.astype(np.int64)
    unlabelled = values == IGNORE_LABEL
    outside = ~unlabelled & ((values < 0) | (values >= num_classes))
    if outside.any():
        raise ValueError(
            f"label {int(values[outside][0])} is outside the vocabulary of {num_classes} classes"
        )
    values[unlabelled] = num_classes  # a bin of its own, dropped before the vote
    grid_h, grid_w = height // patch_size, width // patch_size
    patch = (np.arange(height) // patch_size)[:, None] * grid_w + np.arange(width) // patch_size
    bins = num_classes + 1
    counts = np.bincount((patch * bins + values).ravel(), minlength=grid_h * grid_w * bins)
    counts = counts.reshape(grid_h * grid_w, bins)[:, :num_classes]
    best = counts.argmax(axis=1)
    top = counts[np.arange(len(counts)), best]
    unique = (counts == top[:, None]).sum(axis=1) == 1
    keep = unique & (top > 0) & (top >= min_fraction * patch_size * patch_size)
    return np.where(keep, best, IGNORE_PATCH).astype(np.int32).reshape(grid_h, grid_w)


def read_merge_vocabulary(labels_dir: Path) -> tuple[str, ...]:
    """The class names of a merge folder's label maps (its ``run.json``)."""
    run_file = labels_dir / RUN_FILE
    if not run_file.is_file():
        raise InputError(f"{labels_dir}: not a merged pseudo-label folder ({RUN_FILE} missing)")
    try:
        names = json.loads(run_file.read_text(encoding="utf-8"))["pseudolabel_run"]["vocabulary"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{run_file}: no pseudolabel_run.vocabulary in it") from None
    return validate_vocabulary(names)


@dataclass(frozen=True)
class _Entry:
    """One cached row: a whole image (``square``) or one tile of it (``tiles``)."""

    name: str
    pixels: np.ndarray  # (3, S, S) float32 in [0, 1]
    patch_labels: np.ndarray  # (h, w)
    label_map: np.ndarray | None  # (M, M) at features.label_map_size, or None


@dataclass(frozen=True)
class _Shard:
    index: int
    image_ids: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


def _marker(out: Path, shard_name: str) -> Path:
    return out / SHARD_DIR / f"{shard_name}.json"


def _inputs_sha256(keys: Sequence[str], paths: dict[str, Path], labels_root: Path) -> str:
    """Digest of every image's and label map's bytes: a resumed cache must not keep shards of
    images that were replaced under the same names (DVC reruns the stage, the ids stay)."""
    digest = hashlib.sha256()
    for key in keys:
        image, labels = sha256_file(paths[key]), sha256_file(label_map_path(labels_root, key))
        digest.update(f"{key}\t{image}\t{labels}\n".encode())
    return digest.hexdigest()


class _ShardWriter:
    """Encodes one shard's images batch by batch into preallocated fp16 / int arrays."""

    def __init__(
        self,
        params: Params,
        encoder: PatchEncoder,
        labels_root: Path,
        paths: dict[str, Path],
        num_classes: int,
    ) -> None:
        self.params = params
        self.encoder = encoder
        self.labels_root = labels_root
        self.paths = paths
        self.num_classes = num_classes
        self.size = params.features.image_size
        self.grid = self.size // encoder.patch_size

    def _read_label_map(self, key: str, image: np.ndarray) -> np.ndarray:
        label_file = label_map_path(self.labels_root, key)
        try:
            label_map = read_label_map(label_file)
        except OSError as exc:
            raise InputError(f"{label_file}: cannot read label map ({exc})") from None
        if label_map.ndim != 2:
            raise InputError(f"{label_file}: not a single-channel label map")
        if label_map.shape != image.shape[:2]:
            raise InputError(
                f"{label_file}: label map is {label_map.shape[1]}x{label_map.shape[0]} but its "
                f"image is {image.shape[1]}x{image.shape[0]}; the labels belong to other images"
            )
        return label_map

    def _prepare(self, key: str, image: np.ndarray) -> list[_Entry]:
        """The entries of one image under ``features.geometry``: pixels (3, S, S) float32 in
        [0, 1], patch labels (h, w) and, when ``features.label_map_size`` is set, the entry's
        label map at that size (-1 = unlabelled)."""
        label_map = self._read_label_map(key, image)
        size = self.size
        if self.params.features.geometry == "square":
            from PIL import Image

            resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
            crops = [(key, pixels, resize_nearest(label_map, size))]
        else:
            from fmbseg.segmenter import resize_bilinear

            rescaled, tiles = plan_tiles(*image.shape[:2], size)
            image_pixels = resize_bilinear(image, rescaled)[0].numpy()
            labels_at_size = resize_nearest(label_map, rescaled)
            crops = [
                (
                    f"{key}{TILE_SEPARATOR}{k}",
                    image_pixels[:, top : top + size, left : left + size],
                    labels_at_size[top : top + size, left : left + size],
                )
                for k, (top, left) in enumerate(tiles)
            ]
        map_size = self.params.features.label_map_size
        entries = []
        for name, pixels, labels in crops:
            try:
                patches = patch_labels(
                    labels,
                    self.encoder.patch_size,
                    self.num_classes,
                    self.params.features.min_label_fraction,
                )
            except ValueError as exc:
                raise InputError(f"{label_map_path(self.labels_root, key)}: {exc}") from None
            small = None
            if map_size:
                small = resize_nearest(labels, map_size)
                small = np.where(small == IGNORE_LABEL, IGNORE_PATCH, small)
            entries.append(_Entry(name, np.ascontiguousarray(pixels), patches, small))
        return entries

    def _encode(self, batch: list[np.ndarray], keys: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            features = self.encoder.encode(torch.from_numpy(np.stack(batch)))
        expected = (len(batch), self.grid, self.grid)
        if tuple(features.shape[:3]) != expected:
            raise RuntimeError(
                f"encoder returned features shaped {tuple(features.shape)} for {len(batch)} "
                f"images of {self.size}x{self.size}, expected {expected} + (C,)"
            )
        half = features.detach().to("cpu", torch.float16).numpy()
        if not np.isfinite(half).all():
            raise FmbsegError(
                f"encoder features of {', '.join(keys)} are not finite in float16 "
                f"(encoder provenance {self.encoder.provenance.tag})"
            )
        return half

    def write(self, out: Path, shard: _Shard, progress: Any) -> None:
        from safetensors.numpy import save

        start = time.perf_counter()
        kept: list[str] = []
        failed: dict[str, str] = {}
        encoded: list[np.ndarray] = []
        patch_grids: list[np.ndarray] = []
        label_maps: list[np.ndarray] = []
        batch: list[_Entry] = []

        def flush() -> None:
            encoded.append(self._encode([e.pixels for e in batch], [e.name for e in batch]))
            kept.extend(entry.name for entry in batch)
            patch_grids.extend(entry.patch_labels for entry in batch)
            label_maps.extend(e.label_map for e in batch if e.label_map is not None)
            batch.clear()

        for key in shard.image_ids:
            try:
                image = read_rgb(self.paths[key], self.params.pseudolabel.max_image_pixels)
            except InputError as exc:
                failed[key] = str(exc)
                log.warning("skipped %s", exc)
                progress.update(1)
                continue
            for entry in self._prepare(key, image):
                batch.append(entry)
                if len(batch) == self.params.models.encoder.batch_size:
                    flush()
            progress.update(1)
        if batch:
            flush()
        dtype = label_dtype(self.num_classes)
        features = np.concatenate(encoded) if encoded else None
        labels = np.stack(patch_grids).astype(dtype) if patch_grids else None

        info: dict[str, Any] = {
            "shard": shard.index,
            "images": kept,
            "failed": failed,
            "encoder": {**asdict(self.encoder.provenance), "tag": self.encoder.provenance.tag},
        }
        if features is not None and labels is not None:
            tensors = {"features": features, "labels": labels}
            if label_maps:
                tensors["label_maps"] = np.stack(label_maps).astype(dtype)
            data = save(tensors)
            file = out / SHARD_DIR / f"{shard.name}.safetensors"
            with atomic_write(file) as handle:
                handle.write(data)
            info |= {
                "file": file.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "features_shape": list(features.shape),
                "labels_shape": list(labels.shape),
                "labels_dtype": labels.dtype.name,
                "labelled_patches": int((labels != IGNORE_PATCH).sum()),
            }
        info["seconds"] = time.perf_counter() - start
        write_text_atomic(_marker(out, shard.name), json.dumps(info, ensure_ascii=False))


def run_cache_features(
    params: Params,
    images_dir: str | Path,
    labels_dir: str | Path,
    out_dir: str | Path,
    *,
    encoder: PatchEncoder | None = None,
    limit: int | None = None,
    show_progress: bool = True,
    restart_if_changed: bool = False,
) -> dict[str, Any]:
    """Cache features and patch labels of every labelled image; resumable per shard.

    ``labels_dir`` is a merge folder (``run.json`` + ``labels/``). Returns the index's summary.
    A cache of other inputs or params in ``out_dir`` is refused, or replaced with
    ``restart_if_changed``.
    """
    from tqdm import tqdm

    images_root, labels_root, out = Path(images_dir), Path(labels_dir), Path(out_dir)
    vocabulary = read_merge_vocabulary(labels_root)
    paths = {image_id(path, images_root): path for path in list_images(images_root)}
    labelled = [key for key in paths if label_map_path(labels_root, key).is_file()]
    without_labels = sorted(paths.keys() - set(labelled))
    if without_labels:
        log.warning(
            "%d of %d images have no label map in %s and are skipped (e.g. %s)",
            len(without_labels),
            len(paths),
            labels_root / "labels",
            without_labels[0],
        )
    labelled = labelled[:limit]
    if not labelled:
        raise InputError(
            f"no image below {images_root} has a label map in {labels_root / 'labels'}"
        )

    per_shard = params.features.images_per_shard
    shards = [
        _Shard(i // per_shard, tuple(labelled[i : i + per_shard]))
        for i in range(0, len(labelled), per_shard)
    ]
    record = {
        # A key at the value older caches had without it keeps their fingerprint.
        "features": params.features.model_dump(mode="json", exclude=_unrecorded(params)),
        "encoder": params.models.encoder.model_dump(mode="json"),
        "precision": params.models.precision,
        "vocabulary": list(vocabulary),
        "labels_run_sha256": sha256_file(labels_root / RUN_FILE),
        "images": len(labelled),
        "inputs_sha256": _inputs_sha256(labelled, paths, labels_root),
    }
    resuming = claim_output(
        out,
        record,
        kind="features",
        work=SHARD_DIR,
        restart_if_changed=restart_if_changed,
        own_files=(INDEX_FILE,),
        own_dirs=(SHARD_DIR,),
    )
    pending = [shard for shard in shards if not _marker(out, shard.name).is_file()]
    if pending:
        encoder = _ready_encoder(params, encoder)
        if not resuming:  # the encoder loaded: only now does the cache leave files
            write_run_record(out, record)
        writer = _ShardWriter(params, encoder, labels_root, paths, len(vocabulary))
        total = sum(len(shard.image_ids) for shard in pending)
        with tqdm(
            total=total, unit="img", desc="cache features", disable=not show_progress
        ) as progress:
            for shard in pending:
                writer.write(out, shard, progress)
    return _write_index(out, shards, vocabulary, params, without_labels)


def _unrecorded(params: Params) -> set[str]:
    """``features`` keys left out of the run record at the value caches had before the key
    existed, so those caches keep their fingerprint."""
    features = params.features
    unrecorded = set()
    if not features.label_map_size:
        unrecorded.add("label_map_size")
    if features.geometry == "square":
        unrecorded.add("geometry")
    return unrecorded


def _ready_encoder(params: Params, encoder: PatchEncoder | None) -> PatchEncoder:
    """The given encoder, or the configured one built (its weights found and loaded)."""
    from fmbseg.models.registry import build_patch_encoder

    if encoder is None:
        encoder = build_patch_encoder(params.models)
    size = params.features.image_size
    if size % encoder.patch_size:
        raise ConfigError(
            f"features.image_size={size} is not a multiple of the encoder's patch size "
            f"{encoder.patch_size}"
        )
    return encoder


def _write_index(
    out: Path,
    shards: Sequence[_Shard],
    vocabulary: tuple[str, ...],
    params: Params,
    without_labels: list[str],
) -> dict[str, Any]:
    infos = [json.loads(_marker(out, shard.name).read_text(encoding="utf-8")) for shard in shards]
    stored = [info for info in infos if "file" in info]
    encoders = {info["encoder"]["tag"]: info["encoder"] for info in infos}
    if len(encoders) > 1:
        raise InputError(
            f"{out}: shards were made by different encoder weights ({', '.join(sorted(encoders))}); "
            "delete the folder to start over"
        )
    if not stored:
        raise InputError(f"{out}: no image could be read, so no features were cached")
    grids = {tuple(info["features_shape"][1:]) for info in stored}
    if len(grids) > 1:
        raise InputError(f"{out}: shards hold different feature shapes {sorted(grids)}")
    entries = [name for info in infos for name in info["images"]]
    images = len(entries)
    patches = sum(
        info["labels_shape"][0] * info["labels_shape"][1] * info["labels_shape"][2]
        for info in stored
    )
    failed = {key: reason for info in infos for key, reason in info["failed"].items()}
    grid_h, grid_w, dim = grids.pop()
    index = {
        "vocabulary": list(vocabulary),
        "encoder": next(iter(encoders.values())),
        "image_size": params.features.image_size,
        "geometry": params.features.geometry,
        "min_label_fraction": params.features.min_label_fraction,
        "grid": [grid_h, grid_w],
        "dim": dim,
        "labels_dtype": label_dtype(len(vocabulary)).name,
        "label_map_size": params.features.label_map_size,
        "images": images,  # cached entries: tiles under the tiles geometry
        "source_images": len(
            {name.rsplit(TILE_SEPARATOR, 1)[0] for name in entries}
            if params.features.geometry == "tiles"
            else entries
        ),
        "labelled_patch_fraction": sum(info["labelled_patches"] for info in stored) / patches,
        "failed_images": failed,
        "images_without_labels": without_labels,
        "seconds": sum(info["seconds"] for info in infos),
        "shards": [
            {
                key: info[key]
                for key in ("file", "sha256", "images", "features_shape", "labels_shape")
            }
            for info in stored
        ],
    }
    write_text_atomic(out / INDEX_FILE, json.dumps(index, indent=2, ensure_ascii=False))
    return {key: value for key, value in index.items() if key != "shards"} | {"shards": len(stored)}


@dataclass(frozen=True)
class FeatureShard:
    """One verified shard: features (n, h, w, C) float16 and labels (n, h, w), -1 = ignored."""

    name: str
    image_ids: tuple[str, ...]
    features: torch.Tensor
    labels: torch.Tensor
    label_maps: torch.Tensor | None = None  # (n, S, S), -1 = unlabelled; caches that stored them

    def __len__(self) -> int:
        return len(self.image_ids)


class FeatureShards:
    """Read access to a finished feature cache; every shard is verified as it is loaded."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_file = self.folder / INDEX_FILE
        if not index_file.is_file():
            raise InputError(f"{self.folder}: no finished feature cache ({INDEX_FILE} missing)")
        try:
            self.index: dict[str, Any] = json.loads(index_file.read_text(encoding="utf-8"))
            self.vocabulary = validate_vocabulary(self.index["vocabulary"])
            self.grid: tuple[int, int] = tuple(self.index["grid"])  # type: ignore[assignment]
            self.dim = int(self.index["dim"])
            self.encoder: dict[str, Any] = dict(self.index["encoder"])
            self._shards: list[dict[str, Any]] = list(self.index["shards"])
            # Caches from before label maps were stored hold none (0).
            self.label_map_size = int(self.index.get("label_map_size", 0))
            # Caches written before geometries had names resized every image to a square.
            self.geometry: str = str(self.index.get("geometry", "square"))
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{index_file}: not a feature-cache index ({exc})") from None
        identity = {
            "vocabulary": self.index["vocabulary"],
            "encoder": self.encoder.get("tag"),
            "shards": [[shard["sha256"], shard["images"]] for shard in self._shards],
        }
        # What the cache holds, not how long it took: stable when an identical cache is rebuilt.
        self.content_sha256 = hashlib.sha256(
            json.dumps(identity, sort_keys=True).encode("utf-8")
        ).hexdigest()

    @property
    def num_images(self) -> int:
        return sum(len(shard["images"]) for shard in self._shards)

    def __len__(self) -> int:
        return len(self._shards)

    def __iter__(self) -> Iterator[FeatureShard]:
        return (self.load(i) for i in range(len(self)))

    def load(self, position: int) -> FeatureShard:
        """Shard ``position`` of the index; :class:`InputError` naming its file if corrupt."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load

        entry = self._shards[position]
        file = self.folder / SHARD_DIR / entry["file"]
        hint = "delete it and its .json, then rerun the feature cache"
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise InputError(f"{file}: feature shard cannot be read ({exc.strerror})") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise InputError(f"{file}: sha256 {digest[:12]}… does not match {INDEX_FILE}; {hint}")
        try:
            tensors = load(data)
        except SafetensorError as exc:
            raise InputError(f"{file}: not a safetensors file ({exc}); {hint}") from None
        features, labels = tensors.get("features"), tensors.get("labels")
        if features is None or labels is None:
            raise InputError(f"{file}: features or labels tensor missing; {hint}")
        shapes = (list(features.shape), list(labels.shape))
        if shapes != (entry["features_shape"], entry["labels_shape"]) or shapes[0][1:] != [
            *self.grid,
            self.dim,
        ]:
            raise InputError(
                f"{file}: shapes features {shapes[0]}, labels {shapes[1]} differ from "
                f"{INDEX_FILE} ({entry['features_shape']}, {entry['labels_shape']}); {hint}"
            )
        if features.dtype != torch.float16 or labels.dtype not in (torch.int16, torch.int32):
            raise InputError(
                f"{file}: dtypes {features.dtype}/{labels.dtype}, expected float16/int; {hint}"
            )
        if not bool(torch.isfinite(features).all()):
            raise InputError(f"{file}: features hold NaN or infinite values; {hint}")
        if bool(((labels < IGNORE_PATCH) | (labels >= len(self.vocabulary))).any()):
            raise InputError(
                f"{file}: labels outside [-1, {len(self.vocabulary)}) for its vocabulary; {hint}"
            )
        label_maps = tensors.get("label_maps")
        size = self.label_map_size
        if size and (
            label_maps is None
            or list(label_maps.shape) != [len(entry["images"]), size, size]
            or label_maps.dtype != labels.dtype
            or bool(((label_maps < IGNORE_PATCH) | (label_maps >= len(self.vocabulary))).any())
        ):
            raise InputError(f"{file}: label_maps missing or not {size}x{size} labels; {hint}")
        return FeatureShard(
            Path(entry["file"]).stem, tuple(entry["images"]), features, labels, label_maps
        )
