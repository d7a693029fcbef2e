"""The ``sam2`` backend, on a tiny random-init SAM 2 registered as a variant.

The tiny variant is SAM 2.1's hiera-t configuration with a narrower, shallower Hiera trunk
(width 16, stages 1-1-2-1) and a 256 px input; the prompt encoder and mask decoder are SAM 2's
own, so every test runs the real code path. The reference is the ``sam2`` package itself:
``SAM2AutomaticMaskGenerator`` and ``SAM2ImagePredictor`` on the same module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.config import AutoMaskConfig, ModelsConfig, SamConfig
from fmbseg.errors import ConfigError, WeightsError
from fmbseg.models.base import PromptableSegmenter

pytest.importorskip("sam2", reason="the sam2 extra is not installed")

from fmbseg.models.registry import build_segmenter
from fmbseg.models.sam2 import (
    Sam2Segmenter,
    Sam2Variant,
    build_sam2_module,
    register_sam2_variant,
    sam2_variant,
)

TINY = Sam2Variant(
    name="test_tiny_sam2",
    config_file="configs/sam2.1/sam2.1_hiera_t.yaml",
    checkpoint_file="sam2_test_tiny.pt",
    url="http://127.0.0.1:9/sam2_test_tiny.pt",  # the discard port: nothing listens there
    overrides=(
        "++model.image_encoder.trunk.embed_dim=16",
        "++model.image_encoder.trunk.num_heads=1",
        "++model.image_encoder.trunk.stages=[1,1,2,1]",
        "++model.image_encoder.trunk.global_att_blocks=[3]",
        "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
        "++model.image_size=256",
        "++model.memory_attention.num_layers=1",
    ),
)
register_sam2_variant(TINY)

SEED = 7  # with these weights the tiny model proposes three distinct masks on IMAGE
AUTO = AutoMaskConfig(points_per_side=6, pred_iou_thresh=0.5, stability_score_thresh=0.8)
POINTS_PER_BATCH = 16  # 36 grid points -> three batches


def make_image() -> np.ndarray:
    """Flat colour blocks on a grey ground, non-square so (x, y) mix-ups show."""
    image = np.full((96, 128, 3), 90, np.uint8)
    image[10:50, 20:70] = (200, 30, 30)
    image[60:90, 80:120] = (20, 200, 60)
    image[55:85, 10:40] = (30, 40, 220)
    image[5:30, 90:125] = (240, 240, 240)
    return image


IMAGE = make_image()


def models_config(weights_dir: str | None = None, **sam: object) -> ModelsConfig:
    section = SamConfig(backend="sam2", variant=TINY.name, points_per_batch=POINTS_PER_BATCH, **sam)  # type: ignore[arg-type]
    return ModelsConfig(sam=section, weights_dir=weights_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in SAM 2's published layout (``{"model": state_dict}``), made to give
    region-shaped masks as in test_sam.py: averaged upscaling kernels, scaled hypernetworks."""
    torch.manual_seed(SEED)
    model = build_sam2_module(TINY)
    decoder = model.sam_mask_decoder
    with torch.no_grad():
        for layer in decoder.output_upscaling:
            if isinstance(layer, torch.nn.ConvTranspose2d):
                layer.weight.copy_(
                    layer.weight.mean(dim=(2, 3), keepdim=True).expand_as(layer.weight)
                )
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(200)
            mlp.layers[-1].bias.mul_(200)
    path = tmp_path_factory.mktemp("ckpt") / TINY.checkpoint_file
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Sam2Segmenter:
    return build_segmenter(models_config(checkpoint=str(checkpoint)))


@pytest.fixture(scope="module")
def embedding(model: Sam2Segmenter) -> object:
    return model.embed_image(IMAGE)


def reference_predictor(model: Sam2Segmenter, predictor: object) -> object:
    """sam2's predictor writes down a 1024 input's feature sizes; the tiny model's are 256's."""
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # type: ignore[attr-defined]
    return predictor


def test_official_variants_name_configs_that_ship_with_sam2() -> None:
    import sam2

    package = Path(sam2.__file__).parent
    for size, file in [("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large")]:
        variant = sam2_variant(f"sam2.1_hiera_{size}")
        assert (package / variant.config_file).is_file()
        assert variant.url.endswith(f"/092824/sam2.1_hiera_{file}.pt")
    with pytest.raises(ConfigError, match="unknown SAM 2 variant 'vit_b'"):
        sam2_variant("vit_b")


