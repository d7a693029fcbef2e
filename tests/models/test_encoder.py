"""The timm patch encoder, on tiny random-init configurations of the real DINOv2 models.

``overrides`` shrink depth and width; everything else (patch size 14, class and register
tokens, layer scale, SwiGLU in the giant model, ImageNet statistics) is the real architecture.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fmbseg.config import EncoderConfig, ModelsConfig
from fmbseg.errors import ConfigError, WeightsError
from fmbseg.models.base import PatchEncoder
from fmbseg.models.encoder import TimmPatchEncoder, build
from fmbseg.models.registry import build_patch_encoder

SMALL = "vit_small_patch14_dinov2.lvd142m"
SMALL_REG = "vit_small_patch14_reg4_dinov2.lvd142m"
DINOV2 = [
    f"vit_{size}_patch14{reg}_dinov2.lvd142m"
    for size in ("small", "base", "large", "giant")
    for reg in ("", "_reg4")
]
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def models_config(
    model: str = SMALL, weights_dir: Path | None = None, **encoder: object
) -> ModelsConfig:
    return ModelsConfig(
        encoder=EncoderConfig(model=model, overrides=TINY, **encoder),  # type: ignore[arg-type]
        weights_dir=str(weights_dir) if weights_dir else None,
    )


def random_encoder(model: str = SMALL, seed: int = 0) -> TimmPatchEncoder:
    torch.manual_seed(seed)
    return build(models_config(model, allow_random_init=True))


def images(height: int, width: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def save_weights(encoder: TimmPatchEncoder, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = encoder.model.state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("model", DINOV2)
def test_patch_grid_for_any_multiple_of_the_patch_size(model: str) -> None:
    encoder = random_encoder(model)
    assert isinstance(encoder, PatchEncoder)
    assert encoder.patch_size == 14 and encoder.embed_dim == TINY["embed_dim"]
    for height, width in [(14, 14), (28, 42), (70, 28)]:
        grid = encoder.encode(images(height, width))
        assert grid.shape == (2, height // 14, width // 14, TINY["embed_dim"])
        assert grid.dtype == torch.float32 and torch.isfinite(grid).all()


@pytest.mark.parametrize(("model", "prefix_tokens"), [(SMALL, 1), (SMALL_REG, 5)])
def test_class_and_register_tokens_are_dropped(model: str, prefix_tokens: int) -> None:
    encoder = random_encoder(model)
    batch = images(42, 28)
    with torch.no_grad():
        tokens = encoder.model.forward_features((batch - IMAGENET_MEAN) / IMAGENET_STD)
    assert encoder.model.num_prefix_tokens == prefix_tokens
    assert tokens.shape[1] == prefix_tokens + 3 * 2

    grid = encoder.encode(batch)

    assert torch.equal(grid.reshape(2, 6, -1), tokens[:, prefix_tokens:])
    assert not torch.allclose(grid.reshape(2, 6, -1), tokens[:, :6])
    # Row-major: grid[:, i, j] is the patch in row i, column j.
    assert torch.equal(grid[:, 1, 0], tokens[:, prefix_tokens + 2])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_checkpoint_and_weights_dir_give_identical_outputs(suffix: str, tmp_path: Path) -> None:
    saved = random_encoder(SMALL_REG, seed=3)
    checkpoint = save_weights(saved, tmp_path / f"saved{suffix}")
    weights = tmp_path / "weights"
    save_weights(saved, weights / "encoder" / f"{SMALL_REG}{suffix}")

    from_file = build(models_config(SMALL_REG, checkpoint=str(checkpoint)))
    from_dir = build(models_config(SMALL_REG, weights_dir=weights))

    assert from_file.provenance.source == "file" and from_dir.provenance.source == "weights_dir"
    assert from_file.provenance.sha256 is not None and not from_dir.provenance.is_random
    batch = images(28, 56)
    expected = saved.encode(batch)
    assert torch.equal(from_file.encode(batch), expected)
    assert torch.equal(from_dir.encode(batch), expected)
    assert not torch.allclose(random_encoder(SMALL_REG, seed=4).encode(batch), expected)


def test_random_init_is_refused_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as refused:
        build(models_config(weights_dir=tmp_path))
    message = str(refused.value)
    assert f"place {SMALL}.safetensors" in message and f"in {tmp_path / 'encoder'}/" in message
    assert f"https://huggingface.co/timm/{SMALL}" in message
    assert "models.encoder.allow_random_init=true" in message

    encoder = build(models_config(weights_dir=tmp_path, allow_random_init=True))
    assert encoder.provenance.is_random and encoder.provenance.model == SMALL


@pytest.mark.parametrize("switch", ["FMBSEG_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_fails_fast(switch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FMBSEG_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(switch, "1")
    giant = "vit_giant_patch14_reg4_dinov2.lvd142m"
    started = time.monotonic()
    with pytest.raises(WeightsError, match=rf"{giant}.*download skipped: {switch} is set"):
        build(ModelsConfig(encoder=EncoderConfig(model=giant), weights_dir=str(tmp_path)))
    assert time.monotonic() - started < 5


def test_checkpoint_of_another_architecture_is_a_one_line_error(tmp_path: Path) -> None:
    with_registers = save_weights(random_encoder(SMALL_REG), tmp_path / "reg4.safetensors")
    with pytest.raises(WeightsError) as wrong:
        build(models_config(SMALL, checkpoint=str(with_registers)))
    message = str(wrong.value)
    assert "\n" not in message
    assert str(with_registers) in message and f"not a checkpoint of timm {SMALL}" in message
    assert "1 unexpected" in message  # the register tokens

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(
        WeightsError, match=r"garbage\.safetensors: not readable as a weights-only checkpoint"
    ):
        build(models_config(checkpoint=str(garbage)))


def test_input_that_is_not_a_multiple_of_the_patch_size_is_refused() -> None:
    encoder = random_encoder()
    with pytest.raises(ValueError, match=r"30x28: .*multiples of the patch size 14"):
        encoder.encode(images(30, 28))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder.encode(torch.rand(3, 28, 28))


def test_configuration_mistakes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown timm model 'vit_nope'"):
        build(ModelsConfig(encoder=EncoderConfig(model="vit_nope", allow_random_init=True)))
    with pytest.raises(ConfigError, match=r"models\.encoder\.overrides: .*depthh"):
        build(ModelsConfig(encoder=EncoderConfig(overrides={"depthh": 2}, allow_random_init=True)))
    with pytest.raises(ConfigError, match="'pretrained' is decided by the weight resolver"):
        build(
            ModelsConfig(
                encoder=EncoderConfig(overrides={"pretrained": True}, allow_random_init=True)
            )
        )


def test_registry_builds_the_backend() -> None:
    assert isinstance(build_patch_encoder(models_config(allow_random_init=True)), TimmPatchEncoder)


@pytest.fixture
def fake_hub(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A minimal Hugging Face hub on 127.0.0.1: ``/<repo>/resolve/main/<file>`` and nothing else."""
    root = tmp_path / "hub"

    class Hub(http.server.BaseHTTPRequestHandler):
        def _headers(self) -> Path | None:
            path = root / self.path.lstrip("/")
            if "/resolve/main/" not in self.path or not path.is_file():
                self.send_response(404)
                self.end_headers()
                return None
            self.send_response(200)
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("ETag", f'"{path.stat().st_size}-{path.stat().st_mtime_ns}"')
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            return path

        def do_HEAD(self) -> None:
            self._headers()

        def do_GET(self) -> None:
            if (path := self._headers()) is not None:
                self.wfile.write(path.read_bytes())

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


