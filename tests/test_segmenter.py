"""The open-vocabulary segmenter on a module trained in the oracle world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.align.module import load_module
from fmbseg.config import InferenceConfig
from fmbseg.errors import WeightsError
from fmbseg.methods.fmbseg import AlignmentScorer
from fmbseg.models.vocabulary import VocabularyEncoder
from fmbseg.oracle.fakes import FakeClip, FakeEncoder
from fmbseg.oracle.scenes import OracleWorld, make_scene
from fmbseg.segmenter import Background, OpenVocabularySegmenter

WORLD = OracleWorld()
SLIDING = InferenceConfig(short_side=96, window=48, stride=24)


def segmenter(module_path: Path, config: InferenceConfig = SLIDING) -> OpenVocabularySegmenter:
    module, _ = load_module(module_path)
    scorer = AlignmentScorer(FakeEncoder(WORLD), module, VocabularyEncoder(FakeClip(WORLD)))
    return OpenVocabularySegmenter(scorer, config, torch.device("cpu"))


@pytest.fixture(scope="module")
def module_path(oracle_run) -> Path:
    return oracle_run.module


@pytest.mark.parametrize(
    "config", [SLIDING, InferenceConfig(mode="whole", short_side=96)], ids=["sliding", "whole"]
)
def test_held_out_scenes_are_segmented_at_their_own_size(
    module_path: Path, config: InferenceConfig
) -> None:
    model = segmenter(module_path, config)
    accuracies = []
    for seed in range(100, 104):
        scene = make_scene(WORLD, 90, 130, seed=seed)
        result = model.segment(scene.image, WORLD.class_names)
        assert result.labels.shape == scene.labels.shape
        assert result.scores.shape == (WORLD.num_classes, 90, 130)
        accuracies.append((result.labels == scene.labels).mean())
    assert np.mean(accuracies) >= 0.85


def test_any_vocabulary_order_and_subset(module_path: Path) -> None:
    model = segmenter(module_path)
    scene = make_scene(WORLD, 96, 96, seed=7)
    reordered = list(reversed(WORLD.class_names))
    labels = model.segment(scene.image, reordered).labels
    as_world = np.array([WORLD.class_names.index(n) for n in reordered])[labels]
    assert (as_world == scene.labels).mean() >= 0.85


def test_stuff_names_count_as_background(module_path: Path) -> None:
    model = segmenter(module_path)
    scene = make_scene(WORLD, 96, 96, seed=8)
    things = ["background", "cat", "dog", "person", "traffic light", "crème brûlée"]
    stuff = ("grass", "sky", "road")
    labels = model.segment(scene.image, things, Background(0, stuff_names=stuff)).labels
    truth = np.array([things.index(n) if n in things else 0 for n in WORLD.class_names])[
        scene.labels
    ]
    assert (labels == truth).mean() >= 0.85
    assert set(np.unique(labels)) <= set(range(len(things)))


def test_threshold_background_takes_low_scores(module_path: Path) -> None:
    model = segmenter(module_path)
    scene = make_scene(WORLD, 64, 64, seed=9)
    names = ["background", *WORLD.class_names]
    everything = model.segment(scene.image, names, Background(0, threshold=1.01)).labels
    assert (everything == 0).all()
    nothing = model.segment(scene.image, names, Background(0, threshold=-1.01)).labels
    assert (nothing != 0).all()


def test_module_and_encoder_must_agree(module_path: Path) -> None:
    module, _ = load_module(module_path)
    wrong_encoder = FakeEncoder(WORLD, class_dim=8, nuisance_dim=8)
    with pytest.raises(WeightsError, match="takes 32-d features, the encoder gives 16-d"):
        AlignmentScorer(wrong_encoder, module, VocabularyEncoder(FakeClip(WORLD)))
