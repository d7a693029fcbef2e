"""SAM 2 (the ``sam2`` package) as the :class:`PromptableSegmenter` role: ``models.sam.backend:
sam2``, ``models.sam.variant``: ``sam2.1_hiera_t``/``_s``/``_b+``/``_l`` (or ``sam2_hiera_*``,
the July 2024 release). Weights: Apache-2.0, not gated, from Meta's official URLs.

As with the ``segment_anything`` backend, the image is embedded once (Hiera + FPN, the
expensive part) and both routes reuse that embedding; the automatic masks follow
``SAM2AutomaticMaskGenerator`` with ``crop_n_layers=0``, ``use_m2m=False`` and
``multimask_output=True``. Everything else is SAM 2's own code: ``SAM2ImagePredictor``'s
transforms, prompt decoding and mask upsampling run on the stored embedding.

The package builds without its CUDA extension (``SAM2_BUILD_CUDA=0``); that extension only
fills small holes, which the generator skips when ``min_mask_region_area`` is 0 (ours).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.errors import ConfigError
from fmbseg.models.amg import keep_candidates, proposals_after_nms
from fmbseg.models.base import PointMask, ProposedMask, WeightProvenance
from fmbseg.models.runtime import Runtime
from fmbseg.models.weights import (
    WeightsRequest,
    load_state_dict_strictly,
    read_state_dict,
    resolve_weights,
    weights_dirs,
)

if TYPE_CHECKING:
    import torch

    from fmbseg.config import AutoMaskConfig, ModelsConfig

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/segment_anything_2"
INSTALL_HINT = 'SAM2_BUILD_CUDA=0 pip install --no-build-isolation "fmbseg[sam2]"'


@dataclass(frozen=True)
class Sam2Variant:
    """One SAM 2 model: its hydra config in the ``sam2`` package, overrides, and checkpoint."""

    name: str
    config_file: str  # e.g. configs/sam2.1/sam2.1_hiera_s.yaml
    checkpoint_file: str
    url: str | None
    overrides: tuple[str, ...] = ()  # hydra overrides (a tiny architecture in tests)


def _official(release: str, folder: str, size: str, file_size: str) -> Sam2Variant:
    name = f"{release}_hiera_{size}"
    return Sam2Variant(
        name=name,
        config_file=f"configs/{release}/{name}.yaml",
        checkpoint_file=f"{release}_hiera_{file_size}.pt",
        url=f"{OFFICIAL_URL}/{folder}/{release}_hiera_{file_size}.pt",
    )


_SIZES = (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large"))
_variants: dict[str, Sam2Variant] = {
    variant.name: variant
    for release, folder in (("sam2.1", "092824"), ("sam2", "072824"))
    for size, file_size in _SIZES
    for variant in [_official(release, folder, size, file_size)]
}


def register_sam2_variant(variant: Sam2Variant) -> None:
    """Make ``variant`` selectable as ``models.sam.variant`` with the ``sam2`` backend."""
    existing = _variants.get(variant.name)
    if existing is not None and existing != variant:
        raise ValueError(f"SAM 2 variant {variant.name!r} is already registered differently")
    _variants[variant.name] = variant


def sam2_variant(name: str) -> Sam2Variant:
    variant = _variants.get(name)
    if variant is None:
        known = ", ".join(sorted(_variants))
        raise ConfigError(f"models.sam.variant: unknown SAM 2 variant {name!r} (known: {known})")
    return variant


def build_sam2_module(variant: Sam2Variant) -> torch.nn.Module:
    """A randomly initialised ``SAM2Base`` of ``variant``'s architecture, in eval mode, on CPU."""
    try:
        from sam2.build_sam import build_sam2
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"models.sam.backend: sam2 needs the sam2 package ({exc.name} is missing): "
            f"{INSTALL_HINT}"
        ) from None
    return build_sam2(
        variant.config_file, None, device="cpu", hydra_overrides_extra=list(variant.overrides)
    )


@dataclass(frozen=True)
class Sam2Embedding:
    """The predictor's per-image state: image embedding, high-resolution features, size."""

    features: dict[str, Any]
    original_size: tuple[int, int]  # (H, W)