DOWNLOAD_SCRIPT = """
import dataclasses, json, sys
import fmbseg, torch
from fmbseg.config import EncoderConfig, ModelsConfig
from fmbseg.models.encoder import build
model, overrides, weights_dir, batch, out = sys.argv[1:]
encoder = build(ModelsConfig(
    encoder=EncoderConfig(model=model, overrides=json.loads(overrides)), weights_dir=weights_dir
))
torch.save(encoder.encode(torch.load(batch)), out)
print(json.dumps(dataclasses.asdict(encoder.provenance)))
"""


def test_standard_download_is_the_timm_hub_file(fake_hub: tuple[Path, str], tmp_path: Path) -> None:
    # A separate process: huggingface_hub reads HF_ENDPOINT and its offline switch at import.
    root, endpoint = fake_hub
    saved = random_encoder(SMALL_REG, seed=5)
    save_weights(saved, root / f"timm/{SMALL_REG}/resolve/main/model.safetensors")
    batch = images(28, 42)
    torch.save(batch, tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("FMBSEG_OFFLINE", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))

    run = subprocess.run(
        [
            sys.executable,
            "-c",
            DOWNLOAD_SCRIPT,
            SMALL_REG,
            json.dumps(TINY),
            str(tmp_path / "weights"),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "out.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    provenance = json.loads(run.stdout.splitlines()[-1])
    assert provenance["source"] == "download"
    assert provenance["path"].startswith(str(tmp_path / "hf"))
    assert provenance["path"].endswith("model.safetensors")
    assert torch.equal(torch.load(tmp_path / "out.pt"), saved.encode(batch))
