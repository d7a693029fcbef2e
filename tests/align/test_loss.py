"""Specification of the Stage 2 losses (METHOD.md, "Stage 2 – the alignment module and its loss").

Each vectorised loss is checked against a per-term loop written straight from the equations,
then against the properties a training loop relies on: ignored patches, empty batches,
stability at small temperatures, permutation invariance, correct gradients.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from fmbseg.align.loss import (
    LOSSES,
    fmbseg_loss,
    get_loss,
    prototype_cross_entropy_loss,
    supcon_loss,
)

IGNORE = -1


# --- references: one Python term at a time, float64, straight from the equations -------------


def _dot(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


def _unpack(z: torch.Tensor, y: torch.Tensor, t: torch.Tensor, ignore_index: int):
    """Labelled patches only (unlabelled ones are left out entirely), as float64 lists."""
    zs = z.double().tolist()
    ys = y.tolist()
    kept = [i for i in range(len(ys)) if ys[i] != ignore_index]
    return [zs[i] for i in kept], [ys[i] for i in kept], t.double().tolist()


def reference_fmbseg(z, y, t, tau, ignore_index=IGNORE) -> float:
    z, y, t = _unpack(z, y, t, ignore_index)
    labelled = range(len(y))
    if not y:
        return 0.0

    def log_d(i: int) -> float:  # D_i = sum_{j != i} exp(z_i.z_j/tau) + sum_k' exp(z_i.t_k'/tau)
        patch_part = [math.exp(_dot(z[i], z[j]) / tau) for j in labelled if j != i]
        text_part = [math.exp(_dot(z[i], t_k) / tau) for t_k in t]
        return math.log(math.fsum(patch_part + text_part))

    classes = sorted(set(y))
    l_text = []
    for k in classes:  # L_text(k) = -(1/|P_k|) sum_{i: y_i=k} log(exp(z_i.t_k/tau) / D_i)
        members = [i for i in labelled if y[i] == k]
        l_text.append(-sum(_dot(z[i], t[k]) / tau - log_d(i) for i in members) / len(members))

    l_patch = []
    for i in labelled:  # L_patch(i) = -(1/|P(i)|) sum_{p in P(i)} log(exp(z_i.z_p/tau) / D_i)
        positives = [p for p in labelled if p != i and y[p] == y[i]]
        if positives:
            l_patch.append(
                -sum(_dot(z[i], z[p]) / tau - log_d(i) for p in positives) / len(positives)
            )

    patch_term = sum(l_patch) / len(l_patch) if l_patch else 0.0
    return sum(l_text) / len(classes) + patch_term


def reference_cross_entropy(z, y, t, tau, ignore_index=IGNORE) -> float:
    z, y, t = _unpack(z, y, t, ignore_index)
    if not y:
        return 0.0
    terms = []
    for i in range(len(y)):
        log_norm = math.log(math.fsum(math.exp(_dot(z[i], t_k) / tau) for t_k in t))
        terms.append(-(_dot(z[i], t[y[i]]) / tau - log_norm))
    return sum(terms) / len(terms)


def reference_supcon(z, y, t, tau, ignore_index=IGNORE) -> float:
    """SupContrast's averaging: every labelled patch is an anchor; one without a positive adds 0."""
    z, y, _ = _unpack(z, y, t, ignore_index)
    labelled = range(len(y))
    if len(y) < 2:
        return 0.0
    terms = []
    for i in labelled:
        positives = [p for p in labelled if p != i and y[p] == y[i]]
        if not positives:
            terms.append(0.0)
            continue
        log_d = math.log(math.fsum(math.exp(_dot(z[i], z[j]) / tau) for j in labelled if j != i))
        terms.append(-sum(_dot(z[i], z[p]) / tau - log_d for p in positives) / len(positives))
    return sum(terms) / len(terms)


REFERENCES = {
    "fmbseg": reference_fmbseg,
    "cross_entropy": reference_cross_entropy,
    "supcon": reference_supcon,
}


