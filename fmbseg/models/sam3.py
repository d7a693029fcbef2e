"""SAM 3 through Hugging Face ``transformers`` (``Sam3Model``, ``Sam3Processor``) as the
:class:`TextPromptedSegmenter` role: ``models.sam3.backend: transformers``.

Why ``transformers`` and not Meta's ``sam3`` package: transformers (already a dependency of the
dev install and of the ``transformers`` text backend) runs SAM 3 on CPU with our torch pins and
adds no package; the ``sam3`` wheel pulls pycocotools, einops and ftfy and targets CUDA.

Per image the vision embedding (ViT + FPN) is computed once; the class prompts then go through
the text encoder, DETR encoder/decoder and mask decoder in batches of ``models.sam3.prompt_batch``
(the embedding expanded, not recomputed). Each detection's score is SAM 3's own: the query's
score times the prompt's presence score, as ``post_process_instance_segmentation`` computes it.

Weights: ``facebook/sam3`` is gated on the Hugging Face hub (SAM licence): request access on
its page and log in (``hf auth login`` or ``HF_TOKEN``). Resolution as every role's:
``models.sam3.checkpoint`` (a model folder or its ``model.safetensors``) -> a weights directory
(``<dir>/sam3/<name>/model.safetensors`` beside its config and processor files) -> the hub's
download -> random-init only when allowed, with ``models.sam3.overrides`` as ``Sam3Config``
arguments (the tests' tiny architecture) and SAM 3's tokenizer vocabulary (CLIP's BPE, from
open_clip).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.errors import ConfigError, WeightsError
from fmbseg.models.base import TextDetection, WeightProvenance
from fmbseg.models.runtime import Runtime
from fmbseg.models.weights import WeightsRequest, resolve_weights

if TYPE_CHECKING:
    from fmbseg.config import ModelsConfig

WEIGHTS_FILE = "model.safetensors"
HUB_URL = "https://huggingface.co"
TEXT_LENGTH = 32  # Sam3Processor pads every prompt to 32 tokens


_TINY_WIDTH = 32
# SAM 3's architecture at widths of 32 and one or two layers per part, 112 px input: the
# tests' and the tiny benchmark's random-init model (``models.sam3.overrides``).
TINY_SAM3: dict[str, Any] = {
    "vision_config": {
        "backbone_config": {
            "model_type": "sam3_vit_model",
            "hidden_size": _TINY_WIDTH,
            "intermediate_size": 2 * _TINY_WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 112,
            "patch_size": 14,
            "window_size": 4,
            "global_attn_indexes": [1],
            "pretrain_image_size": 56,
        },
        "fpn_hidden_size": _TINY_WIDTH,
        "backbone_feature_sizes": [[32, 32], [16, 16], [8, 8]],
    },
    "text_config": {"hidden_size": _TINY_WIDTH, "intermediate_size": 2 * _TINY_WIDTH, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "projection_dim": _TINY_WIDTH},
    "geometry_encoder_config": {"hidden_size": _TINY_WIDTH, "num_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 2 * _TINY_WIDTH},
    "detr_encoder_config": {"hidden_size": _TINY_WIDTH, "num_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 2 * _TINY_WIDTH},
    "detr_decoder_config": {"hidden_size": _TINY_WIDTH, "num_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 2 * _TINY_WIDTH, "num_queries": 8},
    "mask_decoder_config": {"hidden_size": _TINY_WIDTH, "num_attention_heads": 2},
}  # fmt: skip


@dataclass(frozen=True)
class Sam3Embedding:
    vision: Any  # transformers' Sam3VisionEncoderOutput for one image
    original_size: tuple[int, int]  # (H, W)


class TransformersSam3:
    """A frozen SAM 3: one vision embedding per image, class prompts batched against it."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        provenance: WeightProvenance,
        runtime: Runtime,
        prompt_batch: int,
    ) -> None:
        self.device = runtime.torch_device()
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.processor = processor
        self.provenance = provenance
        self.runtime = runtime
        self.prompt_batch = prompt_batch

    def embed_image(self, image: np.ndarray) -> Sam3Embedding:
        import torch

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"SAM 3 expects an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}"
            )
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad(), self.runtime.autocast():
            vision = self.model.get_vision_features(pixel_values=pixels.to(self.device))
        return Sam3Embedding(vision, (image.shape[0], image.shape[1]))

    def segment_prompts(
        self,
        embedding: Sam3Embedding,
        prompts: list[str],
        score_threshold: float,
        mask_threshold: float,
    ) -> list[TextDetection]:
        """Instances of every prompt above ``score_threshold``, masks at the image's size."""
        detections: list[TextDetection] = []
        for start in range(0, len(prompts), self.prompt_batch):
            chunk = prompts[start : start + self.prompt_batch]
            for offset, result in enumerate(
                self._segment_batch(embedding, chunk, score_threshold, mask_threshold)
            ):
                presence = result["presence"]
                for score, mask in zip(result["scores"], result["masks"], strict=True):
                    if mask.any():
                        detections.append(TextDetection(start + offset, mask, score, presence))
        return detections

    def _segment_batch(
        self,
        embedding: Sam3Embedding,
        prompts: list[str],
        score_threshold: float,
        mask_threshold: float,
    ) -> list[dict[str, Any]]:
        import torch

        count = len(prompts)
        text = self.processor(text=prompts, return_tensors="pt").to(self.device)
        vision = embedding.vision
        expanded = type(vision)(
            last_hidden_state=vision.last_hidden_state,
            fpn_hidden_states=tuple(f.expand(count, -1, -1, -1) for f in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(
                p.expand(count, -1, -1, -1) for p in vision.fpn_position_encoding
            ),
        )
        with torch.no_grad(), self.runtime.autocast():
            outputs = self.model(
                vision_embeds=expanded,
                input_ids=text["input_ids"],
                attention_mask=text["attention_mask"],
            )
        results = self.processor.post_process_instance_segmentation(
            outputs,
            threshold=score_threshold,
            mask_threshold=mask_threshold,
            target_sizes=[embedding.original_size] * count,
        )
        presence = outputs.presence_logits.float().sigmoid().reshape(count).tolist()
        return [
            {
                "scores": result["scores"].float().cpu().tolist(),
                "masks": result["masks"].bool().cpu().numpy(),
                "presence": presence[index],
            }
            for index, result in enumerate(results)
        ]


def clip_bpe_tokenizer(folder: Path) -> Any:
    """SAM 3's tokenizer vocabulary (CLIP's BPE, 49408 tokens) as a transformers
    ``CLIPTokenizer``, from the vocabulary file open_clip ships."""
    import json

    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.__getitem__)
    # open_clip spells the two special tokens its own way; CLIPTokenizer expects OpenAI's.
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in bpe.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", encoding="utf-8"
    )
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def random_init(overrides: dict[str, Any]) -> tuple[Any, Any]:
    """A random-init ``Sam3Model`` of ``Sam3Config(**overrides)`` and a processor for it."""
    import tempfile

    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    try:
        config = Sam3Config(**overrides)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"models.sam3.overrides: not a Sam3Config ({exc})") from None
    side = int(config.vision_config.backbone_config.image_size)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = clip_bpe_tokenizer(Path(folder))
    images = Sam3ImageProcessor(size={"height": side, "width": side})
    return Sam3Model(config), Sam3Processor(image_processor=images, tokenizer=tokenizer)


