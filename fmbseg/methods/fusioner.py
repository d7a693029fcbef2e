"""Fusioner (Ma et al., BMVC 2022) as a Stage 2 method: frozen patch tokens and frozen class-name
text tokens fused by one transformer, decoded to per-pixel logits, one sigmoid per class.

Trained on Stage 1's pseudo-labels (annotation-free), see :mod:`fmbseg.fusioner.train`. At
inference the text tokens run through the fusion transformer with every window, so its cost
grows with the number of classes (FMbSeg's does only by one dot product per class).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fmbseg.errors import InputError, WeightsError
from fmbseg.methods import EpochCallback, TrainInputs

if TYPE_CHECKING:
    import torch

    from fmbseg.config import Params
    from fmbseg.fusioner.module import Fusioner
    from fmbseg.models.base import PatchEncoder, WeightProvenance
    from fmbseg.models.vocabulary import VocabularyEncoder

PAPER = "Open-vocabulary Semantic Segmentation with Frozen Vision-Language Models (Fusioner)"


class FusionerScorer:
    """Windows -> frozen encoder -> Fusioner with the classes as text tokens -> logits.

    Scores are logits (cosine / temperature): a pixel belongs to a class when its sigmoid
    exceeds 0.5, i.e. its logit exceeds :attr:`background_threshold` (0), which is the rule
    evaluation applies to a vocabulary's background class.
    """

    background_threshold = 0.0

    def __init__(
        self,
        encoder: PatchEncoder,
        model: Fusioner,
        text: VocabularyEncoder,
        class_queries: Literal["joint", "per_class"] = "joint",
    ) -> None:
        if model.spec.visual_dim != encoder.embed_dim:
            raise WeightsError(
                f"Fusioner takes {model.spec.visual_dim}-d visual tokens, the encoder gives "
                f"{encoder.embed_dim}-d"
            )
        if model.spec.text_dim != text.model.embed_dim:
            raise WeightsError(
                f"Fusioner takes {model.spec.text_dim}-d text tokens, the text model gives "
                f"{text.model.embed_dim}-d"
            )
        self.encoder = encoder
        self.model = model.eval()
        self.text = text
        self.class_queries = class_queries

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def provenance(self) -> Mapping[str, WeightProvenance]:
        return {"encoder": self.encoder.provenance, "text": self.text.model.provenance}

    def prepare(self, class_names: tuple[str, ...]) -> torch.Tensor:
        """(K, Ct) unit text embeddings (templates averaged): the text tokens."""
        return self.text.embed(class_names)

    def score_windows(self, windows: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, K, 2^u h/p, 2^u w/p) logits; one forward per window with all K
        classes as text tokens, or (``per_class``) one forward per window and class."""
        import torch

        device = self.model.decoder.out.weight.device
        visual = self.encoder.encode(windows.to(device)).float()
        text = vocabulary.to(device, torch.float32)
        if self.class_queries == "joint":
            return self.model(visual, text)
        return torch.cat([self.model(visual, text[k : k + 1]) for k in range(len(text))], dim=1)


class FusionerMethod:
    name = "fusioner"
    paper = PAPER

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
        from fmbseg.fusioner.train import run_train

        if inputs.features is None:
            raise InputError("method fusioner trains on a feature cache: give --features")
        return run_train(
            params,
            inputs.features,
            out_dir,
            on_epoch=on_epoch,
            restart_if_changed=restart_if_changed,
            show_progress=show_progress,
        )

    def load(self, params: Params, model_dir: Path, device: torch.device) -> FusionerScorer:
        from fmbseg.fusioner.module import load_fusioner
        from fmbseg.fusioner.train import MODULE_FILE
        from fmbseg.models.registry import build_patch_encoder, build_text_encoder
        from fmbseg.models.vocabulary import VocabularyEncoder

        model, info = load_fusioner(model_dir / MODULE_FILE, device=device)
        encoder = build_patch_encoder(params.models)
        if info.get("encoder") != encoder.provenance.model:
            raise WeightsError(
                f"{model_dir / MODULE_FILE}: trained on features of {info.get('encoder')!r}, "
                f"but models.encoder builds {encoder.provenance.model!r}"
            )
        text = VocabularyEncoder(build_text_encoder(params.models), params.inference.templates)
        return FusionerScorer(encoder, model, text, params.inference.class_queries)


METHOD = FusionerMethod()