class Sam2Segmenter:
    """A frozen SAM 2: embed once, then answer point prompts and propose masks on that embedding."""

    def __init__(
        self,
        model: torch.nn.Module,
        variant: Sam2Variant,
        provenance: WeightProvenance,
        runtime: Runtime,
        points_per_batch: int,
    ) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.device = runtime.torch_device()
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.variant = variant
        self.provenance = provenance
        self.runtime = runtime
        self.points_per_batch = points_per_batch
        self.predictor = SAM2ImagePredictor(self.model)
        # The predictor writes down the feature sizes of a 1024 input; derive them instead.
        side = int(self.model.image_size)
        self.predictor._bb_feat_sizes = [(side // 4,) * 2, (side // 8,) * 2, (side // 16,) * 2]

    def embed_image(self, image: np.ndarray) -> Sam2Embedding:
        import torch

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"SAM 2 expects an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}"
            )
        with torch.no_grad(), self.runtime.autocast():
            self.predictor.set_image(image)
        features = self.predictor._features
        self.predictor.reset_predictor()
        return Sam2Embedding(features, (image.shape[0], image.shape[1]))

    def predict_from_points(
        self, embedding: Sam2Embedding, points_xy: np.ndarray, point_labels: np.ndarray
    ) -> PointMask:
        """All points form one prompt; of SAM 2's three candidate masks keep the best-scored."""
        points = np.asarray(points_xy, dtype=np.float32).reshape(-1, 2)
        labels = np.asarray(point_labels).reshape(-1)
        if len(points) != len(labels):
            raise ValueError(f"{len(points)} points but {len(labels)} labels")
        with self._image(embedding), self.runtime.autocast():
            masks, scores, _ = self.predictor.predict(points, labels, multimask_output=True)
        best = int(np.argmax(scores))
        return PointMask(mask=masks[best].astype(bool), score=float(scores[best]))

    def generate_masks(
        self, embedding: Sam2Embedding, config: AutoMaskConfig
    ) -> list[ProposedMask]:
        """``SAM2AutomaticMaskGenerator.generate`` on one grid over the whole image, plus area
        bounds; masks come by decreasing predicted IoU."""
        from sam2.utils import amg

        height, width = embedding.original_size
        grid = amg.build_point_grid(config.points_per_side) * np.array([[width, height]])
        data = amg.MaskData()
        with self._image(embedding), self.runtime.autocast():
            for (points,) in amg.batch_iterator(self.points_per_batch, grid):
                data.cat(self._grid_batch(embedding, points, config))
        return proposals_after_nms(data, config, amg)

    def _grid_batch(
        self, embedding: Sam2Embedding, points: np.ndarray, config: AutoMaskConfig
    ) -> Any:
        """``SAM2AutomaticMaskGenerator._process_batch`` for the whole image (no crop edges)."""
        import torch
        from sam2.utils import amg

        threshold = self.predictor.mask_threshold
        coords = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        coords = self.predictor._transforms.transform_coords(
            coords, normalize=True, orig_hw=embedding.original_size
        )
        labels = torch.ones(len(coords), dtype=torch.int, device=self.device)
        logits, quality, _ = self.predictor._predict(
            coords[:, None, :], labels[:, None], multimask_output=True, return_logits=True
        )
        data = amg.MaskData(
            logits=logits.float().flatten(0, 1), iou_preds=quality.float().flatten(0, 1)
        )
        if config.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > config.pred_iou_thresh)
        return keep_candidates(data, threshold, config, amg)

    @contextlib.contextmanager
    def _image(self, embedding: Sam2Embedding) -> Iterator[None]:
        """The predictor set to ``embedding`` (gradients off) for the ``with`` block."""
        import torch

        self.predictor._features = embedding.features
        self.predictor._orig_hw = [embedding.original_size]
        self.predictor._is_image_set = True
        self.predictor._is_batch = False
        try:
            with torch.no_grad():
                yield
        finally:
            self.predictor.reset_predictor()


def _download_checkpoint(variant: Sam2Variant, directory: Path) -> Path:
    from fmbseg.io.download import download_file

    assert variant.url is not None
    target = directory / "sam" / variant.checkpoint_file
    download_file(variant.url, target, sha256=None)
    return target


def build(models: ModelsConfig) -> Sam2Segmenter:
    """The ``sam2`` backend: variant from ``models.sam.variant``, weights via the resolver."""
    config = models.sam
    variant = sam2_variant(config.variant)
    dirs = weights_dirs(models.weights_dir)
    downloadable = variant.url is not None and dirs
    resolved = resolve_weights(
        WeightsRequest(
            role="sam",
            model=variant.name,
            filenames=(variant.checkpoint_file,),
            source_url=variant.url,
            download=functools.partial(_download_checkpoint, variant, dirs[0])
            if downloadable
            else None,
        ),
        checkpoint=config.checkpoint,
        weights_dir=models.weights_dir,
        allow_random_init=config.allow_random_init,
    )
    model = build_sam2_module(variant)
    if resolved.path is not None:
        load_state_dict_strictly(
            model, read_state_dict(resolved.path), resolved.path, f"SAM 2 {variant.name}"
        )
    return Sam2Segmenter(
        model, variant, resolved.provenance, Runtime.from_config(models), config.points_per_batch
    )
