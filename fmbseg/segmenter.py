"""The open-vocabulary segmenter: a trained method's window scores (FMbSeg: frozen encoder ->
alignment module -> cosine with the class prompts' text embeddings) -> bilinear upsampling ->
decision per pixel. Any vocabulary, at test time.

The geometry is mmseg's, which TCL (0.x) and SCLIP (1.x) evaluate with: a keep-ratio rescale
(``img_scale=(long_side, short_side)``, each side ``int(side * scale + 0.5)``, bilinear without
antialias on the uint8 image), windows placed as ``slide_inference`` places them (the last one
snapped to the border), each window's scores upsampled to the window, averaged per pixel where
windows overlap, and upsampled once more to the original image. A window is a whole number of
encoder patches, so the rescaled image needs no rounding; a region that is not (the whole image
in ``whole`` mode, or an image smaller than a window) is zero-padded at its bottom and right to
whole patches and its scores cropped back. ``aggregate: patches`` trades that exactness for
speed: the image is rounded to whole patches and window scores are averaged on the patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.config import InferenceConfig, Params
from fmbseg.geometry import plan_inference
from fmbseg.models.vocabulary import validate_vocabulary
from fmbseg.resample import resize_uint8

if TYPE_CHECKING:
    from fmbseg.methods import WindowScorer


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, h, w) float32 in [0, 1], resized as mmcv's ``imresize``
    (OpenCV ``INTER_LINEAR`` on uint8; :func:`fmbseg.resample.resize_uint8`)."""
    resized = resize_uint8(np.require(image, requirements=["C"]), size)
    return torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255.0


@dataclass(frozen=True)
class Background:
    """How a vocabulary's background class (e.g. PV-21's class 0) is predicted.

    ``stuff_names`` are scored with the vocabulary and a pixel won by one of them is background
    (the paper's PV-21 rule with COCO-Stuff's 91 stuff names; SCLIP's background words).
    ``threshold`` acts as a constant background score, as TCL does: a pixel whose best score is
    not above it is background. SCLIP instead thresholds probabilities:
    ``softmax(logit_scale * score)`` over every queried name, background being the best of its
    names; with ``area_threshold`` a class predicted on at most that share of the image's
    non-background pixels is dropped first; a pixel whose best probability is below
    ``probability_threshold`` is background. ``rule`` names the rule in metrics.json.
    """

    index: int
    stuff_names: tuple[str, ...] = ()
    threshold: float | None = None
    probability_threshold: float | None = None
    logit_scale: float = 40.0
    area_threshold: float | None = None
    rule: str = "custom"


@dataclass(frozen=True)
class Segmentation:
    labels: np.ndarray  # (H, W) int64 indices into the vocabulary
    scores: torch.Tensor  # (K', H, W) scores of the queried names (FMbSeg: cosine), on CPU


