"""Segment Anything (``segment-anything``) as the :class:`PromptableSegmenter` role.

The image encoder is by far the expensive part of SAM (seconds per image on a CPU), so the
image is embedded once and both routes of Stage 1 reuse that embedding: point prompts (1.1)
and the automatic mask generator (1.2), which here runs on the given embedding instead of
re-embedding the image the way ``SamAutomaticMaskGenerator`` does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.errors import ConfigError
from fmbseg.models.amg import keep_candidates, proposals_after_nms
from fmbseg.models.base import PointMask, ProposedMask, WeightProvenance
from fmbseg.models.runtime import Runtime
from fmbseg.models.weights import (
    WeightsRequest,
    load_state_dict_strictly,
    read_state_dict,
    resolve_weights,
    weights_dirs,
)

if TYPE_CHECKING:
    import torch
    from segment_anything.modeling import Sam

    from fmbseg.config import AutoMaskConfig, ModelsConfig

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/segment_anything"

# SAM's prompt encoder and mask decoder are the same for every image-encoder size.
PROMPT_EMBED_DIM = 256
VIT_PATCH_SIZE = 16


@dataclass(frozen=True)
class SamVariant:
    """One image-encoder size of SAM and where its official checkpoint lives.

    ``sha256`` is the digest (or a prefix of it) that a download must match. The six hex
    digits in the official file names are MD5 prefixes, not sha256 ones, so the built-in
    variants carry the files' full sha256 digests instead.
    """

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    checkpoint_file: str
    url: str
    sha256: str | None
    image_size: int = 1024  # side of the padded square the image encoder sees


def official_variant(
    name: str,
    width: int,
    depth: int,
    heads: int,
    global_attn: tuple[int, ...],
    file: str,
    sha256: str,
) -> SamVariant:
    """A variant whose checkpoint is published beside Meta's SAM releases."""
    return SamVariant(
        name=name,
        encoder_embed_dim=width,
        encoder_depth=depth,
        encoder_num_heads=heads,
        encoder_global_attn_indexes=global_attn,
        checkpoint_file=file,
        url=f"{OFFICIAL_URL}/{file}",
        sha256=sha256,
    )


# The shapes of segment_anything.build_sam; the digests of the published files.
_VIT_H = official_variant(
    "vit_h", 1280, 32, 16, (7, 15, 23, 31), "sam_vit_h_4b8939.pth",
    "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
)  # fmt: skip
_VIT_L = official_variant(
    "vit_l", 1024, 24, 16, (5, 11, 17, 23), "sam_vit_l_0b3195.pth",
    "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
)  # fmt: skip
_VIT_B = official_variant(
    "vit_b", 768, 12, 12, (2, 5, 8, 11), "sam_vit_b_01ec64.pth",
    "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
)  # fmt: skip
_variants: dict[str, SamVariant] = {v.name: v for v in (_VIT_H, _VIT_L, _VIT_B)}


def register_sam_variant(variant: SamVariant, *, replace: bool = False) -> None:
    """Make ``variant`` selectable as ``models.sam.variant``; redefining a name needs ``replace``."""
    existing = _variants.get(variant.name)
    if existing is not None and existing != variant and not replace:
        raise ValueError(f"SAM variant {variant.name!r} is already registered differently")
    _variants[variant.name] = variant


def sam_variant(name: str) -> SamVariant:
    variant = _variants.get(name)
    if variant is None:
        known = ", ".join(sorted(_variants))
        raise ConfigError(f"models.sam.variant: unknown SAM variant {name!r} (known: {known})")
    return variant


