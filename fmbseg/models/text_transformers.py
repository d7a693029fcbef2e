"""The ``transformers`` backend of the ``text`` role: a language-only model (BERT, a
sentence-transformers model such as all-MiniLM-L6-v2) with mean pooling over its tokens.

Fusioner's claim is that any frozen text model works, not only CLIP's text tower. Such a model
shares no space with images, so it suits methods that learn the bridge (Fusioner), not FMbSeg's
alignment into a fixed text space (it trains, but its text space was never tied to pixels).

``models.text``: ``model`` is a Hugging Face model id (``sentence-transformers/all-MiniLM-L6-v2``)
or a local model folder. Weights are resolved like every role's (fmbseg.models.weights):
``models.text.checkpoint`` (a model folder, or its ``model.safetensors``) -> a weights directory
(``<dir>/text/<name>/model.safetensors``, name = the id's last part) -> the hub's download ->
no random initialisation (a tokenizer cannot be made up). Only safetensors are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fmbseg.errors import ConfigError, WeightsError
from fmbseg.models.base import WeightProvenance
from fmbseg.models.weights import WeightsRequest, resolve_weights

if TYPE_CHECKING:
    import torch

    from fmbseg.config import ModelsConfig

WEIGHTS_FILE = "model.safetensors"


class TransformersTextEncoder:
    """Texts -> tokenizer -> transformer -> mean of the non-padding token states -> L2 norm
    (the sentence-transformers recipe: Transformer, Pooling(mean), Normalize)."""

    def __init__(
        self,
        folder: Path,
        provenance: WeightProvenance,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_length: int = 128,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            raise WeightsError(
                f"{folder}: not a transformers model folder ({str(exc).splitlines()[0]})"
            ) from None
        self.model.eval().to(device)
        self.device = device
        self.provenance = provenance
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) unit embeddings of already templated prompts."""
        import torch
        import torch.nn.functional as F

        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                states = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(F.normalize(pooled.float(), dim=-1))
        return torch.cat(chunks)


def _download(model: str) -> Path:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.model", WEIGHTS_FILE])
    return Path(folder) / WEIGHTS_FILE


def build(models: ModelsConfig) -> TransformersTextEncoder:
    """``models.text.backend: transformers``."""
    from fmbseg.models.runtime import Runtime

    config = models.text
    if not config.model:
        raise ConfigError(
            "models.text.model: the transformers backend needs a model id or folder, e.g. "
            "sentence-transformers/all-MiniLM-L6-v2"
        )
    checkpoint = config.checkpoint
    local = Path(config.model)
    if checkpoint is None and local.is_dir():
        checkpoint = str(local)
    if checkpoint is not None and Path(checkpoint).is_dir():
        checkpoint = str(Path(checkpoint) / WEIGHTS_FILE)
    name = config.model.rstrip("/").rsplit("/", 1)[-1]
    resolved = resolve_weights(
        WeightsRequest(
            role="text",
            model=config.model,
            filenames=(f"{name}/{WEIGHTS_FILE}",),
            source_url=None if local.is_dir() else f"https://huggingface.co/{config.model}",
            download=None if local.is_dir() else lambda: _download(config.model),
        ),
        checkpoint=checkpoint,
        weights_dir=models.weights_dir,
        allow_random_init=False,
    )
    assert resolved.path is not None  # random initialisation is never allowed here
    return TransformersTextEncoder(
        resolved.path.parent,
        resolved.provenance,
        device=Runtime.from_config(models).torch_device(),
        batch_size=config.batch_size,
    )
