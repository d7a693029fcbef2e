"""Specification of the alignment module (fmbseg.align.module): transformer block(s) over the
patches of one image, projected into text space and normalised; saved as safetensors + JSON,
and refused with a WeightsError when the file holds another architecture."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fmbseg.align.module import (
    AlignmentModule,
    ModuleSpec,
    architecture_path,
    load_module,
    save_module,
)
from fmbseg.errors import WeightsError


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids OpenMP synchronisation dominating on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def module(depth: int = 1, heads: int = 4) -> AlignmentModule:
    torch.manual_seed(0)
    return AlignmentModule(in_dim=32, text_dim=16, depth=depth, heads=heads, mlp_ratio=2.0).eval()


@pytest.mark.parametrize("shape", [(3, 12, 32), (3, 3, 4, 32), (1, 1, 32)])
def test_output_keeps_leading_shape_and_has_text_dim_unit_vectors(shape: tuple[int, ...]) -> None:
    out = module()(torch.randn(shape))
    assert out.shape == (*shape[:-1], 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(shape[:-1]), atol=1e-6)


def test_half_precision_features_are_accepted() -> None:
    features = torch.randn(2, 5, 32)
    net = module()
    assert torch.allclose(net(features.half()), net(features.half().float()))


def test_grid_and_flat_patches_give_the_same_embeddings() -> None:
    net, grid = module(), torch.randn(2, 3, 4, 32)
    assert torch.equal(net(grid).reshape(2, 12, 16), net(grid.reshape(2, 12, 32)))


def test_attention_mixes_patches_of_one_image_but_never_across_images() -> None:
    net = module(depth=2)
    batch = torch.randn(2, 9, 32)
    changed = batch.clone()
    changed[1] = torch.randn(9, 32)  # a different second image
    assert torch.equal(net(batch)[0], net(changed)[0])
    assert torch.equal(net(batch[:1])[0], net(batch)[0])  # alone or in a batch: the same
    within = batch.clone()
    within[0, 5] = torch.randn(32)  # one other patch of the first image
    assert (net(within)[0, 0] - net(batch)[0, 0]).abs().max() > 1e-3


def test_wrong_feature_dimension_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"expected features shaped \(B, N, 32\)"):
        module()(torch.randn(2, 5, 31))


def test_heads_must_divide_the_feature_dimension() -> None:
    with pytest.raises(ValueError, match="in_dim=32 is not divisible by heads=5"):
        AlignmentModule(32, 16, heads=5)


def test_save_load_round_trip(tmp_path: Path) -> None:
    net = module(depth=2)
    path = tmp_path / "module.safetensors"
    save_module(
        net,
        path,
        encoder="vit_small_patch14_dinov2",
        text_embeddings="text.safetensors",
        vocabulary=("cat", "sky"),
    )
    record = json.loads(architecture_path(path).read_text(encoding="utf-8"))
    assert record["architecture"] == {
        "in_dim": 32,
        "text_dim": 16,
        "depth": 2,
        "heads": 4,
        "mlp_ratio": 2.0,
    }
    loaded, info = load_module(path, expected=ModuleSpec(32, 16, 2, 4, 2.0))
    assert (info.encoder, info.text_embeddings, info.vocabulary) == (
        "vit_small_patch14_dinov2",
        "text.safetensors",
        ("cat", "sky"),
    )
    features = torch.randn(2, 6, 32)
    assert torch.equal(loaded.eval()(features), net(features))


def test_expected_architecture_mismatch_names_file_and_expected_architecture(
    tmp_path: Path,
) -> None:
    path = tmp_path / "module.safetensors"
    save_module(module(), path, encoder="e")
    with pytest.raises(WeightsError) as caught:
        load_module(path, expected=ModuleSpec(32, 16, depth=1, heads=8, mlp_ratio=2.0))
    message = str(caught.value)
    assert str(path) in message and "expected (in_dim=32, text_dim=16, depth=1, heads=8" in message


def test_json_that_does_not_describe_the_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.safetensors"
    save_module(module(), path, encoder="e")
    record = json.loads(architecture_path(path).read_text(encoding="utf-8"))
    record["architecture"]["depth"] = 2
    architecture_path(path).write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(
        WeightsError,
        match=r"module\.safetensors: tensors do not fit the expected architecture \(in_dim=32, text_dim=16, depth=2",
    ):
        load_module(path)


def test_changed_weights_and_missing_json_are_weights_errors(tmp_path: Path) -> None:
    path = tmp_path / "module.safetensors"
    save_module(module(), path, encoder="e")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 differs"):
        load_module(path)
    architecture_path(path).unlink()
    with pytest.raises(WeightsError, match=r"module\.json: architecture file .* not found"):
        load_module(path)
