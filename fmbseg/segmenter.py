"""The open-vocabulary segmenter: frozen encoder -> alignment module -> cosine with the class
prompts' text embeddings -> bilinear upsampling -> argmax. Any vocabulary, at test time.

Sliding-window inference follows TCL's protocol by default (short side 448, 448 windows,
stride 224, scores averaged where windows overlap). Each side of the resized image is rounded
to whole encoder patches so every window is a valid encoder input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.align.module import AlignmentModule, load_module
from fmbseg.config import InferenceConfig, Params
from fmbseg.errors import WeightsError
from fmbseg.models.base import PatchEncoder
from fmbseg.models.vocabulary import VocabularyEncoder, validate_vocabulary
from fmbseg.pseudolabel.dense import image_to_tensor, plan_windows


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
    scores: torch.Tensor  # (K', H, W) cosine scores of the queried names, on CPU


class OpenVocabularySegmenter:
    def __init__(
        self,
        encoder: PatchEncoder,
        module: AlignmentModule,
        text: VocabularyEncoder,
        config: InferenceConfig,
        device: torch.device,
        batch_size: int = 4,
    ) -> None:
        if module.spec.in_dim != encoder.embed_dim:
            raise WeightsError(
                f"alignment module takes {module.spec.in_dim}-d features, the encoder gives "
                f"{encoder.embed_dim}-d"
            )
        if module.spec.text_dim != text.model.embed_dim:
            raise WeightsError(
                f"alignment module maps to {module.spec.text_dim}-d text space, the CLIP model "
                f"has {text.model.embed_dim}-d text embeddings"
            )
        self.encoder = encoder
        self.module = module.eval().to(device)
        self.text = text
        self.config = config
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, image: np.ndarray, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(K, H, W) cosine scores of an (H, W, 3) uint8 image against (K, D) embeddings."""
        height, width = image.shape[:2]
        patch = self.encoder.patch_size
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
        text = text_embeddings.to(self.device, torch.float32)
        if not window:
            return self._upsample(self._window_scores(resized, text)[0], (height, width))
        total = torch.zeros(text.shape[0], *grid.resized_size, device=self.device)
        counts = torch.zeros(1, *grid.resized_size, device=self.device)
        for start in range(0, len(grid.offsets), self.batch_size):
            chunk = grid.offsets[start : start + self.batch_size]
            crops = torch.cat(
                [resized[:, :, top : top + window, left : left + window] for top, left in chunk]
            )
            scores = F.interpolate(
                self._window_scores(crops, text), size=(window, window), mode="bilinear"
            )
            for (top, left), window_scores in zip(chunk, scores, strict=True):
                total[:, top : top + window, left : left + window] += window_scores
                counts[:, top : top + window, left : left + window] += 1
        return self._upsample(total / counts, (height, width))

    def _window_scores(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) images -> (B, K, h/p, w/p) cosine scores."""
        embeddings = self.module(self.encoder.encode(images).float())
        return torch.einsum("bhwd,kd->bkhw", embeddings, text)

    @staticmethod
    def _upsample(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(scores[None], size=size, mode="bilinear")[0].cpu()

    def segment(
        self, image: np.ndarray, class_names: Sequence[str], background: Background | None = None
    ) -> Segmentation:
        """Per-pixel class indices into ``class_names`` (and the scores behind them)."""
        names = validate_vocabulary(class_names)
        if background is None:
            scores = self.score(image, self.text.embed(names))
            return Segmentation(scores.argmax(0).numpy(), scores)
        foreground = [i for i in range(len(names)) if i != background.index]
        queried = [names[i] for i in foreground] + [
            name for name in background.stuff_names if name not in names
        ]
        scores = self.score(image, self.text.embed(queried))
        best, winner = scores.max(0)
        to_output = torch.tensor(foreground + [background.index] * (len(queried) - len(foreground)))
        labels = to_output[winner]
        if background.threshold is not None:
            labels[best < background.threshold] = background.index
        return Segmentation(labels.numpy(), scores)


def load_segmenter(params: Params, module_path: str | Path) -> OpenVocabularySegmenter:
    """Build the encoder and CLIP text encoder the params name, and a trained module file."""
    from fmbseg.models.registry import build_patch_encoder, build_vision_language_model
    from fmbseg.models.runtime import Runtime

    device = Runtime.from_config(params.models).torch_device()
    module, info = load_module(module_path, device=device)
    encoder = build_patch_encoder(params.models)
    if info.encoder != encoder.provenance.model:
        raise WeightsError(
            f"{module_path}: trained on features of {info.encoder!r}, but models.encoder builds "
            f"{encoder.provenance.model!r}"
        )
    text = VocabularyEncoder(build_vision_language_model(params.models), params.inference.templates)
    return OpenVocabularySegmenter(
        encoder, module, text, params.inference, device, params.models.encoder.batch_size
    )
