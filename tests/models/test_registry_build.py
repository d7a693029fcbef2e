"""Backends are built by name; random-init weights are the same in every build."""

from __future__ import annotations

import pytest
import torch

from fmbseg.config import load_params
from fmbseg.errors import ConfigError
from fmbseg.models.registry import available_backends, build_patch_encoder, register_backend


def test_unknown_backend_lists_the_known_ones() -> None:
    params = load_params(None, ["models.encoder.backend=dinov9"])
    with pytest.raises(
        ConfigError,
        match=r"models.encoder.backend: unknown backend 'dinov9' \(known: clip, oracle, timm\)",
    ):
        build_patch_encoder(params.models)


def test_registered_factory_is_built_under_a_fixed_seed_without_touching_the_callers_rng() -> None:
    register_backend("encoder", "seeded-test", lambda models: torch.rand(3))
    assert "seeded-test" in available_backends("encoder")
    params = load_params(None, ["models.encoder.backend=seeded-test"])
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_patch_encoder(params.models)
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(first, build_patch_encoder(params.models))
