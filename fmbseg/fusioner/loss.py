"""Fusioner's only loss: per-pixel binary cross-entropy on each class's logits (one sigmoid per
class, no softmax across classes), unlabelled pixels left out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORED = -1
"""Target value of a pixel that is in no loss term (Stage 1 left it unlabelled)."""


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, N, H, W); targets (B, N, H, W) with 1 (the class), 0 (not it) or
    :data:`IGNORED`. Mean over each sample's valid entries, then over the samples that have
    any (the spec's per-sample ``loss / B``); 0 with a gradient when no entry is valid."""
    valid = targets != IGNORED
    per_entry = F.binary_cross_entropy_with_logits(
        logits, targets.clamp(min=0).to(logits.dtype), reduction="none"
    )
    per_entry = per_entry * valid
    counts = valid.flatten(1).sum(dim=1)
    per_sample = per_entry.flatten(1).sum(dim=1) / counts.clamp(min=1)
    used = counts > 0
    if not bool(used.any()):
        return logits.sum() * 0.0
    return per_sample[used].mean()
