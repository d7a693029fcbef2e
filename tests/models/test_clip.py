"""The open_clip backend, on a tiny random-init configuration of the real ViT CLIP architecture.

Weights are random, so no test judges what an embedding means: they check where weights come
from, that saved weights come back exactly, shapes and norms, and that every image path equals
an independent computation from the model's own weights (open_clip's forward, or plain math).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fmbseg.config import ClipConfig, ModelsConfig
from fmbseg.errors import ConfigError, WeightsError
from fmbseg.models.base import VisionLanguageModel
from fmbseg.models.clip import OpenClipModel, build

TINY = "fmbseg-test-tiny-vit"
NARROW = "fmbseg-test-narrow-vit"  # the same layout, narrower: a checkpoint of another architecture


def tiny_config(width: int) -> dict[str, object]:
    """Two vision and two text layers of ``width`` with 2 heads, patch 16 at 64 px, joint dim 32."""
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 64,
            "patch_size": 16,
            "layers": 2,
            "width": width,
            "head_width": width // 2,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "layers": 2,
            "width": width,
            "heads": 2,
        },
    }


TINY_CONFIGS = {TINY: tiny_config(64), NARROW: tiny_config(32)}
PROMPTS = ["a photo of a cat.", "a photo of a traffic light.", "a photo of a café."]


@pytest.fixture(scope="session", autouse=True)
def tiny_architectures(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Register the tiny configurations with open_clip, as a user would add a custom config."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, config in TINY_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


@pytest.fixture(autouse=True)
def no_user_weights_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FMBSEG_WEIGHTS_DIR", raising=False)


def models_config(weights_dir: Path | None = None, **overrides: object) -> ModelsConfig:
    clip = ClipConfig(**{"model": TINY, "pretrained": None, **overrides})
    return ModelsConfig(clip=clip, weights_dir=str(weights_dir) if weights_dir else None)


@pytest.fixture(scope="module")
def random_clip() -> OpenClipModel:
    torch.manual_seed(0)
    return build(models_config(allow_random_init=True))


@pytest.fixture(scope="module")
def checkpoint(random_clip: OpenClipModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / f"{TINY}.safetensors"
    save_file(random_clip.network.state_dict(), str(path))
    return path


def images(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def open_clip_pixels(model: OpenClipModel, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels normalised with the mean/std open_clip attached to the network."""
    cfg = model.network.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def open_clip_at_size(model: OpenClipModel, height: int, width: int) -> torch.nn.Module:
    """open_clip's own network built for ``height x width`` inputs, positions resized by open_clip."""
    reference = open_clip.create_model(TINY, force_image_size=(height, width))
    reference.eval().requires_grad_(False)
    state = dict(model.network.state_dict())
    open_clip.model.resize_pos_embed(state, reference)
    reference.load_state_dict(state)
    return reference


def direct_dense(reference: torch.nn.Module, pixels: torch.Tensor, mixing: str) -> torch.Tensor:
    """Dense embeddings written out by hand from the weights, head by head."""
    visual = reference.visual
    blocks = visual.transformer.resblocks
    out = visual.forward_intermediates(
        pixels, indices=[len(blocks) - 2], output_fmt="NLC", output_extra_tokens=True
    )
    tokens = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], 1)
    last = blocks[-1]
    width, heads = tokens.shape[-1], last.attn.num_heads
    weight, bias = last.attn.in_proj_weight, last.attn.in_proj_bias
    normed = last.ln_1(tokens)
    q, k, v = (
        normed @ weight[i * width : (i + 1) * width].T + bias[i * width : (i + 1) * width]
        for i in range(3)
    )
    if mixing == "maskclip":
        mixed = v
    else:
        head_width = width // heads
        outputs = []
        for h in range(heads):
            cols = slice(h * head_width, (h + 1) * head_width)
            qh, kh, vh = q[..., cols], k[..., cols], v[..., cols]
            weights = torch.softmax(qh @ qh.transpose(1, 2) / math.sqrt(head_width), dim=-1)
            if mixing == "sclip":
                weights = weights + torch.softmax(
                    kh @ kh.transpose(1, 2) / math.sqrt(head_width), dim=-1
                )
            outputs.append(weights @ vh)
        mixed = torch.cat(outputs, dim=-1)
    attended = mixed @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    projected = visual.ln_post(attended[:, 1:]) @ visual.proj
    return F.normalize(projected, dim=-1)


# --- weights: provenance, round trip, refusals -------------------------------------------------


def test_random_init_build_has_random_provenance_and_the_architecture_sizes(
    random_clip: OpenClipModel,
) -> None:
    assert isinstance(random_clip, VisionLanguageModel)
    assert random_clip.provenance.source == "random-init"
    assert random_clip.provenance.tag == "random-init"
    assert random_clip.provenance.model == TINY
    assert (random_clip.image_size, random_clip.patch_size, random_clip.embed_dim) == (64, 16, 32)


