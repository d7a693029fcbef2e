"""PixelCLIP's online clustering and head, against plain-loop recomputations of the spec."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fmbseg.pixelclip.cluster import (
    assign_clusters,
    cluster_targets,
    pool_masks,
    sinkhorn_knopp,
)
from fmbseg.pixelclip.head import ConvHead


def sinkhorn_plain_loop(logits: list[list[float]], iterations: int) -> list[list[float]]:
    """PixelCLIP's Sinkhorn-Knopp written out element by element (SwAV's, 3 iterations)."""
    masks, classes = len(logits), len(logits[0])
    q = []  # K x M: softmax over classes, transposed
    for m in range(masks):
        top = max(logits[m])
        exps = [math.exp(value - top) for value in logits[m]]
        q.append([e / sum(exps) for e in exps])
    q = [[q[m][k] for m in range(masks)] for k in range(classes)]
    total = sum(sum(row) for row in q)
    q = [[value / total for value in row] for row in q]
    for _ in range(iterations):
        for k in range(classes):
            row_sum = sum(q[k])
            q[k] = [value / row_sum / classes for value in q[k]]
        for m in range(masks):
            column_sum = sum(q[k][m] for k in range(classes))
            for k in range(classes):
                q[k][m] = q[k][m] / column_sum / masks
    return [[q[k][m] * masks for k in range(classes)] for m in range(masks)]  # M x K


def _logits(masks: int, classes: int, epsilon: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask_embeddings = F.normalize(torch.randn(masks, 16, generator=generator), dim=-1)
    class_embeddings = F.normalize(torch.randn(classes, 16, generator=generator), dim=-1)
    return epsilon * mask_embeddings @ class_embeddings.T


@pytest.mark.parametrize("epsilon", [1.0, 100.0])
def test_sinkhorn_equals_the_plain_loop_of_the_spec(epsilon: float) -> None:
    logits = _logits(40, 8, epsilon)
    ours = sinkhorn_knopp(logits, iterations=3)
    reference = torch.tensor(sinkhorn_plain_loop(logits.tolist(), 3))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    # Each mask's row is a distribution over classes.
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(40), rtol=0, atol=1e-5)


def test_sinkhorn_gives_every_cluster_equal_mass() -> None:
    logits = _logits(48, 6, epsilon=1.0)  # unbalanced on purpose: classes differ in affinity
    logits[:, 0] += 2.0
    before = logits.softmax(dim=1).sum(dim=0)
    plan = sinkhorn_knopp(logits, iterations=50)
    assert before.max() - before.min() > 5  # the softmax alone is far from equal mass
    torch.testing.assert_close(plan.sum(dim=0), torch.full((6,), 48 / 6), rtol=0, atol=1e-4)


def test_balanced_assignment_spreads_masks_that_all_prefer_one_cluster() -> None:
    generator = torch.Generator().manual_seed(1)
    classes = torch.eye(4, 8)
    masks = F.normalize(classes[0] + 0.3 * torch.randn(64, 8, generator=generator), dim=-1)
    greedy = torch.bincount((masks @ classes.T).argmax(dim=1), minlength=4)
    balanced = torch.bincount(assign_clusters(masks, classes, 1.0, 3), minlength=4)
    assert greedy[0] >= 60  # nearly every mask is closest to class 0
    assert balanced.min() >= 8  # equal mass: every class takes a share


def test_mask_pooling_is_the_normalised_mean_of_resized_features() -> None:
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(5, 4, 4, generator=generator)
    masks = torch.rand(3, 8, 8, generator=generator) > 0.5
    pooled = pool_masks(features, masks)
    resized = F.interpolate(features[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    for n in range(3):
        mean = torch.stack(
            [resized[:, y, x] for y in range(8) for x in range(8) if masks[n, y, x]]
        ).mean(dim=0)
        torch.testing.assert_close(pooled[n], mean / mean.norm(), rtol=1e-5, atol=1e-6)


def test_targets_are_the_union_of_each_clusters_masks() -> None:
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[1, 1:3] = True  # overlaps mask 0 in row 1
    masks[2, 3] = True
    targets = cluster_targets(masks, torch.tensor([2, 2, 0]), clusters=4)
    assert targets.shape == (4, 4, 4)
    assert torch.equal(targets[2], (masks[0] | masks[1]).float())
    assert torch.equal(targets[0], masks[2].float())
    assert targets[1].sum() == 0 and targets[3].sum() == 0


def test_conv_head_upsamples_each_map_four_times_with_the_specs_layers() -> None:
    head = ConvHead()
    assert head(torch.randn(6, 1, 5, 7)).shape == (6, 1, 20, 28)
    kinds = [type(layer).__name__ for layer in head.layers]
    assert kinds == [
        "Conv2d", "ConvTranspose2d",
        "Conv2d", "GroupNorm", "ReLU", "Conv2d", "GroupNorm", "ReLU",
        "ConvTranspose2d",
        "Conv2d", "GroupNorm", "ReLU", "Conv2d", "GroupNorm", "ReLU",
        "Conv2d",
    ]  # fmt: skip
    groups = [layer.num_groups for layer in head.layers if isinstance(layer, torch.nn.GroupNorm)]
    assert groups == [4, 4, 2, 2]
