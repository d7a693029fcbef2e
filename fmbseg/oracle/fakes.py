"""Fake CLIP, SAM and DINOv2 that read classes off an :class:`OracleWorld`'s colours.

Each implements its protocol in :mod:`fmbseg.models.base`, so a stage cannot tell it from a
real backend, while its outputs follow from the true labels: the right answer of every
stage is known. Optional noise and mask perturbations model imperfect foundation models.

Randomness is a pure function of ``seed`` and the input's content (never of call order or
batching), except :class:`FakeSam`'s merges, which draw from a generator seeded once.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch
from scipy import ndimage

from fmbseg.config import AutoMaskConfig, ModelsConfig
from fmbseg.models.base import DenseEmbeddings, PointMask, ProposedMask, WeightProvenance
from fmbseg.models.runtime import Runtime
from fmbseg.oracle.scenes import (
    UNKNOWN,
    OracleWorld,
    connected_regions,
    labels_at_points,
    mask_iou,
    normalize_name,
    patch_vote,
)

WHOLE_REGION_QUALITY = (1.0, 1.0)
"""(predicted IoU, stability) of a proposed mask that is a whole true region."""
SPLIT_REGION_QUALITY = (0.90, 0.96)
"""The same for half a region under ``oversegment``: passes SAM's defaults (0.88, 0.95)."""
_AMBIGUOUS_VOTE = 1e-3  # a blended pixel's vote: decides only patches of pure blends


def _key(*parts: str | bytes) -> int:
    """A seed from strings or bytes that is the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
        digest.update(b"\0")
    return int.from_bytes(digest.digest()[:8], "little")


def _gaussian(dim: int, *parts: str | bytes) -> np.ndarray:
    return np.random.default_rng(_key(*parts)).standard_normal(dim)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pixels(images: torch.Tensor, patch_size: int) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) float32 in the 0-255 scale."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped (B, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch size {patch_size}")
    return images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy() * 255.0


def _patch_palette_index(world: OracleWorld, pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """Majority palette index per patch (``num_classes`` = unknown colour).

    Blended pixels (left by a bilinear resize) count as their dominant colour but barely
    vote, so they decide only patches that lie wholly inside a wide blend.
    """
    index, clean = world.unblend(pixels)
    weights = np.where(clean, 1.0, _AMBIGUOUS_VOTE)
    winner, _ = patch_vote(index, world.num_classes + 1, patch_size, weights)
    return winner


def _image_noise(seed: int, image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise determined by ``seed`` and the image's bytes alone."""
    return np.random.default_rng(
        [seed, _key(np.ascontiguousarray(image).tobytes())]
    ).standard_normal(shape)