def test_generate_masks_matches_sam2s_automatic_mask_generator(
    model: Sam2Segmenter, embedding: object
) -> None:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    generator = SAM2AutomaticMaskGenerator(
        model.model,
        points_per_side=AUTO.points_per_side,
        points_per_batch=POINTS_PER_BATCH,
        pred_iou_thresh=AUTO.pred_iou_thresh,
        stability_score_thresh=AUTO.stability_score_thresh,
        stability_score_offset=AUTO.stability_score_offset,
        box_nms_thresh=AUTO.box_nms_thresh,
        crop_n_layers=0,
        min_mask_region_area=0,
    )
    reference_predictor(model, generator.predictor)
    reference = generator.generate(IMAGE)

    ours = model.generate_masks(embedding, AUTO)

    assert len(ours) >= 2, "the tiny model should propose several masks on IMAGE"
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference, strict=True):
        assert np.array_equal(mine.mask, theirs["segmentation"])
        assert mine.predicted_iou == pytest.approx(theirs["predicted_iou"], abs=1e-6)
        assert mine.stability_score == pytest.approx(theirs["stability_score"], abs=1e-6)
    unfiltered = model.generate_masks(
        embedding, AUTO.model_copy(update={"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
    )
    assert len(unfiltered) > len(ours)  # the filters really chose


def test_predict_from_points_keeps_the_best_of_three_as_sam2s_predictor(
    model: Sam2Segmenter, embedding: object
) -> None:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    points, labels = np.array([[45.0, 30.0], [100.0, 75.0]]), np.array([1, 0])
    reference = reference_predictor(model, SAM2ImagePredictor(model.model))
    reference.set_image(IMAGE)
    masks, scores, _ = reference.predict(points, labels, multimask_output=True)

    result = model.predict_from_points(embedding, points, labels)

    best = int(np.argmax(scores))
    assert result.mask.shape == IMAGE.shape[:2] and result.mask.dtype == bool
    assert result.score == pytest.approx(float(scores[best]), abs=1e-6)
    assert np.array_equal(result.mask, masks[best] > 0)


def test_the_image_is_encoded_once_for_both_routes(model: Sam2Segmenter) -> None:
    calls: list[int] = []
    hook = model.model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        embedding = model.embed_image(IMAGE)
        for x, y in [(40, 30), (100, 75)]:
            model.predict_from_points(embedding, np.array([[x, y]]), np.array([1]))
        model.generate_masks(embedding, AUTO.model_copy(update={"points_per_side": 2}))
    finally:
        hook.remove()
    assert calls == [1]
    assert isinstance(model, PromptableSegmenter)


def test_area_bounds_are_fractions_of_the_image(model: Sam2Segmenter, embedding: object) -> None:
    everything = AUTO.model_copy(update={"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
    fractions = sorted(m.mask.mean() for m in model.generate_masks(embedding, everything))
    assert len(set(fractions)) >= 3
    low, high = fractions[0] * 1.01, fractions[-1] * 0.99
    bounded = model.generate_masks(
        embedding,
        everything.model_copy(update={"min_area_fraction": low, "max_area_fraction": high}),
    )
    assert bounded and all(low <= m.mask.mean() <= high for m in bounded)


def test_weights_come_from_a_file_or_a_weights_directory_with_provenance(
    checkpoint: Path, model: Sam2Segmenter, tmp_path: Path
) -> None:
    (tmp_path / "sam").mkdir()
    (tmp_path / "sam" / TINY.checkpoint_file).write_bytes(checkpoint.read_bytes())
    from_dir = build_segmenter(models_config(weights_dir=str(tmp_path)))
    assert from_dir.provenance.source == "weights_dir"
    assert model.provenance.source == "file" and model.provenance.model == TINY.name
    assert from_dir.provenance.sha256 == model.provenance.sha256
    for name, value in model.model.state_dict().items():
        assert torch.equal(value, from_dir.model.state_dict()[name]), name


def test_random_init_is_refused_unless_allowed_naming_the_official_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"no weights for sam test_tiny_sam2: place sam2_test"):
        build_segmenter(models_config(weights_dir=str(tmp_path)))
    random = build_segmenter(models_config(weights_dir=str(tmp_path), allow_random_init=True))
    assert random.provenance.is_random


def test_checkpoint_of_another_architecture_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "sam2.1_hiera_small.pt"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict()}, path)
    with pytest.raises(WeightsError, match=r"not a checkpoint of SAM 2 test_tiny_sam2 \("):
        build_segmenter(models_config(checkpoint=str(path)))


def test_without_the_package_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "sam2.build_sam", None)
    with pytest.raises(ConfigError, match=r"pip install --no-build-isolation \"fmbseg\[sam2\]\""):
        build_segmenter(models_config(weights_dir=str(tmp_path), allow_random_init=True))
