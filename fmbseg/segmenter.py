"""The open-vocabulary segmenter: a trained method's window scores (FMbSeg: frozen encoder ->
alignment module -> cosine with the class prompts' text embeddings) -> bilinear upsampling ->
argmax. Any vocabulary, at test time.

Sliding-window inference follows TCL's protocol by default (short side 448, 448 windows,
stride 224, scores averaged where windows overlap). Each side of the resized image is rounded
to whole encoder patches so every window is a valid encoder input.
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
from fmbseg.models.vocabulary import validate_vocabulary
from fmbseg.pseudolabel.dense import image_to_tensor, plan_windows

if TYPE_CHECKING:
    from fmbseg.methods import WindowScorer


@dataclass(frozen=True)
class Background:
    """How a vocabulary's background class is predicted (e.g. PV-21's class 0).

    ``stuff``: these extra names are scored too and any pixel won by one is background (the
    paper's rule, with COCO-Stuff's stuff names). ``threshold``: pixels whose best cosine
    score is below it are background.
    """

    index: int
    stuff_names: tuple[str, ...] = ()
    threshold: float | None = None


@dataclass(frozen=True)
class Segmentation:
    labels: np.ndarray  # (H, W) int64 indices into the vocabulary
    scores: torch.Tensor  # (K', H, W) scores of the queried names (FMbSeg: cosine), on CPU


class OpenVocabularySegmenter:
    """Any trained method's :class:`~fmbseg.methods.WindowScorer`, run over a whole image:
    resize, windows, scores averaged where windows overlap, upsampled, decided per pixel."""

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

    @torch.no_grad()
    def score(self, image: np.ndarray, vocabulary: Any) -> torch.Tensor:
        """(K, H, W) scores of an (H, W, 3) uint8 image against a prepared vocabulary."""
        height, width = image.shape[:2]
        patch = self.scorer.patch_size
        config = self.config
        window = config.window if config.mode == "sliding" else 0
        grid = plan_windows(
            height,
            width,
            short_side=config.short_side,
            crop=window or patch,
            stride=config.stride if window else patch,
            patch=patch,
            stride_key="inference.stride",
        )
        resized = F.interpolate(
            image_to_tensor(image), size=grid.resized_size, mode="bilinear", antialias=True
        ).to(self.device)
        if not window:
            return self._upsample(
                self.scorer.score_windows(resized, vocabulary)[0], (height, width)
            )
        total: torch.Tensor | None = None
        counts = torch.zeros(1, *grid.resized_size, device=self.device)
        for start in range(0, len(grid.offsets), self.batch_size):
            chunk = grid.offsets[start : start + self.batch_size]
            crops = torch.cat(
                [resized[:, :, top : top + window, left : left + window] for top, left in chunk]
            )
            scores = F.interpolate(
                self.scorer.score_windows(crops, vocabulary).to(self.device),
                size=(window, window),
                mode="bilinear",
            )
            if total is None:
                total = torch.zeros(scores.shape[1], *grid.resized_size, device=self.device)
            for (top, left), window_scores in zip(chunk, scores, strict=True):
                total[:, top : top + window, left : left + window] += window_scores
                counts[:, top : top + window, left : left + window] += 1
        assert total is not None  # plan_windows gives at least one window
        return self._upsample(total / counts, (height, width))

    @staticmethod
    def _upsample(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(scores[None], size=size, mode="bilinear")[0].cpu()

    def segment(
        self, image: np.ndarray, class_names: Sequence[str], background: Background | None = None
    ) -> Segmentation:
        """Per-pixel class indices into ``class_names`` (and the scores behind them)."""
        names = validate_vocabulary(class_names)
        if background is None:
            scores = self.score(image, self.scorer.prepare(names))
            return Segmentation(scores.argmax(0).numpy(), scores)
        foreground = [i for i in range(len(names)) if i != background.index]
        queried = [names[i] for i in foreground] + [
            name for name in background.stuff_names if name not in names
        ]
        scores = self.score(image, self.scorer.prepare(tuple(queried)))
        best, winner = scores.max(0)
        to_output = torch.tensor(foreground + [background.index] * (len(queried) - len(foreground)))
        labels = to_output[winner]
        if background.threshold is not None:
            labels[best < background.threshold] = background.index
        return Segmentation(labels.numpy(), scores)


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