class FakeClip:
    """CLIP's role. A class's text embedding is a fixed random unit vector seeded by its name;
    a patch's embedding is the text embedding of its majority class (plus noise).

    Text: the longest world class name found (as whole words, NFC and case-insensitive) in a
    prompt decides its embedding, so any template works; other text gets a vector seeded by
    the text itself. Pixels of the unknown colour get a "nuisance" vector orthogonal to every
    class of the world. With ``noise`` > 0 each patch gets Gaussian noise of expected norm
    ``noise`` before re-normalising (seeded by ``seed`` and the image content); with 0 a patch
    inside one class equals that class's text embedding bit for bit. The image embedding is
    the normalised mean of the patch embeddings, so it favours the class with most area.
    """

    def __init__(
        self,
        world: OracleWorld,
        image_size: int = 64,
        patch_size: int = 8,
        embed_dim: int = 64,
        noise: float = 0.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        if embed_dim <= world.num_classes:
            raise ValueError(f"embed_dim must exceed the {world.num_classes} classes of the world")
        self.world = world
        self.noise = float(noise)
        self.seed = seed
        self.device = torch.device(device)
        self.provenance = WeightProvenance("clip", "oracle", "synthetic")
        self._image_size, self._patch_size, self._dim = image_size, patch_size, embed_dim
        classes = np.stack([self._text_vector(normalize_name(n)) for n in world.class_names])
        basis, _ = np.linalg.qr(classes.T)
        nuisance = _gaussian(embed_dim, "clip-nuisance")
        nuisance = _unit(nuisance - basis @ (basis.T @ nuisance))
        self._table = np.vstack([classes, nuisance]).astype(np.float32)  # row K: unknown colour
        self._patterns = sorted(
            (
                (len(key), re.compile(rf"(?<!\w){re.escape(key)}(?!\w)"), k)
                for k, key in enumerate(normalize_name(n) for n in world.class_names)
            ),
            key=lambda item: -item[0],
        )

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def embed_dim(self) -> int:
        return self._dim

    def _text_vector(self, key: str) -> np.ndarray:
        return _unit(_gaussian(self._dim, "clip-text", key))

    def class_of_text(self, text: str) -> int | None:
        """World class id a prompt names (longest name wins), or None."""
        folded = normalize_name(text)
        return next((k for _, pattern, k in self._patterns if pattern.search(folded)), None)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            k = self.class_of_text(text)
            rows.append(
                self._table[k]
                if k is not None
                else self._text_vector("\0" + text).astype(np.float32)
            )
        embeddings = np.stack(rows) if rows else np.zeros((0, self._dim), np.float32)
        return torch.from_numpy(embeddings).to(self.device)

    def encode_images(self, images: torch.Tensor) -> DenseEmbeddings:
        pixels = _pixels(images, self._patch_size)
        patches = self._table[_patch_palette_index(self.world, pixels, self._patch_size)]
        if self.noise:
            scale = self.noise / np.sqrt(self._dim)
            for b in range(len(patches)):
                patches[b] += scale * _image_noise(self.seed, pixels[b], patches[b].shape)
            patches = _unit(patches).astype(np.float32)
        image = _unit(patches.mean((1, 2), dtype=np.float64)).astype(np.float32)
        return DenseEmbeddings(
            torch.from_numpy(image).to(self.device), torch.from_numpy(patches).to(self.device)
        )


class FakeSamEmbedding:
    """What :meth:`FakeSam.embed_image` "sees": decoded classes and their connected regions."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels  # (H, W) class ids, UNKNOWN for the unknown colour
        self.regions, self.region_labels = connected_regions(labels)


class FakeSam:
    """SAM's role, answering with the true 4-connected regions of equal class, as
    :meth:`OracleWorld.unblend` reads them (exact on rendered, un-resized images).

    ``predict_from_points``: the region under most foreground points (ties: the earliest
    point's), background points ignored; with probability ``merge_probability`` united with a
    random touching region, then eroded by ``erode`` and dilated by ``dilate`` pixels (an
    erosion that would empty the mask is skipped). Its score is the IoU with the true region,
    so 1.0 unless perturbed. ``generate_masks``: every region that a grid point of
    ``config.points_per_side`` lands in, or with ``oversegment`` each region of two pixels or
    more cut in two halves along its longer side; then the config's quality and area
    thresholds. True regions never overlap, so box NMS has nothing to remove.
    ``embed_calls`` counts embeddings, to check that each image is encoded once.
    """

    def __init__(
        self,
        world: OracleWorld,
        erode: int = 0,
        dilate: int = 0,
        merge_probability: float = 0.0,
        oversegment: bool = False,
        seed: int = 0,
    ) -> None:
        self.world = world
        self.erode, self.dilate = erode, dilate
        self.merge_probability = merge_probability
        self.oversegment = oversegment
        self.provenance = WeightProvenance("sam", "oracle", "synthetic")
        self.embed_calls = 0
        self._rng = np.random.default_rng(seed)

    def embed_image(self, image: np.ndarray) -> FakeSamEmbedding:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        self.embed_calls += 1
        index, _ = self.world.unblend(image)
        return FakeSamEmbedding(np.where(index == self.world.num_classes, UNKNOWN, index))

    def predict_from_points(
        self, embedding: FakeSamEmbedding, points_xy: np.ndarray, point_labels: np.ndarray
    ) -> PointMask:
        points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        foreground = points[np.asarray(point_labels).reshape(-1) == 1]
        if not len(foreground):
            raise ValueError("predict_from_points needs at least one foreground point")
        hits = labels_at_points(embedding.regions, foreground)
        counts = np.bincount(hits)
        region = int(hits[counts[hits] == counts.max()][0])
        truth = embedding.regions == region
        mask = truth
        if self.merge_probability and self._rng.random() < self.merge_probability:
            neighbours = np.unique(embedding.regions[ndimage.binary_dilation(truth) & ~truth])
            if len(neighbours):
                mask = truth | (embedding.regions == self._rng.choice(neighbours))
        if self.erode:
            eroded = ndimage.binary_erosion(mask, iterations=self.erode, border_value=1)
            mask = eroded if eroded.any() else mask
        if self.dilate:
            mask = ndimage.binary_dilation(mask, iterations=self.dilate)
        return PointMask(mask, mask_iou(mask, truth))

    def generate_masks(
        self, embedding: FakeSamEmbedding, config: AutoMaskConfig
    ) -> list[ProposedMask]:
        regions = embedding.regions
        height, width = regions.shape
        n = config.points_per_side
        grid_rows = ((np.arange(n) + 0.5) * height / n).astype(int)
        grid_cols = ((np.arange(n) + 0.5) * width / n).astype(int)
        candidates: list[tuple[np.ndarray, tuple[float, float]]] = []
        for region in range(len(embedding.region_labels)):
            mask = regions == region
            if self.oversegment and mask.sum() >= 2:
                candidates.extend((half, SPLIT_REGION_QUALITY) for half in _halves(mask))
            else:
                candidates.append((mask, WHOLE_REGION_QUALITY))
        proposals = []
        for mask, (iou, stability) in candidates:
            fraction = mask.sum() / mask.size
            if (
                mask[grid_rows[:, None], grid_cols[None, :]].any()
                and config.min_area_fraction <= fraction <= config.max_area_fraction
                and iou >= config.pred_iou_thresh
                and stability >= config.stability_score_thresh
            ):
                proposals.append(ProposedMask(mask, iou, stability))
        return proposals


def _halves(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a mask into two equal-area parts along its longer bounding-box side."""
    ys, xs = np.nonzero(mask)
    along = ys if np.ptp(ys) >= np.ptp(xs) else xs
    order = np.argsort(along, kind="stable")
    first = np.zeros_like(mask)
    first[ys[order[: len(order) // 2]], xs[order[: len(order) // 2]]] = True
    return first, mask & ~first


class FakeEncoder:
    """DINOv2's role: per patch, a class vector (seeded by the class name, independent of
    :class:`FakeClip`'s text space) times ``signal``, then ``nuisance_dim`` dimensions of noise
    specific to the patch and image (seeded by ``seed`` and the image content, so encoding
    the same image twice gives the same features, as a frozen network would).

    Both parts have expected norm about 1 before ``signal``; features are not normalised
    (real DINOv2 features are not). Pixels of the unknown colour form a class of their own.
    """

    def __init__(
        self,
        world: OracleWorld,
        patch_size: int = 8,
        class_dim: int = 16,
        nuisance_dim: int = 16,
        signal: float = 1.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.world = world
        self.class_dim, self.nuisance_dim = class_dim, nuisance_dim
        self.signal = float(signal)
        self.seed = seed
        self.device = torch.device(device)
        self.provenance = WeightProvenance("encoder", "oracle", "synthetic")
        self._patch_size = patch_size
        keys = [normalize_name(n) for n in world.class_names] + ["\0unknown"]
        self.class_vectors = np.stack(
            [_gaussian(class_dim, "encoder-class", k) for k in keys]
        ) / np.sqrt(class_dim)

    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def embed_dim(self) -> int:
        return self.class_dim + self.nuisance_dim

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pixels = _pixels(images, self._patch_size)
        classes = (
            self.signal
            * self.class_vectors[_patch_palette_index(self.world, pixels, self._patch_size)]
        )
        nuisance = np.stack(
            [
                _image_noise(self.seed, image, (*classes.shape[1:3], self.nuisance_dim))
                for image in pixels
            ]
        ) / np.sqrt(max(self.nuisance_dim, 1))
        features = np.concatenate([classes, nuisance], -1).astype(np.float32)
        return torch.from_numpy(features).to(self.device)


def build_clip(models: ModelsConfig) -> FakeClip:
    """``models.clip.backend: oracle``: the default world, no noise."""
    return FakeClip(OracleWorld(), device=Runtime.from_config(models).torch_device())


def build_sam(models: ModelsConfig) -> FakeSam:
    """``models.sam.backend: oracle``: the default world, no perturbation."""
    return FakeSam(OracleWorld())


def build_encoder(models: ModelsConfig) -> FakeEncoder:
    """``models.encoder.backend: oracle``: the default world."""
    return FakeEncoder(OracleWorld(), device=Runtime.from_config(models).torch_device())
