"""Online clustering of masks onto learnable classes: mask pooling and Sinkhorn-Knopp.

Mask pooling: the teacher's dense features are bilinearly resized to the masks' resolution and
averaged under each mask, then L2-normalised. Clustering: ``epsilon * cosine`` logits, a softmax
over classes, then SwAV's Sinkhorn-Knopp, which rescales rows (classes) and columns (masks) in
turn so every class receives an equal share of the masks; the hard assignment is its argmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """(M, K) logits of M masks over K classes -> (M, K) transport plan whose rows sum to 1 and
    whose columns each hold about M / K (exactly, in the limit of iterations).

    PixelCLIP's code: Q = softmax over classes, transposed (K x M); Q /= sum(Q); then per
    iteration rows /= row sums, /= K; columns /= column sums, /= M; finally Q *= M. In float64,
    so equal mass holds to rounding even with epsilon = 100 (logits up to +-100).
    """
    q = logits.double().softmax(dim=1).T
    q /= q.sum()
    classes, masks = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= classes
        q /= q.sum(dim=0, keepdim=True)
        q /= masks
    q *= masks
    return q.T.to(logits.dtype)


@torch.no_grad()
def assign_clusters(
    mask_embeddings: torch.Tensor, class_embeddings: torch.Tensor, epsilon: float, iterations: int
) -> torch.Tensor:
    """(M, D) unit mask embeddings, (K, D) unit class embeddings -> (M,) class per mask."""
    logits = epsilon * mask_embeddings @ class_embeddings.T
    return sinkhorn_knopp(logits, iterations).argmax(dim=1)


def pool_masks(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean feature under each mask, L2-normalised.

    ``features`` (D, h, w) of one image, bilinearly resized to the masks' (S, S); ``masks``
    (N, S, S) bool with at least one pixel each -> (N, D).
    """
    size = masks.shape[-2:]
    resized = F.interpolate(features[None], size=size, mode="bilinear", align_corners=False)[0]
    weights = masks.flatten(1).to(resized.dtype)
    sums = weights @ resized.flatten(1).T
    return F.normalize(sums / weights.sum(dim=1, keepdim=True), dim=-1)


def cluster_targets(masks: torch.Tensor, assignment: torch.Tensor, clusters: int) -> torch.Tensor:
    """(N, S, S) masks of one image and their (N,) classes -> (K, S, S) float targets: the union
    of the masks assigned to each class."""
    targets = torch.zeros(clusters, *masks.shape[-2:], dtype=torch.float32, device=masks.device)
    if len(masks):
        targets.index_add_(0, assignment, masks.to(torch.float32))
    return targets.clamp_(max=1.0)
