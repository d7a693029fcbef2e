"""The segment-anything backend, on a tiny random-init SAM registered as a variant.

The tiny variant keeps SAM's real prompt encoder and mask decoder and shrinks the image
encoder (width 32, depth 2) and its input (256 px), so every test runs the real code path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.config import AutoMaskConfig, ModelsConfig, SamConfig
from fmbseg.errors import ConfigError, WeightsError
from fmbseg.models.base import PromptableSegmenter
from fmbseg.models.registry import build_segmenter
from fmbseg.models.sam import (
    SamVariant,
    SegmentAnythingModel,
    build,
    build_sam_module,
    register_sam_variant,
    sam_variant,
)

TINY = SamVariant(
    name="test_tiny",
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    checkpoint_file="sam_test_tiny.pth",
    url="http://127.0.0.1:9/sam_test_tiny.pth",  # the discard port: nothing listens there
    sha256=None,
    image_size=256,
)
register_sam_variant(TINY)

# With these weights the tiny model proposes several distinct masks on IMAGE (see tiny_sam).
SEED = 7
# Low enough for random weights to pass some candidates, high enough to reject others.
AUTO = AutoMaskConfig(points_per_side=6, pred_iou_thresh=0.05, stability_score_thresh=0.7)
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


def models_config(
    variant: str = TINY.name, weights_dir: str | None = None, **sam: object
) -> ModelsConfig:
    """Only the SAM section matters here; no weights directory unless a test gives one."""
    section = SamConfig(variant=variant, points_per_batch=POINTS_PER_BATCH, **sam)  # type: ignore[arg-type]
    return ModelsConfig(sam=section, weights_dir=weights_dir)


@pytest.fixture(scope="module")
def tiny_sam() -> torch.nn.Module:
    """Random weights, made to give region-shaped masks.

    Random transposed-convolution kernels paint a 4x4 checkerboard over every mask and the
    random mask logits are tiny (|logit| << SAM's stability offset of 1), so no mask would be
    stable. Averaging the kernels over their taps and scaling the hypernetwork outputs gives
    masks that follow the colour blocks, so the filters and NMS have real choices to make.
    """
    torch.manual_seed(SEED)
    sam = build_sam_module(TINY)
    with torch.no_grad():
        for layer in sam.mask_decoder.output_upscaling:
            if isinstance(layer, torch.nn.ConvTranspose2d):
                layer.weight.copy_(
                    layer.weight.mean(dim=(2, 3), keepdim=True).expand_as(layer.weight)
                )
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(200)
            mlp.layers[-1].bias.mul_(200)
    return sam


@pytest.fixture(scope="module")
def checkpoint(tiny_sam: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / TINY.checkpoint_file
    torch.save(tiny_sam.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> SegmentAnythingModel:
    return build(models_config(checkpoint=str(checkpoint)))


@pytest.fixture(scope="module")
def embedding(model: SegmentAnythingModel) -> object:  # opaque by contract
    return model.embed_image(IMAGE)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served on 127.0.0.1 (a stand-in for dl.fbaipublicfiles.com) and its base URL."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_official_variants_have_segment_anything_architectures() -> None:
    from segment_anything import sam_model_registry

    for name in ("vit_h", "vit_l", "vit_b"):
        variant = sam_variant(name)
        assert (
            variant.url
            == f"https://dl.fbaipublicfiles.com/segment_anything/{variant.checkpoint_file}"
        )
        with torch.device("meta"):
            ours = build_sam_module(variant).state_dict()
            theirs = sam_model_registry[name]().state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_unknown_variant_and_conflicting_registration_are_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"models\.sam\.variant: unknown SAM variant 'vit_x'.*vit_b"
    ):
        sam_variant("vit_x")
    register_sam_variant(TINY)  # the same definition again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_sam_variant(dataclasses.replace(TINY, encoder_depth=3))


def test_random_init_is_refused_unless_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = tmp_path / "weights"
    with pytest.raises(WeightsError) as refused:
        build(models_config(weights_dir=str(weights)))
    message = str(refused.value)
    assert f"place {TINY.checkpoint_file}" in message and f"in {weights / 'sam'}/" in message
    assert "allow_random_init=true" in message

    with caplog.at_level(logging.WARNING):
        model = build(models_config(weights_dir=str(weights), allow_random_init=True))
    assert model.provenance.is_random and model.provenance.tag == "random-init"
    assert model.provenance.path is None
    assert "RANDOM-INIT WEIGHTS for sam test_tiny" in caplog.text


def test_checkpoint_file_and_weights_dir_load_the_same_weights(
    tiny_sam: torch.nn.Module, checkpoint: Path, model: SegmentAnythingModel, tmp_path: Path
) -> None:
    weights = tmp_path / "weights"
    (weights / "sam").mkdir(parents=True)
    (weights / "sam" / TINY.checkpoint_file).write_bytes(checkpoint.read_bytes())
    from_dir = build(models_config(weights_dir=str(weights)))

    assert model.provenance.source == "file" and model.provenance.path == str(checkpoint)
    assert from_dir.provenance.source == "weights_dir"
    assert model.provenance.sha256 == from_dir.provenance.sha256 == sha256_of(checkpoint)

    a, b = model.embed_image(IMAGE), from_dir.embed_image(IMAGE)
    assert torch.equal(a.features, b.features)
    points, labels = np.array([[40.0, 30.0], [100.0, 75.0]]), np.array([1, 0])
    mask_a = model.predict_from_points(a, points, labels)
    mask_b = from_dir.predict_from_points(b, points, labels)
    assert np.array_equal(mask_a.mask, mask_b.mask) and mask_a.score == mask_b.score

    # ...and they are the weights that were saved, not a fresh random draw.
    from segment_anything import SamPredictor

    reference = SamPredictor(tiny_sam)
    reference.set_image(IMAGE)
    assert torch.equal(reference.features, a.features)


def test_registry_builds_the_backend(checkpoint: Path) -> None:
    segmenter = build_segmenter(models_config(checkpoint=str(checkpoint)))
    assert isinstance(segmenter, SegmentAnythingModel)
    assert isinstance(segmenter, PromptableSegmenter)


def test_offline_fails_fast_naming_the_official_file(tmp_path: Path) -> None:
    # conftest sets FMBSEG_OFFLINE: the resolver must not even try the network.
    started = time.monotonic()
    with pytest.raises(WeightsError) as offline:
        build(models_config("vit_b", weights_dir=str(tmp_path)))
    assert time.monotonic() - started < 5
    message = str(offline.value)
    assert "place sam_vit_b_01ec64.pth" in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in message
    assert "FMBSEG_OFFLINE is set" in message


def test_unreachable_host_fails_fast_without_an_offline_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FMBSEG_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(WeightsError, match=r"sam_test_tiny\.pth.*127\.0\.0\.1:9 unreachable"):
        build(models_config(weights_dir=str(tmp_path)))
    assert time.monotonic() - started < 5


def test_standard_download_fetches_and_verifies_the_checkpoint(
    checkpoint: Path,
    model: SegmentAnythingModel,
    http_dir: tuple[Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FMBSEG_OFFLINE", raising=False)
    served, base = http_dir
    (served / "sam_test_http.pth").write_bytes(checkpoint.read_bytes())
    # Like torch-hub file names: a prefix of the digest is enough to check against.
    variant = dataclasses.replace(
        TINY,
        name="test_http",
        checkpoint_file="sam_test_http.pth",
        url=f"{base}/sam_test_http.pth",
        sha256=sha256_of(checkpoint)[:8],
    )
    register_sam_variant(variant, replace=True)
    weights = tmp_path / "weights"

    downloaded = build(models_config("test_http", weights_dir=str(weights)))

    target = weights / "sam" / "sam_test_http.pth"
    assert downloaded.provenance.source == "download"
    assert downloaded.provenance.path == str(target)
    assert downloaded.provenance.sha256 == sha256_of(checkpoint)
    assert torch.equal(downloaded.embed_image(IMAGE).features, model.embed_image(IMAGE).features)


def test_corrupted_download_is_rejected_and_removed(
    checkpoint: Path, http_dir: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FMBSEG_OFFLINE", raising=False)
    served, base = http_dir
    corrupted = bytearray(checkpoint.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF
    (served / "sam_test_bad.pth").write_bytes(bytes(corrupted))
    variant = dataclasses.replace(
        TINY,
        name="test_bad",
        checkpoint_file="sam_test_bad.pth",
        url=f"{base}/sam_test_bad.pth",
        sha256=sha256_of(checkpoint),
    )
    register_sam_variant(variant, replace=True)
    weights = tmp_path / "weights"

    with pytest.raises(WeightsError, match=r"download failed: .*sha256 .*expected"):
        build(models_config("test_bad", weights_dir=str(weights)))
    assert not any(p.is_file() for p in weights.rglob("*"))


def test_checkpoint_of_another_architecture_is_a_one_line_error(tmp_path: Path) -> None:
    wider = build_sam_module(dataclasses.replace(TINY, encoder_embed_dim=48))
    path = tmp_path / "wider.pth"
    torch.save(wider.state_dict(), path)
    with pytest.raises(WeightsError) as wrong:
        build(models_config(checkpoint=str(path)))
    message = str(wrong.value)
    assert "\n" not in message
    assert str(path) in message and "not a checkpoint of SAM test_tiny" in message
    assert "wrong-shape" in message

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(
        WeightsError, match=r"garbage\.pth: not readable as a weights-only checkpoint"
    ):
        build(models_config(checkpoint=str(garbage)))


def test_image_encoder_runs_once_per_image(checkpoint: Path) -> None:
    model = build(models_config(checkpoint=str(checkpoint)))
    calls: list[int] = []
    model.sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))

    embedding = model.embed_image(IMAGE)
    for x, y in [(40, 30), (100, 75), (20, 70)]:
        model.predict_from_points(embedding, np.array([[x, y]]), np.array([1]))
    model.generate_masks(embedding, AUTO)

    assert len(calls) == 1


def test_predict_from_points_keeps_the_best_of_three_at_original_size(checkpoint: Path) -> None:
    from segment_anything import SamPredictor

    model = build(models_config(checkpoint=str(checkpoint)))
    with torch.no_grad():  # make the last of the three candidates the best-scored one
        model.sam.mask_decoder.iou_prediction_head.layers[-1].bias[-1] += 1.0
    points, labels = np.array([[45.0, 30.0], [100.0, 75.0]]), np.array([1, 0])
    reference = SamPredictor(model.sam)
    reference.set_image(IMAGE)
    masks, scores, _ = reference.predict(points, labels, multimask_output=True)
    assert scores.shape == (3,) and int(np.argmax(scores)) == 2

    result = model.predict_from_points(model.embed_image(IMAGE), points, labels)

    assert result.mask.shape == IMAGE.shape[:2] and result.mask.dtype == bool
    assert result.score == pytest.approx(float(scores.max()), abs=1e-6)
    assert np.array_equal(result.mask, masks[2])
    assert not np.array_equal(masks[2], masks[0])


def test_generate_masks_matches_segment_anythings_generator(
    model: SegmentAnythingModel, embedding: object
) -> None:
    from segment_anything import SamAutomaticMaskGenerator

    reference = SamAutomaticMaskGenerator(
        model.sam,
        points_per_side=AUTO.points_per_side,
        points_per_batch=POINTS_PER_BATCH,
        pred_iou_thresh=AUTO.pred_iou_thresh,
        stability_score_thresh=AUTO.stability_score_thresh,
        stability_score_offset=AUTO.stability_score_offset,
        box_nms_thresh=AUTO.box_nms_thresh,
        crop_n_layers=0,
        min_mask_region_area=0,
    ).generate(IMAGE)

    ours = model.generate_masks(embedding, AUTO)

    assert len(ours) >= 2, "the tiny model should propose several masks on IMAGE"
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference, strict=True):
        assert np.array_equal(mine.mask, theirs["segmentation"])
        assert mine.predicted_iou == pytest.approx(theirs["predicted_iou"], abs=1e-6)
        assert mine.stability_score == pytest.approx(theirs["stability_score"], abs=1e-6)
    # The filters and NMS really chose: without them there are more masks.
    unfiltered = model.generate_masks(
        embedding, AUTO.model_copy(update={"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
    )
    assert len(unfiltered) > len(ours)
    assert all(m.predicted_iou > AUTO.pred_iou_thresh for m in ours)
    assert all(m.stability_score >= AUTO.stability_score_thresh for m in ours)


def test_area_bounds_are_fractions_of_the_image(
    model: SegmentAnythingModel, embedding: object
) -> None:
    fractions = sorted(m.mask.mean() for m in model.generate_masks(embedding, AUTO))
    assert len(set(fractions)) >= 3
    low, high = fractions[0] * 1.01, fractions[-1] * 0.99  # excludes the smallest and largest

    bounded = model.generate_masks(
        embedding, AUTO.model_copy(update={"min_area_fraction": low, "max_area_fraction": high})
    )

    assert bounded
    assert all(low <= m.mask.mean() <= high for m in bounded)


def test_embed_image_rejects_non_rgb_uint8(model: SegmentAnythingModel) -> None:
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        model.embed_image(IMAGE.astype(np.float32))