def _load(folder: Path) -> tuple[Any, Any]:
    from transformers import Sam3Model, Sam3Processor

    try:
        processor = Sam3Processor.from_pretrained(str(folder), local_files_only=True)
        model = Sam3Model.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{folder}: not a transformers SAM 3 folder ({str(exc).splitlines()[0]})"
        ) from None
    return model, processor


def _download(model: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", WEIGHTS_FILE]
    return Path(snapshot_download(model, allow_patterns=patterns)) / WEIGHTS_FILE


def build(models: ModelsConfig) -> TransformersSam3:
    """``models.sam3.backend: transformers``."""
    try:
        from transformers import Sam3Model  # noqa: F401
    except ImportError:
        raise ConfigError(
            "models.sam3.backend: transformers has no Sam3Model (transformers>=5 needed): "
            'pip install "fmbseg[sam3]"'
        ) from None
    config = models.sam3
    local = Path(config.model)
    checkpoint = config.checkpoint
    if checkpoint is None and local.is_dir():
        checkpoint = str(local)
    if checkpoint is not None and Path(checkpoint).is_dir():
        checkpoint = str(Path(checkpoint) / WEIGHTS_FILE)
    name = config.model.rstrip("/").rsplit("/", 1)[-1]
    on_hub = not local.is_dir()
    gated = on_hub and config.model.startswith("facebook/sam3")
    resolved = resolve_weights(
        WeightsRequest(
            role="sam3",
            model=config.model,
            filenames=(f"{name}/{WEIGHTS_FILE}",),
            source_url=f"{HUB_URL}/{config.model}" if on_hub else None,
            download=(lambda: _download(config.model)) if on_hub else None,
            access=(
                f"{config.model} is gated: request access at {HUB_URL}/{config.model}, then "
                "log in (hf auth login, or set HF_TOKEN)"
            )
            if gated
            else None,
        ),
        checkpoint=checkpoint,
        weights_dir=models.weights_dir,
        allow_random_init=config.allow_random_init,
    )
    if resolved.path is None:
        model, processor = random_init(dict(config.overrides))
    else:
        model, processor = _load(resolved.path.parent)
    return TransformersSam3(
        model, processor, resolved.provenance, Runtime.from_config(models), config.prompt_batch
    )
