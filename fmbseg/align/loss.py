"""Stage 2 losses: the FMbSeg patch–text/patch–patch loss and its two ablation alternatives.

All three share one signature so the training loop can pick one by name:
``loss(patch_embeddings (P, D), labels (P,), text_embeddings (K, D), temperature, ignore_index)``.
Embeddings arrive L2-normalised; similarities are plain dot products divided by the temperature.
Patches labelled ``ignore_index`` are dropped before anything is computed, so they appear in no
numerator and no denominator. Every loss works in at least float32 (half-precision inputs are
upcast) and uses log-sum-exp, so a temperature of 0.01 cannot overflow ``exp``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]


def _prepare(
    patch_embeddings: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, upcast to >= float32 and keep only labelled patches: ``(z, y, t)``."""
    if patch_embeddings.ndim != 2:
        raise ValueError(
            f"patch_embeddings must be (P, D), got shape {tuple(patch_embeddings.shape)}"
        )
    if text_embeddings.ndim != 2:
        raise ValueError(
            f"text_embeddings must be (K, D), got shape {tuple(text_embeddings.shape)}"
        )
    if labels.ndim != 1:
        raise ValueError(f"labels must be (P,), got shape {tuple(labels.shape)}")
    if not (patch_embeddings.is_floating_point() and text_embeddings.is_floating_point()):
        raise ValueError(
            "patch_embeddings and text_embeddings must be floating point, got "
            f"{patch_embeddings.dtype} and {text_embeddings.dtype}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    num_patches, dim = patch_embeddings.shape
    num_classes, text_dim = text_embeddings.shape
    if labels.shape[0] != num_patches:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but patch_embeddings has {num_patches} patches"
        )
    if text_dim != dim:
        raise ValueError(
            f"embedding dimensions differ: patches have D={dim}, text embeddings D={text_dim}"
        )
    if num_classes == 0:
        raise ValueError("text_embeddings is empty: at least one class is needed")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")

    labels = labels.to(device=patch_embeddings.device, dtype=torch.long)
    labelled = labels != ignore_index
    out_of_range = labelled & ((labels < 0) | (labels >= num_classes))
    if bool(out_of_range.any()):
        bad = sorted(set(labels[out_of_range].tolist()))[:5]
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"found {bad}"
        )

    dtype = torch.promote_types(
        torch.promote_types(patch_embeddings.dtype, text_embeddings.dtype), torch.float32
    )
    z = patch_embeddings.to(dtype)[labelled]
    t = text_embeddings.to(device=patch_embeddings.device, dtype=dtype)
    return z, labels[labelled], t


def _connected_zero(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An exact 0 that keeps a grad_fn, so ``loss.backward()`` works on an empty batch."""
    return z[:0].sum() + t[:0].sum()


def _positive_logit_sums(z: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``sum_{p != i, y_p = y_i} z_i . z_p`` per patch, via class sums instead of a P x P mask."""
    class_sums = z.new_zeros(num_classes, z.shape[1]).index_add(0, y, z)
    return (z * (class_sums[y] - z)).sum(dim=1)


def _mean_over_positive_patches(
    positive_log_prob_sums: torch.Tensor, num_positives: torch.Tensor
) -> torch.Tensor:
    """L_patch averaging: mean over positives per patch, then over patches having any; else 0."""
    has_positive = num_positives > 0
    per_patch = torch.where(
        has_positive,
        positive_log_prob_sums / num_positives.clamp(min=1),
        torch.zeros_like(positive_log_prob_sums),
    )
    return -per_patch.sum() / has_positive.sum().clamp(min=1)


def fmbseg_loss(
    patch_embeddings: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    temperature: float,
    ignore_index: int = -1,
) -> torch.Tensor:
    """FMbSeg loss: mean over present classes of L_text plus mean over patches of L_patch.

    Both terms share, for patch ``i``, the denominator ``D_i`` over every other labelled patch
    and every text embedding, which is what makes the sum a smooth maximum of SupCon and
    prototype cross-entropy (METHOD.md, Stage 2).
    """
    z, y, t = _prepare(patch_embeddings, labels, text_embeddings, temperature, ignore_index)
    num_labelled, num_classes = z.shape[0], t.shape[0]
    if num_labelled == 0:
        return _connected_zero(z, t)

    # Row i holds z_i.z_j / tau for all labelled j (self masked out), then z_i.t_k / tau for all k.
    # Scale the (P, D) side rather than the (P, P + K) product, and mask self-pairs in place.
    logits = (z / temperature) @ torch.cat([z, t]).T
    logits.diagonal().fill_(-math.inf)
    log_denominator = torch.logsumexp(logits, dim=1)

    counts = torch.bincount(y, minlength=num_classes)
    text_log_prob = logits[:, num_labelled:].gather(1, y[:, None]).squeeze(1) - log_denominator
    present_classes = (counts > 0).sum()
    text_term = -(text_log_prob / counts[y]).sum() / present_classes

    num_positives = counts[y] - 1
    positive_log_prob_sums = (
        _positive_logit_sums(z, y, num_classes) / temperature - num_positives * log_denominator
    )
    patch_term = _mean_over_positive_patches(positive_log_prob_sums, num_positives)
    return text_term + patch_term


def prototype_cross_entropy_loss(
    patch_embeddings: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    temperature: float,
    ignore_index: int = -1,
) -> torch.Tensor:
    """Ablation: each labelled patch classified against the K text prototypes, mean over patches."""
    z, y, t = _prepare(patch_embeddings, labels, text_embeddings, temperature, ignore_index)
    if z.shape[0] == 0:
        return _connected_zero(z, t)
    return F.cross_entropy((z @ t.T) / temperature, y)


def supcon_loss(
    patch_embeddings: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    temperature: float,
    ignore_index: int = -1,
) -> torch.Tensor:
    """Ablation: patch-patch supervised contrastive loss only; text embeddings are unused.

    Averaged as HobbitLong/SupContrast's ``SupConLoss`` does (losses.py): every labelled patch
    is an anchor, and one without a positive counts in the mean with a loss of 0 (its positive
    count is replaced by 1 over an all-zero mask). Its ``temperature / base_temperature`` factor
    (1 at its defaults) is left out. ``text_embeddings`` is still required (and validated) so
    all losses are interchangeable.
    """
    z, y, t = _prepare(patch_embeddings, labels, text_embeddings, temperature, ignore_index)
    num_labelled = z.shape[0]
    if num_labelled < 2:  # nobody has a positive, and a lone patch has an empty denominator
        return _connected_zero(z, t)

    logits = (z / temperature) @ z.T
    logits.diagonal().fill_(-math.inf)
    log_denominator = torch.logsumexp(logits, dim=1)

    num_positives = torch.bincount(y, minlength=t.shape[0])[y] - 1
    positive_log_prob_sums = (
        _positive_logit_sums(z, y, t.shape[0]) / temperature - num_positives * log_denominator
    )
    return -(positive_log_prob_sums / num_positives.clamp(min=1)).sum() / num_labelled


LOSSES: dict[str, LossFn] = {
    "fmbseg": fmbseg_loss,
    "cross_entropy": prototype_cross_entropy_loss,
    "supcon": supcon_loss,
}


def get_loss(name: str) -> LossFn:
    """The loss registered under ``name`` (as a config would spell it)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}"
        ) from None
