"""FMbSeg's Stage 2 (the paper): a frozen patch encoder, one transformer block + projection
into the text space, cosine with the class prompts' text embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fmbseg.errors import InputError, WeightsError
from fmbseg.methods import EpochCallback, TrainInputs

if TYPE_CHECKING:
    from fmbseg.align.module import AlignmentModule
    from fmbseg.config import Params
    from fmbseg.models.base import PatchEncoder, WeightProvenance
    from fmbseg.models.vocabulary import VocabularyEncoder


class AlignmentScorer:
    """Windows -> frozen encoder -> alignment module -> cosine with each class's embedding."""

    def __init__(
        self, encoder: PatchEncoder, module: AlignmentModule, text: VocabularyEncoder
    ) -> None:
        if module.spec.in_dim != encoder.embed_dim:
            raise WeightsError(
                f"alignment module takes {module.spec.in_dim}-d features, the encoder gives "
                f"{encoder.embed_dim}-d"
            )
        if module.spec.text_dim != text.model.embed_dim:
            raise WeightsError(
                f"alignment module maps to {module.spec.text_dim}-d text space, the text model "
                f"has {text.model.embed_dim}-d embeddings"
            )
        self.encoder = encoder
        self.module = module.eval()
        self.text = text

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def provenance(self) -> Mapping[str, WeightProvenance]:
        return {"encoder": self.encoder.provenance, "text": self.text.model.provenance}

    def prepare(self, class_names: tuple[str, ...]) -> torch.Tensor:
        """(K, D) unit text embeddings (templates averaged)."""
        return self.text.embed(class_names)

    def image_embedder(self) -> nn.Module:
        """(B, 3, h, w) windows -> (B, h/p, w/p, D) unit embeddings: the image side alone,
        as ONNX export needs it."""
        return self.image_side(self.encoder, self.module)

    @staticmethod
    def image_side(encoder: PatchEncoder, module: AlignmentModule) -> nn.Module:
        return _ImageEmbedder(encoder, module)

    def score_windows(self, windows: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, K, h/p, w/p) cosine scores."""
        weight = self.module.projection.weight
        embeddings = self.module(self.encoder.encode(windows.to(weight.device)).float())
        return torch.einsum("bhwd,kd->bkhw", embeddings, vocabulary.to(weight.device, weight.dtype))


class _ImageEmbedder(nn.Module):
    def __init__(self, encoder: PatchEncoder, module: AlignmentModule) -> None:
        super().__init__()
        self.encoder = encoder
        self.module = module

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.module(self.encoder.encode(windows).float())


class FmbsegMethod:
    name = "fmbseg"
    paper = "Annotation-Free Semantic Segmentation with Vision Foundation Models (FMbSeg)"

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
        from fmbseg.align.train import run_train

        if inputs.features is None:
            raise InputError("method fmbseg trains on a feature cache: give --features")
        return run_train(
            params,
            inputs.features,
            out_dir,
            on_epoch=on_epoch,
            restart_if_changed=restart_if_changed,
            show_progress=show_progress,
        )

    def load(self, params: Params, model_dir: Path, device: torch.device) -> AlignmentScorer:
        from fmbseg.align.module import load_module
        from fmbseg.align.train import MODULE_FILE
        from fmbseg.models.registry import build_patch_encoder, build_text_encoder
        from fmbseg.models.vocabulary import VocabularyEncoder

        module, info = load_module(model_dir / MODULE_FILE, device=device)
        encoder = build_patch_encoder(params.models)
        if info.encoder != encoder.provenance.model:
            raise WeightsError(
                f"{model_dir / MODULE_FILE}: trained on features of {info.encoder!r}, but "
                f"models.encoder builds {encoder.provenance.model!r}"
            )
        text = VocabularyEncoder(build_text_encoder(params.models), params.inference.templates)
        return AlignmentScorer(encoder, module, text)


METHOD = FmbsegMethod()
