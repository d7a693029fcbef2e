"""The model roles the stages depend on, as small typed interfaces.

Stages import only these protocols; concrete backends (open_clip, segment-anything, timm)
and the oracle fakes implement them, so other models (SigLIP, MobileSAM, SAM 2) plug in
through the registry without touching a stage.

Conventions shared by every backend:
- images enter as float32 RGB tensors in [0, 1], shaped (B, 3, H, W); each backend applies its
  own normalisation;
- embeddings leave L2-normalised, float32, on the backend's device;
- pixel coordinates are (x, y) in the original image, x along the width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fmbseg.config import AutoMaskConfig


# "synthetic": a fake with known answers (the oracle world), not a learned model at all.
WeightSource = Literal["file", "weights_dir", "download", "random-init", "synthetic"]


@dataclass(frozen=True)
class WeightProvenance:
    """Where a model's weights came from; recorded by every stage that uses the model."""

    role: str
    model: str
    source: WeightSource
    path: str | None = None
    sha256: str | None = None

    @property
    def is_random(self) -> bool:
        return self.source == "random-init"

    @property
    def tag(self) -> str:
        """``sha256:<hex>`` for weights from a file, else the source (``random-init``, ...)."""
        return self.source if self.sha256 is None else f"sha256:{self.sha256}"


@dataclass(frozen=True)
class DenseEmbeddings:
    """One image-level embedding and a grid of patch embeddings per image, joint space."""

    image: torch.Tensor  # (B, D)
    patches: torch.Tensor  # (B, h, w, D)


@runtime_checkable
class TextEncoder(Protocol):
    """The text role: the space Stage 2 maps into. Any text tower (CLIP's, a language model)."""

    provenance: WeightProvenance

    @property
    def embed_dim(self) -> int: ...

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) normalised embeddings of already templated prompts."""


@runtime_checkable
class VisionLanguageModel(Protocol):
    """CLIP's role: text embeddings, and image plus dense patch embeddings in the same space."""

    provenance: WeightProvenance

    @property
    def image_size(self) -> int:
        """Side of the square input the model was trained on (one sliding-window crop)."""

    @property
    def patch_size(self) -> int: ...

    @property
    def embed_dim(self) -> int: ...

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) normalised embeddings of already templated prompts."""

    def encode_images(self, images: torch.Tensor) -> DenseEmbeddings:
        """Images (B, 3, H, W) with H, W multiples of ``patch_size`` -> dense embeddings."""


@dataclass(frozen=True)
class PointMask:
    mask: np.ndarray  # (H, W) bool, original image size
    score: float  # the model's predicted quality of this mask


@dataclass(frozen=True)
class ProposedMask:
    mask: np.ndarray  # (H, W) bool, original image size
    predicted_iou: float
    stability_score: float


@runtime_checkable
class PromptableSegmenter(Protocol):
    """SAM's role: embed an image once, then answer point prompts and propose all masks."""

    provenance: WeightProvenance

    def embed_image(self, image: np.ndarray) -> Any:
        """(H, W, 3) uint8 RGB -> an opaque per-image embedding reused by both calls below."""

    def predict_from_points(
        self, embedding: Any, points_xy: np.ndarray, point_labels: np.ndarray
    ) -> PointMask:
        """Points (N, 2) in original pixels, labels (N,) 1 = foreground -> best of the masks."""

    def generate_masks(self, embedding: Any, config: AutoMaskConfig) -> list[ProposedMask]:
        """All masks of the image on a point grid, filtered and de-duplicated per ``config``."""


@dataclass(frozen=True)
class TextDetection:
    prompt: int  # index of the text prompt it answers
    mask: np.ndarray  # (H, W) bool, original image size
    score: float  # the model's own score of this instance (SAM 3: query score x presence)
    presence: float  # the model's score that the prompt's concept is in the image at all


@runtime_checkable
class TextPromptedSegmenter(Protocol):
    """SAM 3's role: embed an image once, then segment every instance of each text prompt."""

    provenance: WeightProvenance

    def embed_image(self, image: np.ndarray) -> Any:
        """(H, W, 3) uint8 RGB -> an opaque per-image embedding reused for every prompt."""

    def segment_prompts(
        self, embedding: Any, prompts: list[str], score_threshold: float, mask_threshold: float
    ) -> list[TextDetection]:
        """Instances of each prompt scoring above ``score_threshold``; prompts are batched."""


@runtime_checkable
class PatchEncoder(Protocol):
    """The frozen self-supervised encoder: a patch feature grid, no class/register tokens."""

    provenance: WeightProvenance

    @property
    def patch_size(self) -> int: ...

    @property
    def embed_dim(self) -> int: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), H and W multiples of ``patch_size`` -> (B, h, w, C)."""