# --- inputs ----------------------------------------------------------------------------------


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def random_inputs(labels: list[int], num_classes: int, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = unit(torch.randn(len(labels), dim, generator=gen))
    t = unit(torch.randn(num_classes, dim, generator=gen))
    return z, torch.tensor(labels, dtype=torch.long), t


def random_labels(num_patches: int, num_classes: int, seed: int, ignored: float = 0.0):
    gen = torch.Generator().manual_seed(seed + 1000)
    y = torch.randint(0, num_classes, (num_patches,), generator=gen)
    y[torch.rand(num_patches, generator=gen) < ignored] = IGNORE
    return y.tolist()


SCENARIOS = {
    # class 3 has a single patch (no L_patch term); class 4 is in the vocabulary but absent
    "single_patch_class_and_absent_class": ([0, 0, 1, 1, 1, 2, 2, 3, 0, 1], 5),
    "ignored_patches": ([IGNORE, 0, 1, IGNORE, 1, 0, 2, IGNORE, 2, 2, IGNORE], 3),
    "all_one_class": ([2] * 9, 4),
    "every_patch_its_own_class": ([0, 1, 2, 3], 6),  # nobody has a positive: patch term is 0
    "one_labelled_patch": ([IGNORE, IGNORE, 1, IGNORE], 3),
    "random_with_ignored": (random_labels(30, 7, seed=3, ignored=0.3), 7),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_matches_per_term_reference(name: str, scenario: str, seed: int, tau: float) -> None:
    labels, num_classes = SCENARIOS[scenario]
    z, y, t = random_inputs(labels, num_classes, seed=seed)
    expected = REFERENCES[name](z, y, t, tau)
    got = get_loss(name)(z, y, t, tau, ignore_index=IGNORE)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float64_inputs_are_computed_in_float64(name: str) -> None:
    labels, num_classes = SCENARIOS["random_with_ignored"]
    z, y, t = random_inputs(labels, num_classes, seed=5)
    z, t = z.double(), t.double()
    got = get_loss(name)(z, y, t, 0.1)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(REFERENCES[name](z, y, t, 0.1), rel=1e-12, abs=1e-12)


def test_supcon_anchors_without_a_positive_count_as_zero_in_the_mean() -> None:
    """Patches 0 and 1 share a class, patch 2 is alone: the mean is over 3 anchors, not 2."""
    z, y, t = random_inputs([0, 0, 1], num_classes=2, seed=3)
    tau = 0.2
    z64 = z.double()
    pair_terms = []
    for i, j in [(0, 1), (1, 0)]:
        others = [k for k in range(3) if k != i]
        log_d = torch.logsumexp(torch.stack([z64[i] @ z64[k] / tau for k in others]), dim=0)
        pair_terms.append(-(z64[i] @ z64[j] / tau - log_d))
    assert supcon_loss(z, y, t, tau).item() == pytest.approx(sum(pair_terms).item() / 3, rel=1e-6)


def test_supcon_equals_supcontrast_masked_formula_with_one_view() -> None:
    """HobbitLong/SupContrast losses.py with n_views = 1 and temperature = base_temperature:
    log-probabilities over all other samples, positives averaged over ``mask.sum(1)`` with
    counts below 1e-6 replaced by 1, then the mean over every anchor."""
    labels, num_classes = SCENARIOS["random_with_ignored"]
    z, y, t = random_inputs(labels, num_classes, seed=6)
    tau = 0.07
    kept = y != IGNORE
    features, targets = z[kept].double(), y[kept]
    logits = features @ features.T / tau
    logits = logits - logits.max(dim=1, keepdim=True).values
    not_self = 1.0 - torch.eye(len(targets), dtype=torch.float64)
    positives = (targets[:, None] == targets[None, :]).double() * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    counts = positives.sum(1)
    counts = torch.where(counts < 1e-6, torch.ones_like(counts), counts)
    expected = -((positives * log_prob).sum(1) / counts).mean()
    assert supcon_loss(z, y, t, tau).item() == pytest.approx(expected.item(), rel=1e-5)


def test_fmbseg_without_positives_is_the_class_averaged_text_term() -> None:
    """Two patches of different classes: only L_text, each D_i has one patch and K texts."""
    z, y, t = random_inputs([0, 1], num_classes=3, seed=7)
    tau = 0.2
    z64, t64 = z.double(), t.double()
    terms = []
    for i, j in [(0, 1), (1, 0)]:
        denominator = torch.exp(z64[i] @ z64[j] / tau) + torch.exp(z64[i] @ t64.T / tau).sum()
        terms.append(-(z64[i] @ t64[y[i]] / tau - torch.log(denominator)))
    assert fmbseg_loss(z, y, t, tau).item() == pytest.approx(sum(terms).item() / 2, rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_patches_appear_nowhere(name: str) -> None:
    """Adding unlabelled patches, whatever their embeddings, changes nothing."""
    z, y, t = random_inputs(random_labels(12, 4, seed=11), 4, seed=11)
    extra = unit(torch.randn(5, z.shape[1]))
    with_ignored_z = torch.cat([extra[:2], z, extra[2:]])
    with_ignored_y = torch.cat([torch.full((2,), 255), y, torch.full((3,), 255)])
    loss = get_loss(name)
    assert loss(with_ignored_z, with_ignored_y, t, 0.1, ignore_index=255).item() == pytest.approx(
        loss(z, y, t, 0.1, ignore_index=255).item(), rel=1e-6
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_ignored_batch_is_zero_with_usable_backward(name: str) -> None:
    z, _, t = random_inputs([0] * 6, 3, seed=0)
    z.requires_grad_(True)
    loss = get_loss(name)(z, torch.full((6,), IGNORE), t, 0.1)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert z.grad is not None and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_invalid_inputs_raise_value_error(name: str) -> None:
    loss = get_loss(name)
    z, y, t = random_inputs([0, 1, 2, 1], 3)
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[3\]"):
        loss(z, torch.tensor([0, 1, 3, 1]), t, 0.1)
    with pytest.raises(ValueError, match="ignore_index"):
        loss(z, torch.tensor([0, -2, 1, 1]), t, 0.1)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        loss(z, y[:3], t, 0.1)
    with pytest.raises(ValueError, match="dimensions differ"):
        loss(z, y, t[:, :8], 0.1)
    with pytest.raises(ValueError, match="integer"):
        loss(z, y.float(), t, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        loss(z, y, t, 0.0)


def test_unknown_loss_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="cross_entropy, fmbseg, supcon"):
        get_loss("infonce")
    assert get_loss("fmbseg") is fmbseg_loss
    assert get_loss("cross_entropy") is prototype_cross_entropy_loss
    assert get_loss("supcon") is supcon_loss


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finite_at_small_temperature_with_nearly_identical_embeddings(
    name: str, dtype: torch.dtype
) -> None:
    """At tau = 0.01 every logit is ~100, so exp() overflows float32 unless log-sum-exp is used."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 32, generator=gen)
    z = unit(base + 1e-4 * torch.randn(64, 32, generator=gen)).to(dtype).requires_grad_(True)
    t = unit(base + 1e-4 * torch.randn(5, 32, generator=gen)).to(dtype).requires_grad_(True)
    y = torch.randint(0, 5, (64,), generator=gen)
    loss = get_loss(name)(z, y, t, 0.01)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert t.grad is None or torch.isfinite(t.grad).all()  # supcon never looks at the texts


def test_half_precision_inputs_match_their_float32_upcast() -> None:
    z, y, t = random_inputs(random_labels(40, 6, seed=4, ignored=0.2), 6, seed=4)
    z16, t16 = z.half(), t.half()
    assert fmbseg_loss(z16, y, t16, 0.05).item() == pytest.approx(
        fmbseg_loss(z16.float(), y, t16.float(), 0.05).item(), rel=1e-6
    )


def test_full_batch_size_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """Paper scale: 5 images x 32x32 patches, D = 768 (time printed, not asserted)."""
    gen = torch.Generator().manual_seed(0)
    num_patches, dim, num_classes = 5 * 1024, 768, 171
    z = unit(torch.randn(num_patches, dim, generator=gen)).requires_grad_(True)
    t = unit(torch.randn(num_classes, dim, generator=gen))
    y = torch.randint(0, num_classes, (num_patches,), generator=gen)
    y[torch.rand(num_patches, generator=gen) < 0.2] = IGNORE
    start = time.perf_counter()
    loss = fmbseg_loss(z, y, t, 0.01)
    loss.backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    with capsys.disabled():
        print(f"\nfmbseg_loss forward+backward, P={num_patches}, D={dim}: {elapsed:.2f} s")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_invariant_to_permuting_patches(name: str) -> None:
    z, y, t = random_inputs(random_labels(25, 5, seed=8, ignored=0.2), 5, seed=8)
    order = torch.randperm(25, generator=torch.Generator().manual_seed(9))
    loss = get_loss(name)
    assert loss(z[order], y[order], t, 0.1).item() == pytest.approx(
        loss(z, y, t, 0.1).item(), rel=1e-6
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_match_finite_differences(name: str) -> None:
    z, y, t = random_inputs([0, 0, IGNORE, 1, 2, 1, 0], 4, dim=5, seed=12)
    z = z.double().requires_grad_(True)
    t = t.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: get_loss(name)(a, y, b, 0.3), (z, t))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_embeddings_on_their_text_prototype_score_lower_than_random(name: str) -> None:
    z, y, t = random_inputs(random_labels(40, 5, seed=13), 5, dim=64, seed=13)
    aligned = t[y]
    loss = get_loss(name)
    assert loss(aligned, y, t, 0.1) < loss(z, y, t, 0.1)
