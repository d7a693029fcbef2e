"""The ``open_clip`` text backend on tiny random-init configurations of real open_clip families:
a plain CLIP, and a SigLIP-style model (timm image tower, bidirectional text tower pooled at the
last token) that the ``clip`` role refuses. Embeddings must equal open_clip's own loading and
``encode_text`` of the same checkpoint file."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from fmbseg.config import ModelsConfig
from fmbseg.errors import ConfigError, WeightsError
from fmbseg.models.base import TextEncoder
from fmbseg.models.registry import build_text_encoder, build_vision_language_model

CLIP_LIKE = "fmbseg-test-text-clip"
SIGLIP_LIKE = "fmbseg-test-text-bidirectional"  # no "siglip": open_clip picks tokenizers by name
HUB_TOKENIZER = "fmbseg-test-text-hub-tokenizer"
PROMPTS = ["a photo of a cat.", "a photo of a traffic light.", "a photo of a café.", "sky"]

TEXT_CFG = {"context_length": 32, "vocab_size": 49408, "layers": 2, "width": 32, "heads": 2}
CONFIGS = {
    CLIP_LIKE: {
        "embed_dim": 24,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 16,
            "layers": 1,
            "width": 32,
            "head_width": 16,
        },
        "text_cfg": TEXT_CFG,
    },
    SIGLIP_LIKE: {
        "embed_dim": 24,
        "init_logit_bias": -10,
        "vision_cfg": {
            "image_size": 32,
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
        },
        "text_cfg": {
            **TEXT_CFG,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6},
            "act_kwargs": {"approximate": "tanh"},
        },
    },
    HUB_TOKENIZER: {
        "embed_dim": 24,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 16,
            "layers": 1,
            "width": 32,
            "head_width": 16,
        },
        "text_cfg": {**TEXT_CFG, "hf_tokenizer_name": "fmbseg-test/no-such-tokenizer"},
    },
}


@pytest.fixture(scope="module", autouse=True)
def tiny_architectures(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("open_clip_text_configs")
    for name, config in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


@pytest.fixture(autouse=True)
def no_user_weights_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FMBSEG_WEIGHTS_DIR", raising=False)


def models(weights_dir: Path | None = None, **text: object) -> ModelsConfig:
    return ModelsConfig.model_validate(
        {
            "text": {"backend": "open_clip", "pretrained": None, **text},
            "weights_dir": str(weights_dir) if weights_dir else None,
        }
    )


def write_checkpoint(name: str, path: Path, seed: int = 3) -> Path:
    """A whole-model checkpoint, as open_clip publishes them, of random-init weights."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(open_clip.create_model(name).state_dict(), str(path))
    return path


def open_clip_reference(name: str, checkpoint: Path, prompts: list[str]) -> torch.Tensor:
    """open_clip's own loading of the file and its ``encode_text(..., normalize=True)``."""
    model = open_clip.create_model(name, pretrained=str(checkpoint)).eval()
    with torch.no_grad():
        return model.encode_text(open_clip.get_tokenizer(name)(prompts), normalize=True)


@pytest.mark.parametrize("name", [CLIP_LIKE, SIGLIP_LIKE])
def test_embeddings_equal_open_clip_encode_text_of_the_same_checkpoint(
    name: str, tmp_path: Path
) -> None:
    checkpoint = write_checkpoint(name, tmp_path / f"{name}.safetensors")
    encoder = build_text_encoder(models(model=name, checkpoint=str(checkpoint), batch_size=3))
    assert isinstance(encoder, TextEncoder)
    ours = encoder.encode_text(PROMPTS)
    assert ours.shape == (4, 24) and ours.dtype == torch.float32 and encoder.embed_dim == 24
    assert torch.allclose(ours, open_clip_reference(name, checkpoint, PROMPTS), atol=1e-6)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert encoder.provenance.source == "file" and encoder.provenance.tag.startswith("sha256:")


def test_the_image_tower_is_dropped_once_loaded(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(CLIP_LIKE, tmp_path / "ckpt.safetensors")
    encoder = build_text_encoder(models(model=CLIP_LIKE, checkpoint=str(checkpoint)))
    assert not hasattr(encoder.network, "visual")
    assert encoder.encode_text([]).shape == (0, 24)


def test_a_family_the_clip_role_refuses_is_a_text_space(tmp_path: Path) -> None:
    clip_role = ModelsConfig.model_validate(
        {"clip": {"model": SIGLIP_LIKE, "pretrained": None, "allow_random_init": True}}
    )
    with pytest.raises(ConfigError, match="models.text.backend=open_clip"):
        build_vision_language_model(clip_role)
    encoder = build_text_encoder(models(model=SIGLIP_LIKE, allow_random_init=True))
    assert encoder.provenance.is_random and encoder.encode_text(PROMPTS).shape == (4, 24)


def test_a_weights_directory_is_searched_in_its_text_folder(tmp_path: Path) -> None:
    write_checkpoint(CLIP_LIKE, tmp_path / "text" / f"{CLIP_LIKE}.safetensors")
    encoder = build_text_encoder(models(tmp_path, model=CLIP_LIKE))
    assert encoder.provenance.source == "weights_dir"
    assert encoder.provenance.role == "text" and encoder.provenance.model == CLIP_LIKE


def test_random_init_is_refused_unless_allowed_naming_the_text_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"no weights for text .*text/.*models.text.checkpoint"):
        build_text_encoder(models(tmp_path, model=CLIP_LIKE))


def test_random_init_is_the_same_in_every_build() -> None:
    first, second = (
        build_text_encoder(models(model=CLIP_LIKE, allow_random_init=True)) for _ in range(2)
    )
    assert torch.equal(first.encode_text(PROMPTS), second.encode_text(PROMPTS))


def test_a_hub_tokenizer_that_cannot_be_fetched_is_a_one_line_weights_error() -> None:
    with pytest.raises(WeightsError, match=f"tokenizer of {HUB_TOKENIZER} could not be loaded"):
        build_text_encoder(models(model=HUB_TOKENIZER, allow_random_init=True))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ({}, "models.text.model: the open_clip backend needs"),
        ({"model": "no-such-architecture"}, "models.text.model: 'no-such-architecture'"),
        ({"model": CLIP_LIKE, "pretrained": "laion9b"}, "models.text.pretrained: 'laion9b'"),
        ({"model": CLIP_LIKE, "batch_size": 0}, "models.text.batch_size"),
    ],
)
def test_unusable_configurations_are_config_errors(text: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_text_encoder(models(**text))


def test_batches_do_not_change_embeddings(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(SIGLIP_LIKE, tmp_path / "ckpt.safetensors")
    one_by_one = build_text_encoder(
        models(model=SIGLIP_LIKE, checkpoint=str(checkpoint), batch_size=1)
    )
    together = build_text_encoder(models(model=SIGLIP_LIKE, checkpoint=str(checkpoint)))
    assert torch.allclose(one_by_one.encode_text(PROMPTS), together.encode_text(PROMPTS), atol=1e-6)