class OpenVocabularySegmenter:
    """Any trained method's :class:`~fmbseg.methods.WindowScorer`, run over a whole image:
    rescale, windows, scores averaged where windows overlap, upsampled, decided per pixel."""

    def __init__(
        self,
        scorer: WindowScorer,
        config: InferenceConfig,
        device: torch.device,
        batch_size: int = 4,
    ) -> None:
        self.scorer = scorer
        self.config = config
        self.device = device
        self.batch_size = batch_size

    def _score_regions(self, crops: torch.Tensor, vocabulary: Any, cells: bool) -> torch.Tensor:
        """Scores of (B, 3, h, w) crops at their own size (or, with ``cells``, on their patch
        grid); crops that are not whole patches are zero-padded for the scorer, then cropped."""
        patch = self.scorer.patch_size
        height, width = crops.shape[-2:]
        pad_h, pad_w = -height % patch, -width % patch
        padded = F.pad(crops, (0, pad_w, 0, pad_h)) if pad_h or pad_w else crops
        scores = self.scorer.score_windows(padded, vocabulary).to(self.device)
        if cells:
            size = ((height + pad_h) // patch, (width + pad_w) // patch)
        else:
            size = (height + pad_h, width + pad_w)
        if tuple(scores.shape[-2:]) != size:
            scores = F.interpolate(scores, size=size, mode="bilinear")
        if cells:
            return scores
        return scores[:, :, :height, :width]

    @torch.no_grad()
    def score(self, image: np.ndarray, vocabulary: Any) -> torch.Tensor:
        """(K, H, W) scores of an (H, W, 3) uint8 image against a prepared vocabulary."""
        height, width = image.shape[:2]
        patch = self.scorer.patch_size
        plan = plan_inference(height, width, self.config, patch)
        resized = resize_bilinear(image, plan.resized_size).to(self.device)
        cells = self.config.aggregate == "patches" and self.config.mode == "sliding"
        unit = patch if cells else 1
        grid = (plan.resized_size[0] // unit, plan.resized_size[1] // unit)
        total: torch.Tensor | None = None
        counts = torch.zeros(1, *grid, device=self.device)
        for start in range(0, len(plan.windows), self.batch_size):
            chunk = plan.windows[start : start + self.batch_size]
            crops = torch.cat([resized[:, :, t:b, le:r] for t, le, b, r in chunk])
            scores = self._score_regions(crops, vocabulary, cells)
            if total is None:
                total = torch.zeros(scores.shape[1], *grid, device=self.device)
            for (top, left, bottom, right), window_scores in zip(chunk, scores, strict=True):
                rows = slice(top // unit, bottom // unit)
                cols = slice(left // unit, right // unit)
                total[:, rows, cols] += window_scores
                counts[:, rows, cols] += 1
        assert total is not None  # every plan has at least one window
        return F.interpolate((total / counts)[None], size=(height, width), mode="bilinear")[0].cpu()

    def segment(
        self, image: np.ndarray, class_names: Sequence[str], background: Background | None = None
    ) -> Segmentation:
        """Per-pixel class indices into ``class_names`` (and the scores behind them)."""
        names = validate_vocabulary(class_names)
        if background is None:
            scores = self.score(image, self.scorer.prepare(names))
            return Segmentation(scores.argmax(0).numpy(), scores)
        foreground = [i for i in range(len(names)) if i != background.index]
        foreground_names = {names[i] for i in foreground}
        queried = [names[i] for i in foreground] + [
            name for name in background.stuff_names if name not in foreground_names
        ]
        scores = self.score(image, self.scorer.prepare(tuple(queried)))
        if background.probability_threshold is not None:
            labels = _decide_by_probability(scores, len(names), foreground, background)
            return Segmentation(labels.numpy(), scores)
        best, winner = scores.max(0)
        to_output = torch.tensor(foreground + [background.index] * (len(queried) - len(foreground)))
        labels = to_output[winner]
        if background.threshold is not None:
            labels[best <= background.threshold] = background.index
        return Segmentation(labels.numpy(), scores)


def _decide_by_probability(
    scores: torch.Tensor, num_classes: int, foreground: list[int], background: Background
) -> torch.Tensor:
    """SCLIP's ``postprocess_result``: probabilities over the queried names, background the best
    of its names, small classes dropped, low-probability pixels to background."""
    probabilities = (scores * background.logit_scale).softmax(0)
    per_class = torch.zeros(num_classes, *scores.shape[1:])
    per_class[foreground] = probabilities[: len(foreground)]
    if len(probabilities) > len(foreground):
        per_class[background.index] = probabilities[len(foreground) :].amax(0)
    if background.area_threshold is not None:
        predicted = torch.bincount(per_class.argmax(0).flatten(), minlength=num_classes).float()
        predicted[background.index] = 0
        kept = predicted > background.area_threshold * predicted.sum()
        kept[background.index] = True
        per_class *= kept[:, None, None]
    best, labels = per_class.max(0)
    labels[best < background.probability_threshold] = background.index  # type: ignore[operator]
    return labels


def load_segmenter(params: Params, model: str | Path) -> OpenVocabularySegmenter:
    """The trained model at ``model`` (its folder or a file in it), whatever its method, with
    the models ``params`` names for the roles it uses."""
    from fmbseg.methods import get_method, model_folder, read_model_record
    from fmbseg.models.runtime import Runtime

    device = Runtime.from_config(params.models).torch_device()
    record = read_model_record(model)
    scorer = get_method(record.method).load(params, model_folder(model), device)
    return OpenVocabularySegmenter(
        scorer, params.inference, device, params.models.encoder.batch_size
    )