def test_model_is_frozen_in_eval_mode(random_clip: OpenClipModel) -> None:
    assert not random_clip.network.training
    assert not any(p.requires_grad for p in random_clip.network.parameters())
    dense = random_clip.encode_images(images(64, 64))
    assert not dense.patches.requires_grad and not dense.image.requires_grad


@pytest.mark.parametrize(
    ("route", "suffix", "subfolder"),
    [
        ("checkpoint", ".safetensors", ""),
        ("weights_dir", ".pt", "clip"),
        ("weights_dir", ".bin", ""),
    ],
)
def test_saved_weights_load_back_identically(
    random_clip: OpenClipModel, tmp_path: Path, route: str, suffix: str, subfolder: str
) -> None:
    path = tmp_path / subfolder / f"{TINY}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = random_clip.network.state_dict()
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    config = (
        models_config(checkpoint=str(path)) if route == "checkpoint" else models_config(tmp_path)
    )

    loaded = build(config)

    assert loaded.provenance.source == ("file" if route == "checkpoint" else "weights_dir")
    assert loaded.provenance.path == str(path)
    assert loaded.provenance.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(loaded.encode_text(PROMPTS), random_clip.encode_text(PROMPTS))
    before, after = random_clip.encode_images(images(48, 80)), loaded.encode_images(images(48, 80))
    assert torch.equal(after.patches, before.patches)
    assert torch.equal(after.image, before.image)


def test_random_init_is_refused_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as caught:
        build(models_config(tmp_path))
    message = str(caught.value)
    assert f"{TINY}.safetensors" in message
    assert str(tmp_path / "clip") in message
    assert "allow_random_init" in message


@pytest.mark.parametrize(
    "environment", [{"FMBSEG_OFFLINE": "1"}, {"FMBSEG_OFFLINE": None, "HF_HUB_OFFLINE": "1"}]
)
def test_offline_standard_download_fails_fast_naming_the_file_to_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environment: dict[str, str | None]
) -> None:
    for key, value in environment.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    config = ModelsConfig(
        clip=ClipConfig(model="ViT-B-16", pretrained="openai"), weights_dir=str(tmp_path)
    )

    start = time.perf_counter()
    with pytest.raises(WeightsError) as caught:
        build(config)
    elapsed = time.perf_counter() - start

    assert elapsed < 5.0
    message = str(caught.value)
    assert "ViT-B-16-openai.safetensors" in message
    assert str(tmp_path / "clip") in message
    assert "download skipped" in message
    assert "\n" not in message
    # The hub is where the openai tag lives: only the hub's own offline switch can explain it.
    if environment.get("FMBSEG_OFFLINE") is None:
        assert "HF_HUB_OFFLINE" in message


def test_checkpoint_of_another_architecture_is_refused_naming_file_and_architecture(
    tmp_path: Path,
) -> None:
    path = tmp_path / "narrow.safetensors"
    save_file(open_clip.create_model(NARROW).state_dict(), str(path))

    with pytest.raises(WeightsError) as caught:
        build(models_config(checkpoint=str(path)))

    message = str(caught.value)
    assert str(path) in message and TINY in message
    assert "expected" in message and "\n" not in message


