"""The fake backends: protocol conformance and answers that follow from the true labels."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fmbseg.config import AutoMaskConfig, ClipConfig, EncoderConfig, ModelsConfig, SamConfig
from fmbseg.errors import ConfigError
from fmbseg.models.base import PatchEncoder, PromptableSegmenter, VisionLanguageModel
from fmbseg.models.registry import build_patch_encoder, build_segmenter, build_vision_language_model
from fmbseg.oracle.fakes import (
    SPLIT_REGION_QUALITY,
    WHOLE_REGION_QUALITY,
    FakeClip,
    FakeEncoder,
    FakeSam,
    build_clip,
    build_encoder,
)
from fmbseg.oracle.scenes import UNKNOWN, OracleWorld, connected_regions, make_scene, patch_majority

WORLD = OracleWorld()
PROMPTS = [f"a photo of a {name}." for name in WORLD.class_names]


def _tensor(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def _two_class_image(
    height: int = 32, width: int = 48, left: str = "cat", right: str = "traffic light"
) -> np.ndarray:
    labels = np.full((height, width), WORLD.class_id(left), np.int32)
    labels[:, width // 2 :] = WORLD.class_id(right)
    return WORLD.render(labels, seed=1)


def _patch_classes(clip: FakeClip, images: torch.Tensor) -> np.ndarray:
    dense = clip.encode_images(images)
    return (dense.patches @ clip.encode_text(PROMPTS).T).argmax(-1).numpy()


def test_fakes_satisfy_the_protocols() -> None:
    assert isinstance(FakeClip(WORLD), VisionLanguageModel)
    assert isinstance(FakeSam(WORLD), PromptableSegmenter)
    assert isinstance(FakeEncoder(WORLD), PatchEncoder)
    for fake, role in (
        (FakeClip(WORLD), "clip"),
        (FakeSam(WORLD), "sam"),
        (FakeEncoder(WORLD), "encoder"),
    ):
        assert fake.provenance.role == role and fake.provenance.model == "oracle"
        assert fake.provenance.tag == "synthetic" and fake.provenance.path is None


def test_registry_builds_the_fakes_from_config() -> None:
    models = ModelsConfig(
        clip=ClipConfig(backend="oracle"),
        sam=SamConfig(backend="oracle"),
        encoder=EncoderConfig(backend="oracle"),
    )
    clip, sam, encoder = (
        build_vision_language_model(models),
        build_segmenter(models),
        build_patch_encoder(models),
    )
    assert (
        isinstance(clip, FakeClip) and isinstance(sam, FakeSam) and isinstance(encoder, FakeEncoder)
    )
    assert clip.world == sam.world == encoder.world == OracleWorld() and clip.noise == 0.0
    scene = make_scene(OracleWorld(), 64, 64, 0)
    expected, share = patch_majority(scene.labels, clip.patch_size)
    assert (_patch_classes(clip, _tensor(scene.image))[0] == expected)[share == 1].all()


def test_clip_patch_inside_a_class_is_exactly_its_text_embedding() -> None:
    clip = FakeClip(WORLD)
    image = _two_class_image()
    dense = clip.encode_images(_tensor(image))
    text = clip.encode_text(["a photo of a cat.", "a photo of a traffic light."])
    assert dense.patches.shape == (1, 4, 6, 64) and dense.patches.dtype == torch.float32
    for j in range(6):
        assert torch.equal(dense.patches[0, 2, j], text[0] if j < 3 else text[1])
    assert torch.allclose(dense.image.norm(dim=-1), torch.ones(1))
    assert torch.allclose(text.norm(dim=-1), torch.ones(2))


def test_clip_grid_is_rows_by_columns_for_non_square_images() -> None:
    clip = FakeClip(WORLD, patch_size=8)
    labels = np.full((24, 64), WORLD.class_id("grass"), np.int32)
    labels[0:8, 56:64] = WORLD.class_id("sky")  # top-right patch
    dense = clip.encode_images(_tensor(WORLD.render(labels), WORLD.render(labels[::-1])))
    assert dense.patches.shape == (2, 3, 8, 64) and dense.image.shape == (2, 64)
    classes = _patch_classes(clip, _tensor(WORLD.render(labels)))[0]
    assert classes[0, 7] == WORLD.class_id("sky") and (classes == WORLD.class_id("sky")).sum() == 1
    with pytest.raises(ValueError, match="multiple"):
        clip.encode_images(torch.zeros(1, 3, 20, 64))


def test_clip_image_embedding_favours_the_largest_class() -> None:
    clip = FakeClip(WORLD)
    labels = np.full((32, 64), WORLD.class_id("cat"), np.int32)
    labels[:, 16:] = WORLD.class_id("dog")
    scores = clip.encode_images(_tensor(WORLD.render(labels))).image @ clip.encode_text(PROMPTS).T
    assert scores.argmax().item() == WORLD.class_id("dog")


def test_clip_text_templates_map_to_the_longest_class_name() -> None:
    world = OracleWorld(("light", "traffic light", "crème brûlée", "cat"))
    clip = FakeClip(world)
    assert clip.class_of_text("a photo of a traffic light.") == 1
    assert clip.class_of_text("a photo of a light.") == 0
    assert clip.class_of_text("There is a CRÈME BRÛLÉE in the scene.") == 2
    assert clip.class_of_text("a photo of a category.") is None  # "cat" only as a whole word
    text = clip.encode_text(
        ["a photo of a traffic light.", "itap of the traffic light", "a photo of a light."]
    )
    assert torch.equal(text[0], text[1]) and not torch.equal(text[0], text[2])


def test_clip_unknown_text_is_its_own_deterministic_vector() -> None:
    clip = FakeClip(WORLD)
    known = clip.encode_text(PROMPTS)
    unknown = clip.encode_text(["a photo of an airplane.", "a photo of a boat."])
    assert (unknown @ known.T).abs().max() < 0.9 and (unknown[0] @ unknown[1]).abs() < 0.9
    assert torch.allclose(unknown.norm(dim=-1), torch.ones(2))
    assert torch.equal(
        unknown,
        FakeClip(WORLD, seed=5).encode_text(["a photo of an airplane.", "a photo of a boat."]),
    )
    assert clip.encode_text([]).shape == (0, 64)


def test_clip_text_embeddings_are_stable_across_processes() -> None:
    code = (
        "from fmbseg.oracle.fakes import FakeClip; from fmbseg.oracle.scenes import OracleWorld;"
        "print(repr(FakeClip(OracleWorld()).encode_text(['a photo of a crème brûlée.', 'a zebra'])[:, :3].tolist()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    here = FakeClip(WORLD).encode_text(["a photo of a crème brûlée.", "a zebra"])[:, :3].tolist()
    assert out.stdout.strip() == repr(here)


def test_clip_unknown_colour_is_orthogonal_to_every_class() -> None:
    clip = FakeClip(WORLD)
    scene = make_scene(WORLD, 64, 64, 2, unknown_background=True)
    expected, share = patch_majority(scene.labels, 8)
    dense = clip.encode_images(_tensor(scene.image))
    sims = dense.patches[0] @ clip.encode_text(PROMPTS).T
    unknown = torch.from_numpy((expected == UNKNOWN) & (share == 1))
    assert unknown.any() and sims[unknown].abs().max() < 1e-5
    assert (sims[~torch.from_numpy(expected == UNKNOWN)].max(-1).values > 0.99).all()


def test_clip_reads_bilinearly_upsampled_crops() -> None:
    clip = FakeClip(WORLD)
    scene = make_scene(WORLD, 48, 72, 4)
    image = _tensor(scene.image)
    up = torch.nn.functional.interpolate(
        image, scale_factor=4, mode="bilinear", align_corners=False
    )
    expected, share = patch_majority(np.repeat(np.repeat(scene.labels, 4, 0), 4, 1), 8)
    got = _patch_classes(clip, up)[0]
    assert (got == expected)[share >= 0.75].all()
    assert (got == expected).mean() > 0.95


def test_wide_blends_read_as_their_two_classes() -> None:
    """After a 16x bilinear upsampling whole patches lie inside the cat-dog ramp, whose
    middle is nearest to a third colour: the fakes must still see only cat and dog."""
    image = _two_class_image(8, 8, "cat", "dog")
    up = torch.nn.functional.interpolate(
        _tensor(image), scale_factor=16, mode="bilinear", align_corners=False
    )
    pair = {WORLD.class_id("cat"), WORLD.class_id("dog")}
    assert set(_patch_classes(FakeClip(WORLD), up).ravel().tolist()) == pair
    encoder = FakeEncoder(WORLD)
    parts = (
        encoder.encode(up)[0, ..., : encoder.class_dim].reshape(-1, 1, encoder.class_dim).numpy()
    )
    seen = np.isclose(parts, encoder.class_vectors[None].astype(np.float32)).all(-1).argmax(1)
    assert set(seen.tolist()) == pair
    sam = FakeSam(WORLD)
    pixels = (up[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    embedding = sam.embed_image(pixels)
    assert set(embedding.region_labels.tolist()) == pair and len(embedding.region_labels) == 2


def test_clip_noise_is_scaled_seeded_and_independent_of_batching() -> None:
    image = _two_class_image(64, 64)
    clean = FakeClip(WORLD).encode_images(_tensor(image)).patches
    noisy_clip = FakeClip(WORLD, noise=0.5, seed=1)
    noisy = noisy_clip.encode_images(_tensor(image)).patches
    cos = (clean * noisy).sum(-1)
    assert not torch.equal(clean, noisy) and torch.allclose(noisy.norm(dim=-1), torch.ones(1))
    assert cos.mean().item() == pytest.approx(
        1 / np.sqrt(1 + 0.5**2), abs=0.05
    )  # noise = expected norm
    other = make_scene(WORLD, 64, 64, 0).image
    batched = noisy_clip.encode_images(_tensor(other, image)).patches[1:]
    assert torch.equal(batched, noisy) and torch.equal(
        noisy_clip.encode_images(_tensor(image)).patches, noisy
    )
    assert not torch.equal(
        FakeClip(WORLD, noise=0.5, seed=2).encode_images(_tensor(image)).patches, noisy
    )


def test_sam_embeds_once_and_follows_x_y_points() -> None:
    sam = FakeSam(WORLD)
    labels = np.full((60, 60), WORLD.class_id("grass"), np.int32)
    labels[5:15, 35:55] = WORLD.class_id("cat")
    assert labels[45, 10] == WORLD.class_id("grass")  # the swapped point lands elsewhere
    embedding = sam.embed_image(WORLD.render(labels))
    result = sam.predict_from_points(embedding, np.array([[45.0, 10.0]]), np.array([1]))
    np.testing.assert_array_equal(result.mask, labels == WORLD.class_id("cat"))
    assert result.score == 1.0
    swapped = sam.predict_from_points(embedding, np.array([[10.0, 45.0]]), np.array([1]))
    np.testing.assert_array_equal(swapped.mask, labels == WORLD.class_id("grass"))
    sam.embed_image(WORLD.render(labels))
    assert sam.embed_calls == 2


def test_sam_takes_the_region_under_most_foreground_points() -> None:
    sam = FakeSam(WORLD)
    labels = np.full((40, 40), WORLD.class_id("sky"), np.int32)
    labels[10:30, 10:30] = WORLD.class_id("dog")
    embedding = sam.embed_image(WORLD.render(labels))
    points = np.array(
        [[2.0, 2.0], [15.0, 15.0], [20.0, 20.0], [1.0, 1.0], [35.0, 35.0], [36.0, 36.0]]
    )
    dog = sam.predict_from_points(embedding, points[:3], np.array([1, 1, 1])).mask
    assert dog.sum() == 400 and dog[15, 15]
    # three background-labelled points on the sky do not outvote two foreground points
    assert (
        sam.predict_from_points(embedding, points[1:], np.array([1, 1, 0, 0, 0])).mask.sum() == 400
    )
    with pytest.raises(ValueError, match="foreground"):
        sam.predict_from_points(embedding, points[:1], np.array([0]))


def test_sam_perturbations_shrink_grow_and_merge() -> None:
    labels = np.full((50, 50), WORLD.class_id("grass"), np.int32)
    labels[10:30, 10:30] = WORLD.class_id("cat")
    labels[10:30, 30:40] = WORLD.class_id("dog")  # touches the cat
    image = WORLD.render(labels)
    cat = labels == WORLD.class_id("cat")
    point, fg = np.array([[15.0, 15.0]]), np.array([1])

    def predict(**options) -> tuple[np.ndarray, float]:
        sam = FakeSam(WORLD, **options)
        result = sam.predict_from_points(sam.embed_image(image), point, fg)
        return result.mask, result.score

    eroded, score = predict(erode=2)
    assert (
        eroded.sum() == 16 * 16 and not (eroded & ~cat).any() and score == pytest.approx(256 / 400)
    )
    dilated, score = predict(dilate=1)
    assert (dilated & cat).sum() == 400 and dilated.sum() > 400 and score < 1.0
    merged, score = predict(merge_probability=1.0)
    neighbours = [labels == WORLD.class_id(name) for name in ("dog", "grass")]
    assert any(np.array_equal(merged, cat | n) for n in neighbours) and score < 1.0
    assert predict(merge_probability=0.0)[1] == 1.0


def test_sam_generate_masks_recovers_the_true_regions() -> None:
    sam = FakeSam(WORLD)
    for seed in range(3):
        scene = make_scene(WORLD, 48, 80, seed)
        truth_ids, _ = connected_regions(scene.labels)
        truth = {(truth_ids == r).tobytes() for r in range(truth_ids.max() + 1)}
        dense = AutoMaskConfig(points_per_side=80)  # a grid point on every pixel
        proposals = sam.generate_masks(sam.embed_image(scene.image), dense)
        assert {p.mask.tobytes() for p in proposals} == truth and len(proposals) == len(truth)
        assert all((p.predicted_iou, p.stability_score) == WHOLE_REGION_QUALITY for p in proposals)
        assert all(p.mask.shape == (48, 80) and p.mask.dtype == bool for p in proposals)


def test_sam_generate_masks_respects_grid_area_and_quality() -> None:
    sam = FakeSam(WORLD)
    labels = np.full((40, 60), WORLD.class_id("sky"), np.int32)
    labels[0:20, 0:20] = WORLD.class_id("cat")  # 1/6 of the image
    labels[16:24, 26:34] = WORLD.class_id("dog")  # the centre, 64 pixels
    embedding = sam.embed_image(WORLD.render(labels))
    centre = sam.generate_masks(embedding, AutoMaskConfig(points_per_side=1))
    assert len(centre) == 1 and centre[0].mask.sum() == 64
    areas = sorted(
        p.mask.sum() for p in sam.generate_masks(embedding, AutoMaskConfig(min_area_fraction=0.1))
    )
    assert areas == [400, 2400 - 464]
    small = sam.generate_masks(embedding, AutoMaskConfig(max_area_fraction=0.2))
    assert sorted(p.mask.sum() for p in small) == [64, 400]
    split = FakeSam(WORLD, oversegment=True)
    halves = split.generate_masks(split.embed_image(WORLD.render(labels)), AutoMaskConfig())
    assert len(halves) == 6 and all(
        (p.predicted_iou, p.stability_score) == SPLIT_REGION_QUALITY for p in halves
    )
    union = np.zeros((40, 60), np.int32)
    for p in halves:
        assert len(np.unique(labels[p.mask])) == 1
        union += p.mask
    assert (union == 1).all()
    assert sorted(p.mask.sum() for p in halves)[:2] == [32, 32]
    strict = AutoMaskConfig(pred_iou_thresh=0.95)
    assert split.generate_masks(split.embed_image(WORLD.render(labels)), strict) == []
    assert len(sam.generate_masks(embedding, strict)) == 3  # whole regions are sure of themselves


def test_encoder_class_dims_separate_classes_and_nuisance_varies() -> None:
    encoder = FakeEncoder(WORLD)
    scene = make_scene(WORLD, 64, 96, 3)
    features = encoder.encode(_tensor(scene.image, make_scene(WORLD, 64, 96, 4).image)).numpy()
    assert (
        features.shape == (2, 8, 12, 32)
        and encoder.embed_dim == 32
        and features.dtype == np.float32
    )
    expected, _ = patch_majority(scene.labels, 8)
    cls, nuisance = features[0, ..., :16], features[0, ..., 16:]
    for k in np.unique(expected):
        same = cls[expected == k]
        assert np.allclose(same, same[0])  # class part: the class alone
    centroids = {k: cls[expected == k][0] for k in np.unique(expected)}
    gaps = [
        np.linalg.norm(centroids[a] - centroids[b]) for a in centroids for b in centroids if a < b
    ]
    assert min(gaps) > 0.3
    assert nuisance.std(axis=(0, 1)).min() > 0.1 and not np.allclose(
        nuisance, features[1, ..., 16:]
    )
    # nearest centroid on the full features (nuisance included) still finds each patch's class
    full = features[0].reshape(-1, 32)
    means = np.stack([full[expected.ravel() == k].mean(0) for k in centroids])
    assigned = np.array(list(centroids))[
        np.linalg.norm(full[:, None] - means[None], axis=-1).argmin(1)
    ]
    assert (assigned == expected.ravel()).mean() > 0.95


def test_encoder_is_deterministic_signal_scaled_and_not_clip_aligned() -> None:
    image = _two_class_image(32, 48)
    images = _tensor(image)
    encoder = FakeEncoder(WORLD, patch_size=16, class_dim=64, nuisance_dim=8, signal=2.0)
    first = encoder.encode(images)
    assert first.shape == (1, 2, 3, 72) and torch.equal(first, encoder.encode(images))
    assert not torch.equal(first, FakeEncoder(WORLD, 16, 64, 8, 2.0, seed=1).encode(images))
    quiet = FakeEncoder(WORLD, patch_size=16, class_dim=64, nuisance_dim=8, signal=0.0).encode(
        images
    )
    assert torch.count_nonzero(quiet[..., :64]) == 0 and torch.equal(
        quiet[..., 64:], first[..., 64:]
    )
    cat = first[0, 0, 0, :64]
    text = FakeClip(WORLD).encode_text(["a photo of a cat."])[0]
    assert abs(torch.nn.functional.cosine_similarity(cat, text, dim=0).item()) < 0.9
    assert cat.norm().item() == pytest.approx(2.0, rel=0.5)


def test_factories_use_the_configured_device() -> None:
    assert build_clip(ModelsConfig()).encode_text(["a photo of a cat."]).device.type == "cpu"
    cuda = ModelsConfig(device="cuda")
    if torch.cuda.is_available():
        assert build_encoder(cuda).encode(torch.zeros(1, 3, 8, 8)).device.type == "cuda"
    else:
        with pytest.raises(ConfigError, match="CUDA"):
            build_encoder(cuda)
