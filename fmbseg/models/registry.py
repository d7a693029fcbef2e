"""Backends by role and name, so a stage builds whatever the config names.

Built-in backends are registered by import path and imported only when built; others
(SigLIP, MobileSAM, SAM 2, test fakes) register a factory with :func:`register_backend`.
A factory takes the whole :class:`ModelsConfig` and reads its own section.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fmbseg.errors import ConfigError

if TYPE_CHECKING:
    from fmbseg.config import ModelsConfig
    from fmbseg.models.base import (
        PatchEncoder,
        PromptableSegmenter,
        TextEncoder,
        TextPromptedSegmenter,
        VisionLanguageModel,
    )

Factory = Callable[["ModelsConfig"], Any]

ROLES = ("clip", "sam", "encoder", "text", "sam3")

_registry: dict[str, dict[str, Factory | str]] = {
    "clip": {"open_clip": "fmbseg.models.clip:build", "oracle": "fmbseg.oracle.fakes:build_clip"},
    "sam": {
        "segment_anything": "fmbseg.models.sam:build",
        "sam2": "fmbseg.models.sam2:build",
        "oracle": "fmbseg.oracle.fakes:build_sam",
    },
    "encoder": {
        "timm": "fmbseg.models.encoder:build",
        # the patch tokens of models.clip (Fusioner's CLIP visual input)
        "clip": "fmbseg.models.clip:build_patch_encoder",
        "oracle": "fmbseg.oracle.fakes:build_encoder",
    },
    # "clip": the text tower of whatever ``models.clip`` builds (the paper's setting).
    "text": {
        "clip": "fmbseg.models.registry:build_vision_language_model",
        "transformers": "fmbseg.models.text_transformers:build",
        "open_clip": "fmbseg.models.text_open_clip:build",
    },
    "sam3": {"transformers": "fmbseg.models.sam3:build"},
}


def register_backend(role: str, name: str, factory: Factory) -> None:
    if role not in _registry:
        raise ValueError(f"unknown model role {role!r}; roles: {', '.join(ROLES)}")
    _registry[role][name] = factory


def available_backends(role: str) -> list[str]:
    return sorted(_registry[role])


def _factory(role: str, name: str) -> Factory:
    entry = _registry[role].get(name)
    if entry is None:
        known = ", ".join(available_backends(role))
        raise ConfigError(f"models.{role}.backend: unknown backend {name!r} (known: {known})")
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = getattr(importlib.import_module(module), attribute)
        _registry[role][name] = entry
    return entry


RANDOM_INIT_SEED = 0


def _build(role: str, name: str, models: ModelsConfig) -> Any:
    """Build under a fixed torch seed, so random-init weights are the same in every run
    (and a pipeline of random-init models stays reproducible) without touching the caller's RNG."""
    import torch

    factory = _factory(role, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return factory(models)


def build_vision_language_model(models: ModelsConfig) -> VisionLanguageModel:
    return _build("clip", models.clip.backend, models)


def build_segmenter(models: ModelsConfig) -> PromptableSegmenter:
    return _build("sam", models.sam.backend, models)


def build_patch_encoder(models: ModelsConfig) -> PatchEncoder:
    return _build("encoder", models.encoder.backend, models)


def build_text_prompted_segmenter(models: ModelsConfig) -> TextPromptedSegmenter:
    """SAM 3 (``models.sam3``): Stage 1's text-prompted route."""
    return _build("sam3", models.sam3.backend, models)


def build_text_encoder(models: ModelsConfig) -> TextEncoder:
    """The text space Stage 2 maps into (default: the text tower of ``models.clip``)."""
    return _build("text", models.text.backend, models)