def build_sam_module(variant: SamVariant) -> Sam:
    """A randomly initialised ``Sam`` of ``variant``'s shape, in eval mode."""
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = variant.image_size // VIT_PATCH_SIZE
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=variant.image_size,
            patch_size=VIT_PATCH_SIZE,
            embed_dim=variant.encoder_embed_dim,
            depth=variant.encoder_depth,
            num_heads=variant.encoder_num_heads,
            global_attn_indexes=variant.encoder_global_attn_indexes,
            mlp_ratio=4,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            window_size=14,
            out_chans=PROMPT_EMBED_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(variant.image_size, variant.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


@dataclass(frozen=True)
class SamEmbedding:
    """One image's encoder output and the sizes needed to map prompts and masks back to it."""

    features: torch.Tensor  # (1, 256, g, g) on the model's device
    original_size: tuple[int, int]  # (H, W) of the image given to embed_image
    input_size: tuple[int, int]  # (h, w) after resizing the longest side to image_size


class SegmentAnythingModel:
    """A frozen SAM: embed once, then answer point prompts and propose masks on that embedding."""

    def __init__(
        self,
        sam: Sam,
        variant: SamVariant,
        provenance: WeightProvenance,
        runtime: Runtime,
        points_per_batch: int,
    ) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.device = runtime.torch_device()
        self.sam = sam.eval().requires_grad_(False).to(self.device)
        self.variant = variant
        self.provenance = provenance
        self.runtime = runtime
        self.points_per_batch = points_per_batch
        self._resize = ResizeLongestSide(variant.image_size)

    def embed_image(self, image: np.ndarray) -> SamEmbedding:
        """Resize the longest side to the encoder's input, normalise, pad, encode (once)."""
        import torch

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"SAM expects an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}"
            )
        resized = self._resize.apply_image(image)
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None]
        with torch.no_grad(), self.runtime.autocast():
            features = self.sam.image_encoder(self.sam.preprocess(pixels))
        return SamEmbedding(
            features=features,
            original_size=(image.shape[0], image.shape[1]),
            input_size=(resized.shape[0], resized.shape[1]),
        )

    def predict_from_points(
        self, embedding: SamEmbedding, points_xy: np.ndarray, point_labels: np.ndarray
    ) -> PointMask:
        """All points form one prompt; of SAM's three candidate masks keep the best-scored."""
        import torch

        points = np.asarray(points_xy, dtype=np.float64).reshape(1, -1, 2)
        labels = np.asarray(point_labels).reshape(1, -1)
        if points.shape[1] != labels.shape[1]:
            raise ValueError(f"{points.shape[1]} points but {labels.shape[1]} labels")
        low_res, quality = self._decode(embedding, points, labels)
        best = int(torch.argmax(quality[0]))
        logits = self._to_original_size(low_res[:, best : best + 1], embedding)
        mask = logits[0, 0] > self.sam.mask_threshold
        return PointMask(mask=mask.cpu().numpy(), score=float(quality[0, best]))

    def generate_masks(self, embedding: SamEmbedding, config: AutoMaskConfig) -> list[ProposedMask]:
        """SAM's automatic mask generation on one grid over the whole image, on ``embedding``.

        Follows ``SamAutomaticMaskGenerator`` with ``crop_n_layers=0``: one foreground point per
        grid cell, three candidates each, filtered by predicted IoU and stability, then
        de-duplicated by box NMS; plus area bounds. Masks come by decreasing predicted IoU.
        """
        from segment_anything.utils import amg

        height, width = embedding.original_size
        grid = amg.build_point_grid(config.points_per_side) * np.array([[width, height]])
        data = amg.MaskData()
        for (points,) in amg.batch_iterator(self.points_per_batch, grid):
            data.cat(self._grid_batch(embedding, points, config))
        return proposals_after_nms(data, config, amg)

    def _grid_batch(
        self, embedding: SamEmbedding, points: np.ndarray, config: AutoMaskConfig
    ) -> Any:
        """Decode a batch of single-point prompts and keep the candidates that pass the filters."""
        from segment_anything.utils import amg

        low_res, quality = self._decode(
            embedding, points[:, None, :], np.ones((len(points), 1), dtype=np.int64)
        )
        low_res, quality = low_res.flatten(0, 1)[:, None], quality.flatten(0, 1)
        # As in SAM, a threshold of 0 turns its filter off. The IoU filter needs no pixels,
        # so it runs before the costly upsampling.
        if config.pred_iou_thresh > 0.0:
            passing = quality > config.pred_iou_thresh
            low_res, quality = low_res[passing], quality[passing]
        data = amg.MaskData(
            logits=self._to_original_size(low_res, embedding)[:, 0], iou_preds=quality
        )
        return keep_candidates(data, self.sam.mask_threshold, config, amg)

    def _decode(
        self, embedding: SamEmbedding, points_xy: np.ndarray, labels: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (B, N, 2) in original pixels -> low-res logits (B, 3, g, g), quality (B, 3)."""
        import torch

        coords = self._resize.apply_coords(points_xy, embedding.original_size)
        coords_t = torch.as_tensor(coords, dtype=torch.float32, device=self.device)
        labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)
        with torch.no_grad(), self.runtime.autocast():
            sparse, dense = self.sam.prompt_encoder(
                points=(coords_t, labels_t), boxes=None, masks=None
            )
            low_res, quality = self.sam.mask_decoder(
                image_embeddings=embedding.features,
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
        return low_res.float(), quality.float()

    def _to_original_size(self, low_res: torch.Tensor, embedding: SamEmbedding) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return self.sam.postprocess_masks(
                low_res, embedding.input_size, embedding.original_size
            )


def _download_checkpoint(variant: SamVariant, directory: Path) -> Path:
    from fmbseg.io.download import download_file

    target = directory / "sam" / variant.checkpoint_file
    download_file(variant.url, target, sha256=variant.sha256)
    return target


def build(models: ModelsConfig) -> SegmentAnythingModel:
    """The ``segment_anything`` backend: variant from the config, weights via the resolver."""
    config = models.sam
    variant = sam_variant(config.variant)
    dirs = weights_dirs(models.weights_dir)
    request = WeightsRequest(
        role="sam",
        model=variant.name,
        filenames=(variant.checkpoint_file,),
        source_url=variant.url,
        download=functools.partial(_download_checkpoint, variant, dirs[0]) if dirs else None,
    )
    resolved = resolve_weights(
        request,
        checkpoint=config.checkpoint,
        weights_dir=models.weights_dir,
        allow_random_init=config.allow_random_init,
    )
    sam = build_sam_module(variant)
    if resolved.path is not None:
        load_state_dict_strictly(
            sam, read_state_dict(resolved.path), resolved.path, f"SAM {variant.name}"
        )
    return SegmentAnythingModel(
        sam, variant, resolved.provenance, Runtime.from_config(models), config.points_per_batch
    )
