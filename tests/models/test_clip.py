"""The open_clip backend, on a tiny random-init configuration of the real ViT CLIP architecture.

Weights are random, so no test judges what an embedding means: they check where weights come
from, that saved weights come back exactly, shapes and norms, and that every image path equals
an independent computation from the model's own weights (open_clip's forward, or plain math).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fmbseg.config import ClipConfig, ModelsConfig, load_params
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


# Residual and MLP of each preset's last block, as its published code has them.
PUBLISHED_TAILS = {
    # chongzhou96/MaskCLIP mmseg/models/backbones/vit.py, TransformerEncoderLayer.forward with
    # return_qkv: ``v += x`` then ``v = ffn(norm2(v), identity=v)``.
    "maskclip": ("input", True),
    # wangf3014/SCLIP clip/model.py VisionTransformer.forward, last block:
    # ``x = x + custom_attn(...)`` then ``x = x + mlp(ln_2(x))``.
    "sclip": ("input", True),
    # mc-lan/ClearCLIP open_clip/transformer.py VisionTransformer.forward, ignore_residual=True
    # (its default): ``output += custom_attn(...)``, the residual and MLP left out.
    "clearclip": ("none", False),
    # sinahmr/NACLIP clip/model.py VisionTransformer.forward, arch="reduced" (naclip.py's
    # default): ``x = custom_attn(...)``.
    "naclip": ("none", False),
    # cvlab-kaist/PixelCLIP third_party/model.py forward_dense (shared/PIXELCLIP.md, section 2):
    # ``v + x_CLS`` then ``v + MLP(ln_2(v))``.
    "pixelclip": ("cls", True),
}
PRESETS = sorted(PUBLISHED_TAILS)


def naclip_omega(rows: int, cols: int, std: float) -> torch.Tensor:
    """NACLIP's attention addition, pair by pair: a Gaussian of the distance between two patch
    positions (row-major tokens after the class token), std in patches; 0 for the class token."""
    omega = torch.zeros(1 + rows * cols, 1 + rows * cols)
    for i in range(rows * cols):
        for j in range(rows * cols):
            (row_i, col_i), (row_j, col_j) = divmod(i, cols), divmod(j, cols)
            squared = (row_i - row_j) ** 2 + (col_i - col_j) ** 2
            omega[1 + i, 1 + j] = math.exp(-squared / (2 * std**2))
    return omega


def direct_dense(
    reference: torch.nn.Module,
    pixels: torch.Tensor,
    attention: str,
    residual: str,
    mlp: bool,
    std: float = 5.0,
) -> torch.Tensor:
    """Dense embeddings written out by hand from the weights, head by head.

    What the published code does, in every preset: the attention runs over all tokens, the
    class token included; logits are scaled by ``head_dim ** -0.5`` (q·q and k·k alike); each
    head's weights multiply its own values, heads are concatenated and ``out_proj`` applied;
    ``ln_post`` and ``proj`` act on every token and the class token is dropped afterwards.
    """
    visual = reference.visual
    blocks = visual.transformer.resblocks
    out = visual.forward_intermediates(
        pixels, indices=[len(blocks) - 2], output_fmt="NLC", output_extra_tokens=True
    )
    x = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], 1)
    last = blocks[-1]
    width, heads = x.shape[-1], last.attn.num_heads
    weight, bias = last.attn.in_proj_weight, last.attn.in_proj_bias
    normed = last.ln_1(x)
    q, k, v = (
        normed @ weight[i * width : (i + 1) * width].T + bias[i * width : (i + 1) * width]
        for i in range(3)
    )
    if attention in ("maskclip", "pixelclip"):
        mixed = v  # the value path: no token mixing at all
    else:
        head_width = width // heads
        scale = head_width**-0.5
        grid = (pixels.shape[-2] // 16, pixels.shape[-1] // 16)
        outputs = []
        for h in range(heads):
            cols = slice(h * head_width, (h + 1) * head_width)
            qh, kh, vh = q[..., cols], k[..., cols], v[..., cols]
            if attention == "clearclip":
                weights = torch.softmax(qh @ qh.transpose(1, 2) * scale, dim=-1)
            elif attention == "sclip":
                weights = torch.softmax(qh @ qh.transpose(1, 2) * scale, dim=-1) + torch.softmax(
                    kh @ kh.transpose(1, 2) * scale, dim=-1
                )
            else:  # naclip: k-k logits plus the neighbourhood, one softmax
                logits = kh @ kh.transpose(1, 2) * scale + naclip_omega(*grid, std)
                weights = torch.softmax(logits, dim=-1)
            outputs.append(weights @ vh)
        mixed = torch.cat(outputs, dim=-1)
    y = mixed @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    if residual == "input":
        y = y + x
    elif residual == "cls":
        y = y + x[:, :1]
    if mlp:
        assert isinstance(last.mlp.gelu, torch.nn.GELU)  # the tiny config is not QuickGELU
        hidden = F.gelu(last.ln_2(y) @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias)
        y = y + hidden @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias
    projected = visual.ln_post(y)[:, 1:] @ visual.proj
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


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80)])
def test_each_dense_preset_equals_its_published_last_block(
    random_clip: OpenClipModel, checkpoint: Path, preset: str, height: int, width: int
) -> None:
    """Random-init weights; the reference is the published block written out per head."""
    model = build(models_config(checkpoint=str(checkpoint), dense_attention=preset))
    pixels = images(height, width)
    reference = open_clip_at_size(random_clip, height, width)
    expected = direct_dense(
        reference, open_clip_pixels(random_clip, pixels), preset, *PUBLISHED_TAILS[preset]
    )

    patches = model.encode_images(pixels).patches
    assert torch.allclose(patches.flatten(1, 2), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "residual", "mlp"),
    [
        ("maskclip", "none", False),  # ClearCLIP's code, model_type="MaskCLIP"
        ("clearclip", "input", True),  # ClearCLIP's code, ignore_residual=False
        ("naclip", "input", True),  # NACLIP's code, arch="vanilla"
        ("sclip", "cls", False),
        ("pixelclip", "none", True),
    ],
)
def test_residual_and_mlp_switches_compose_with_every_token_mixing(
    random_clip: OpenClipModel, checkpoint: Path, preset: str, residual: str, mlp: bool
) -> None:
    model = build(
        models_config(
            checkpoint=str(checkpoint),
            dense_attention=preset,
            dense_residual=residual,
            dense_mlp=mlp,
        )
    )
    pixels = images(48, 80)
    reference = open_clip_at_size(random_clip, 48, 80)
    expected = direct_dense(reference, open_clip_pixels(random_clip, pixels), preset, residual, mlp)
    assert torch.allclose(model.encode_images(pixels).patches.flatten(1, 2), expected, atol=1e-5)


def test_naclip_neighbourhood_std_is_used_in_patches(
    random_clip: OpenClipModel, checkpoint: Path
) -> None:
    """A narrow neighbourhood (1 patch) on a non-square grid: rows and columns must not swap."""
    model = build(
        models_config(
            checkpoint=str(checkpoint), dense_attention="naclip", dense_neighbourhood_std=1.0
        )
    )
    pixels = images(48, 80)
    reference = open_clip_at_size(random_clip, 48, 80)
    normalised = open_clip_pixels(random_clip, pixels)
    expected = direct_dense(reference, normalised, "naclip", "none", False, std=1.0)
    patches = model.encode_images(pixels).patches.flatten(1, 2)
    assert torch.allclose(patches, expected, atol=1e-5)
    default_std = direct_dense(reference, normalised, "naclip", "none", False, std=5.0)
    assert not torch.allclose(patches, default_std, atol=1e-3)


def test_dense_presets_change_patches_only(checkpoint: Path) -> None:
    pixels = images(64, 96)
    outputs = {
        preset: build(
            models_config(checkpoint=str(checkpoint), dense_attention=preset)
        ).encode_images(pixels)
        for preset in PRESETS
    }
    for first, second in itertools.combinations(PRESETS, 2):
        assert torch.equal(outputs[first].image, outputs[second].image)
        assert not torch.allclose(outputs[first].patches, outputs[second].patches, atol=1e-3)


def test_dense_switches_default_to_the_stage_1_choice_and_refuse_unknown_values() -> None:
    clip = load_params(overrides=[]).models.clip
    assert (clip.dense_attention, clip.dense_residual, clip.dense_mlp) == (
        "clearclip",
        "auto",
        "auto",
    )
    for override in (
        "models.clip.dense_attention=gem",
        "models.clip.dense_residual=both",
        "models.clip.dense_mlp=sometimes",
        "models.clip.dense_neighbourhood_std=0",
    ):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_params(overrides=[override])


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


def test_the_encoder_backend_clip_gives_open_clips_own_patch_tokens_in_the_joint_space(
    random_clip: OpenClipModel,
) -> None:
    """Fusioner's visual input: open_clip's forward with ``output_tokens`` (every block as
    trained, ``ln_post`` on all tokens) then ``proj`` per patch, L2-normalised; <= 1e-5."""
    from fmbseg.models.clip import ClipPatchEncoder
    from fmbseg.models.registry import build_patch_encoder

    encoder = ClipPatchEncoder(random_clip)
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    got = encoder.encode(images)
    grid = (4, 6)  # 16-pixel patches
    # open_clip's own forward takes only its trained 64 x 64 input: compare there.
    square = images[:, :, :, :64]
    visual = random_clip.network.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual((square - random_clip._mean) / random_clip._std)
    finally:
        visual.output_tokens = False
    expected = torch.nn.functional.normalize(tokens @ visual.proj, dim=-1)
    ours = encoder.encode(square).reshape(2, -1, encoder.embed_dim)
    assert (ours - expected).abs().max() <= 1e-5
    assert got.shape == (2, *grid, random_clip.embed_dim)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2, *grid), atol=1e-5)
    assert encoder.provenance.role == "encoder"
    built = build_patch_encoder(
        ModelsConfig(
            clip=ClipConfig(model=TINY, pretrained=None, allow_random_init=True),
            encoder={"backend": "clip"},
            weights_dir=None,
        )
    )
    assert isinstance(built, ClipPatchEncoder) and built.patch_size == encoder.patch_size
