"""PixelCLIP (Shin et al., NeurIPS 2024) as a Stage 2 method: CLIP's image tower fine-tuned on
class-agnostic masks (SAM's or DINO k-means') clustered online onto learnable class prompts.

Training reads raw images and the masks stage's tables (:mod:`fmbseg.pixelclip.train`). At
inference it is plain CLIP with the fine-tuned image tower: dense patch embeddings (its dense
variant), upsampled to ``train.pixelclip.score_size``, L2-normalised, cosine with the class
names' text embeddings; no alignment module, so the cost is one CLIP image forward per window.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmbseg.errors import InputError, WeightsError
from fmbseg.methods import EpochCallback, TrainInputs

if TYPE_CHECKING:
    import torch

    from fmbseg.config import Params
    from fmbseg.models.base import WeightProvenance
    from fmbseg.models.clip import OpenClipModel
    from fmbseg.models.vocabulary import VocabularyEncoder

PAPER = "PixelCLIP: Towards Open-Vocabulary Semantic Segmentation with Unlabeled Masks"


class PixelClipScorer:
    """Windows -> fine-tuned CLIP dense embeddings -> cosine with each class's text embedding."""

    def __init__(self, clip: OpenClipModel, text: VocabularyEncoder, score_size: int) -> None:
        self.clip = clip
        self.text = text
        self.score_size = score_size

    @property
    def patch_size(self) -> int:
        return self.clip.patch_size

    @property
    def provenance(self) -> Mapping[str, WeightProvenance]:
        return {"clip": self.clip.provenance, "text": self.clip.provenance}

    def prepare(self, class_names: tuple[str, ...]) -> torch.Tensor:
        """(K, D) unit text embeddings (templates averaged)."""
        return self.text.embed(class_names)

    def score_windows(self, windows: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, K, s, s) cosine scores, s = score_size (or the patch grid)."""
        import torch
        import torch.nn.functional as F

        features = self.clip.dense_patches(windows).permute(0, 3, 1, 2)
        if self.score_size:
            size = (self.score_size, self.score_size)
            features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        features = F.normalize(features, dim=1)
        return torch.einsum("bdhw,kd->bkhw", features, vocabulary.to(features))


class PixelClipMethod:
    name = "pixelclip"
    paper = PAPER
    inputs = ("images", "masks")  # what train reads; the masks stage runs only for such methods

    def train(
        self,
        params: Params,
        inputs: TrainInputs,
        out_dir: Path,
        *,
        on_epoch: EpochCallback | None = None,
        restart_if_changed: bool = False,
        show_progress: bool = True,
    ) -> dict[str, Any]:
        from fmbseg.pixelclip.train import run_train

        if inputs.images is None or inputs.masks is None:
            raise InputError(
                "method pixelclip trains on images and their masks: give --images and --masks"
            )
        return run_train(
            params,
            inputs.images,
            inputs.masks,
            out_dir,
            on_checkpoint=on_epoch,
            restart_if_changed=restart_if_changed,
            show_progress=show_progress,
        )

    def load(self, params: Params, model_dir: Path, device: torch.device) -> PixelClipScorer:
        from safetensors.torch import load_file

        from fmbseg.models.vocabulary import VocabularyEncoder
        from fmbseg.pixelclip.train import INFO_FILE, MODULE_FILE, build_clip, clip_models

        info = json.loads((model_dir / INFO_FILE).read_text(encoding="utf-8"))
        config = params.train.pixelclip.model_copy(
            update={"dense_attention": info["dense_attention"]}
        )
        clip = build_clip(clip_models(params.models, config))
        for key, built in (
            ("clip_model", clip.provenance.model),
            ("clip_weights", clip.provenance.tag),
        ):
            if info[key] != built:
                raise WeightsError(
                    f"{model_dir / MODULE_FILE}: fine-tuned from CLIP {key.removeprefix('clip_')} "
                    f"{info[key]!r}, but models.clip builds {built!r}"
                )
        visual = clip.network.visual
        tensors = load_file(model_dir / MODULE_FILE, device=str(device))
        unknown = sorted(set(tensors) - set(visual.state_dict()))
        if unknown:
            raise WeightsError(
                f"{model_dir / MODULE_FILE}: {unknown[0]!r} is no tensor of the image tower"
            )
        try:
            visual.load_state_dict(tensors, strict=False)
        except RuntimeError as exc:
            raise WeightsError(
                f"{model_dir / MODULE_FILE}: does not fit the image tower ({exc})"
            ) from None
        text = VocabularyEncoder(clip, params.inference.templates)
        return PixelClipScorer(clip, text, params.train.pixelclip.score_size)


METHOD = PixelClipMethod()