class _TouchOnUnpickle:
    """A pickle that creates a file when it is unpickled: it must never be."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


def test_checkpoint_files_are_never_unpickled_beyond_tensors(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"visual.proj": _TouchOnUnpickle(marker)}, path)

    with pytest.raises(WeightsError, match="weights-only"):
        build(models_config(checkpoint=str(path)))
    assert not marker.exists()

    torch.load(path, weights_only=False)  # what a plain unpickler would have done
    assert marker.exists()


@pytest.mark.parametrize(
    ("clip", "key"),
    [
        ({"model": "ViT-Nope-99"}, "models.clip.model"),
        ({"model": "ViT-B-16-SigLIP"}, "models.clip.model"),  # timm image tower
        ({"model": "RN50"}, "models.clip.model"),
        ({"model": "ViT-B-16", "pretrained": "no-such-tag"}, "models.clip.pretrained"),
        ({"batch_size": 0}, "models.clip.batch_size"),
    ],
)
def test_unusable_configurations_are_config_errors(clip: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build(models_config(allow_random_init=True, **clip))


# --- text --------------------------------------------------------------------------------------


def test_text_embeddings_are_unit_float32_and_batched(checkpoint: Path) -> None:
    model = build(models_config(checkpoint=str(checkpoint), batch_size=2))
    calls: list[int] = []
    encode = model.network.encode_text

    def counting_encode(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(len(tokens))
        return encode(tokens)

    model.network.encode_text = counting_encode

    batched = model.encode_text(PROMPTS * 2)

    assert calls == [2, 2, 2]
    assert batched.shape == (6, 32) and batched.dtype == torch.float32
    assert torch.allclose(batched.norm(dim=-1), torch.ones(6), atol=1e-5)
    whole = F.normalize(encode(open_clip.get_tokenizer(TINY)(PROMPTS * 2)), dim=-1)
    assert torch.allclose(batched, whole, atol=1e-6)
    assert model.encode_text([]).shape == (0, 32)


# --- images: class embedding, dense embeddings -------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80), (96, 128), (32, 32)])
def test_dense_grid_follows_the_input_size_in_the_text_space(
    random_clip: OpenClipModel, height: int, width: int
) -> None:
    dense = random_clip.encode_images(images(height, width, batch=3))
    text_dim = random_clip.encode_text(PROMPTS).shape[-1]

    assert dense.image.shape == (3, text_dim)
    assert dense.patches.shape == (3, height // 16, width // 16, text_dim)
    assert dense.image.dtype == dense.patches.dtype == torch.float32
    assert torch.allclose(dense.image.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(
        dense.patches.norm(dim=-1), torch.ones(dense.patches.shape[:-1]), atol=1e-5
    )


def test_class_embedding_equals_open_clip_encode_image_at_pretraining_size(
    random_clip: OpenClipModel,
) -> None:
    pixels = images(64, 64)
    expected = random_clip.network.encode_image(
        open_clip_pixels(random_clip, pixels), normalize=True
    )
    assert torch.allclose(random_clip.encode_images(pixels).image, expected, atol=1e-6)


@pytest.mark.parametrize(("height", "width"), [(48, 80), (96, 128), (32, 32)])
def test_class_embedding_at_other_sizes_equals_open_clip_with_resized_positions(
    random_clip: OpenClipModel, height: int, width: int
) -> None:
    pixels = images(height, width)
    reference = open_clip_at_size(random_clip, height, width)
    expected = reference.encode_image(open_clip_pixels(random_clip, pixels), normalize=True)
    assert torch.allclose(random_clip.encode_images(pixels).image, expected, atol=1e-5)


@pytest.mark.parametrize("mixing", ["maskclip", "clearclip", "sclip"])
@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80)])
def test_dense_embeddings_equal_the_last_block_written_out_by_hand(
    random_clip: OpenClipModel, checkpoint: Path, mixing: str, height: int, width: int
) -> None:
    model = build(models_config(checkpoint=str(checkpoint), dense_attention=mixing))
    pixels = images(height, width)
    reference = open_clip_at_size(random_clip, height, width)
    expected = direct_dense(reference, open_clip_pixels(random_clip, pixels), mixing)

    patches = model.encode_images(pixels).patches
    assert torch.allclose(patches.flatten(1, 2), expected, atol=1e-5)


def test_token_mixing_changes_patches_only(checkpoint: Path) -> None:
    pixels = images(64, 96)
    outputs = {
        mixing: build(
            models_config(checkpoint=str(checkpoint), dense_attention=mixing)
        ).encode_images(pixels)
        for mixing in ("maskclip", "clearclip", "sclip")
    }
    for mixing in ("clearclip", "sclip"):
        assert outputs[mixing].patches.shape == outputs["maskclip"].patches.shape
        assert not torch.allclose(outputs[mixing].patches, outputs["maskclip"].patches, atol=1e-3)
        assert torch.equal(outputs[mixing].image, outputs["maskclip"].image)
    assert not torch.allclose(outputs["clearclip"].patches, outputs["sclip"].patches, atol=1e-3)


def test_images_are_batched_without_changing_results(checkpoint: Path) -> None:
    pixels = images(48, 64, batch=3)
    one_by_one = build(models_config(checkpoint=str(checkpoint), batch_size=1)).encode_images(
        pixels
    )
    together = build(models_config(checkpoint=str(checkpoint), batch_size=8)).encode_images(pixels)
    assert torch.allclose(one_by_one.patches, together.patches, atol=1e-6)
    assert torch.allclose(one_by_one.image, together.image, atol=1e-6)


def test_resized_positions_are_computed_once_per_grid(random_clip: OpenClipModel) -> None:
    first = random_clip._positional_embedding((5, 7))
    assert random_clip._positional_embedding((5, 7)) is first
    assert (
        random_clip._positional_embedding((4, 4)) is random_clip.network.visual.positional_embedding
    )


@pytest.mark.parametrize(
    "pixels",
    [
        torch.rand(1, 3, 64, 60),
        torch.rand(1, 3, 50, 64),
        torch.rand(3, 64, 64),
        torch.rand(1, 1, 64, 64),
        torch.rand(0, 3, 64, 64),
        torch.zeros(1, 3, 64, 64, dtype=torch.uint8),
    ],
    ids=["width", "height", "unbatched", "grey", "empty", "uint8"],
)
def test_images_off_the_contract_are_refused(
    random_clip: OpenClipModel, pixels: torch.Tensor
) -> None:
    with pytest.raises(ValueError):
        random_clip.encode_images(pixels)
