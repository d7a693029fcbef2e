"""The noise study's pieces: label flipping, and training that beats the untrained module."""

from __future__ import annotations

import torch

from fmbseg.align.features import IGNORE_PATCH
from fmbseg.oracle.noise_study import flip_labels, markdown_table, run_study


def test_flipping_moves_exactly_the_share_to_other_classes() -> None:
    labels = torch.tensor([[0, 1, 2, IGNORE_PATCH] * 25])
    noisy = flip_labels(labels, 0.4, 3, seed=0)
    labelled = labels != IGNORE_PATCH
    assert (noisy[~labelled] == IGNORE_PATCH).all()
    assert int((noisy != labels).sum()) == round(0.4 * int(labelled.sum()))
    assert ((noisy >= 0) & (noisy < 3))[labelled].all()


def test_trained_module_beats_the_untrained_one_by_far() -> None:
    results = run_study(noise_levels=(0.2,), train_scenes=10, test_scenes=5, epochs=8)
    row = results["20%"]
    assert row["fmbseg"] >= row["untrained"] + 0.5
    assert "| 20% |" in markdown_table(results)
