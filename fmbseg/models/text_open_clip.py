"""The ``open_clip`` backend of the ``text`` role: the text tower of any open_clip model.

Stage 2 needs only a text space, so unlike the ``clip`` role (Stage 1's dense path, CLIP-style
ViTs only) any open_clip family works here: SigLIP 2 (``ViT-B-16-SigLIP2:webli``), MetaCLIP 2
(``ViT-H-14-worldwide-quickgelu:metaclip2_worldwide``), PE-Core (``PE-Core-L-14-336:meta``),
DFN (``ViT-H-14-378-quickgelu:dfn5b``), OpenAI and LAION CLIPs.

``models.text``: ``model`` is the open_clip architecture, ``pretrained`` its tag. Weights are
resolved like the ``clip`` role's (fmbseg.models.weights), in the ``text`` sub-folder of a
weights directory: ``models.text.checkpoint`` -> ``<dir>/text/<model>-<tag>.safetensors`` ->
open_clip's standard download -> random-init only when ``models.text.allow_random_init``.
The checkpoint is the whole model's (that is what open_clip publishes); the image tower is
dropped once it is loaded. Families with a Hugging Face tokenizer (SigLIP, MetaCLIP 2) fetch it
into the hub cache the first time, like open_clip itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fmbseg.errors import ConfigError, WeightsError
from fmbseg.models.base import WeightProvenance
from fmbseg.models.weights import resolve_weights

if TYPE_CHECKING:
    import torch

    from fmbseg.config import ModelsConfig


class OpenClipTextEncoder:
    """Prompts -> the model's own tokenizer -> ``encode_text`` -> L2 norm, in batches."""

    def __init__(
        self,
        network: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        embed_dim: int,
        provenance: WeightProvenance,
        device: torch.device,
        batch_size: int,
    ) -> None:
        self.network = network.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.provenance = provenance
        self.device = device
        self.batch_size = batch_size
        self._embed_dim = embed_dim

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) unit float32 embeddings of already templated prompts."""
        import torch
        import torch.nn.functional as F

        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of prompts, not a single string")
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start : start + self.batch_size]))
                features = self.network.encode_text(tokens.to(self.device))
                chunks.append(F.normalize(features.float(), dim=-1))
        if not chunks:
            return torch.empty(0, self.embed_dim, device=self.device)
        return torch.cat(chunks)


def _tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    import open_clip

    try:
        return open_clip.get_tokenizer(name)
    except Exception as exc:  # a hub tokenizer offline: OSError, ValueError, hub errors
        reason = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        raise WeightsError(
            f"models.text.model: the tokenizer of {name} could not be loaded ({reason}); "
            "families with a Hugging Face tokenizer need it in the hub cache once"
        ) from None


def build(models: ModelsConfig) -> OpenClipTextEncoder:
    """``models.text.backend: open_clip``."""
    import open_clip

    from fmbseg.models import clip
    from fmbseg.models.runtime import Runtime

    config = models.text
    if not config.model:
        raise ConfigError(
            "models.text.model: the open_clip backend needs an open_clip architecture, "
            "e.g. ViT-B-16-SigLIP2 (with models.text.pretrained: webli)"
        )
    if config.batch_size < 1:
        raise ConfigError(f"models.text.batch_size: must be at least 1 (got {config.batch_size})")
    name = config.model.replace("/", "-")
    model_cfg = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    if model_cfg is None:
        raise ConfigError(
            f"models.text.model: {name!r} is not an open_clip architecture "
            "(see open_clip.list_models())"
        )
    pretrained_cfg = clip._pretrained_cfg(name, config.pretrained, role="text")
    request = clip._weights_request(name, config.pretrained, pretrained_cfg, role="text")
    resolved = resolve_weights(
        request,
        checkpoint=config.checkpoint,
        weights_dir=models.weights_dir,
        allow_random_init=config.allow_random_init,
    )
    tokenizer = _tokenizer(name)
    network = clip._create_network(name, pretrained_cfg)
    if resolved.path is not None:
        clip._load_weights(network, resolved.path, name)
    del network.visual  # only the text tower is used; frees the image tower's memory
    return OpenClipTextEncoder(
        network,
        tokenizer,
        int(model_cfg["embed_dim"]),
        resolved.provenance,
        Runtime.from_config(models).torch_device(),
        config.batch_size,
    )
