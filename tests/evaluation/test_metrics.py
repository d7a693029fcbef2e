"""The streaming confusion matrix against cases small enough to work out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fmbseg.errors import InputError
from fmbseg.evaluation import ConfusionMatrix

#   target       prediction     gt 0: 1 right, 1 called 1     IoU0 = 1 / (2 + 2 - 1) = 1/3
#   0 0 1        0 1 1          gt 1: 2 right                 IoU1 = 2 / (2 + 3 - 2) = 2/3
#   1 2 2        1 2 0          gt 2: 1 right, 1 called 0     IoU2 = 1 / (2 + 1 - 1) = 1/2
TARGET = np.array([[0, 0, 1], [1, 2, 2]])
PREDICTION = np.array([[0, 1, 1], [1, 2, 0]])


def test_hand_computed_case() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PREDICTION, TARGET)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert cm.iou() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert cm.mean_iou() == pytest.approx(0.5)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)


def test_classes_absent_from_both_maps_are_nan_and_left_out_of_the_mean() -> None:
    cm = ConfusionMatrix(5)
    cm.update(np.array([0, 0, 3]), np.array([0, 1, 1]))  # 2, 4 absent; 3 only predicted
    iou = cm.iou()
    assert math.isnan(iou[2]) and math.isnan(iou[4])
    assert iou[[0, 1, 3]].tolist() == pytest.approx([1 / 2, 0.0, 0.0])
    assert cm.mean_iou() == pytest.approx(1 / 6)


def test_ignored_target_pixels_count_for_nothing_whatever_is_predicted() -> None:
    cm = ConfusionMatrix(3, ignore_index=255)
    target = np.array([[0, 0, 1, 255], [1, 2, 2, 255]])
    prediction = np.array([[0, 1, 1, 2], [1, 2, 0, 77]])  # 77 is no class, but its pixel is ignored
    cm.update(prediction, target)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"prediction shape \(2, 3\) != target shape \(3, 2\)"):
        ConfusionMatrix(3).update(PREDICTION, TARGET.reshape(3, 2))


@pytest.mark.parametrize(("prediction", "target", "message"), [
    ([0, 3], [0, 1], "prediction holds 3, outside 0..2"),
    ([0, 1], [-1, 1], "target holds -1, outside 0..2"),
])  # fmt: skip
def test_values_outside_the_classes_are_refused(prediction, target, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix(3).update(np.array(prediction), np.array(target))


def test_ignore_index_may_not_be_a_class() -> None:
    with pytest.raises(ValueError, match="ignore_index 2 is a class index"):
        ConfusionMatrix(3, ignore_index=2)


def random_batches(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        shape = tuple(rng.integers(1, 20, size=2))
        target = rng.integers(0, 6, size=shape)
        target[rng.random(shape) < 0.1] = 255
        batches.append((rng.integers(0, 6, size=shape), target))
    return batches


def test_streaming_many_batches_equals_one_big_batch() -> None:
    batches = random_batches(60)
    streamed = ConfusionMatrix(6)
    for prediction, target in batches:
        streamed.update(prediction, target)
    whole = ConfusionMatrix(6)
    whole.update(
        np.concatenate([p.ravel() for p, _ in batches]),
        np.concatenate([t.ravel() for _, t in batches]),
    )
    assert np.array_equal(streamed.matrix, whole.matrix)
    assert streamed.matrix.shape == (6, 6)  # the only state, whatever the number of pixels


def test_merging_partial_matrices_equals_a_single_pass() -> None:
    batches = random_batches(30, seed=1)
    single, first, second = ConfusionMatrix(6), ConfusionMatrix(6), ConfusionMatrix(6)
    for k, (prediction, target) in enumerate(batches):
        single.update(prediction, target)
        (first if k % 2 else second).update(prediction, target)
    assert np.array_equal(first.merge(second).matrix, single.matrix)
    assert first.mean_iou() == single.mean_iou()


def test_merge_refuses_a_different_set_up() -> None:
    with pytest.raises(ValueError, match="cannot merge a 4-class matrix"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))


def test_save_and_load_round_trip_as_plain_json(tmp_path: Path) -> None:
    cm = ConfusionMatrix(3, ignore_index=99)
    cm.update(PREDICTION, TARGET)
    cm.save(tmp_path / "cm.json")
    payload = json.loads((tmp_path / "cm.json").read_text())
    assert payload == {"num_classes": 3, "ignore_index": 99, "matrix": cm.matrix.tolist()}
    loaded = ConfusionMatrix.load(tmp_path / "cm.json")
    assert (loaded.num_classes, loaded.ignore_index) == (3, 99)
    assert np.array_equal(loaded.matrix, cm.matrix)


@pytest.mark.parametrize("text", ["{", '{"num_classes": 3, "ignore_index": 255}',
                                  '{"num_classes": 2, "ignore_index": 255, "matrix": [[1]]}'])  # fmt: skip
def test_loading_something_else_names_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / "cm.json").write_text(text)
    with pytest.raises(InputError, match=r"cm\.json: "):
        ConfusionMatrix.load(tmp_path / "cm.json")


def test_metrics_dict_is_strict_json_with_dvc_safe_names() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PREDICTION, TARGET)
    metrics = cm.metrics(["sky", "tree", "road", "user@home"])
    assert metrics["mIoU"] == pytest.approx(0.5)
    assert metrics["pixel_accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class"]["tree"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["user_home"] is None
    text = json.dumps(metrics, allow_nan=False)
    assert "@" not in text


def test_per_class_table_rows() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PREDICTION, TARGET)
    rows = cm.per_class_table(["a", "b", "c", "d"])
    assert rows[1] == {"class": "b", "iou": pytest.approx(2 / 3), "gt_pixels": 2, "pred_pixels": 3}
    assert rows[3] == {"class": "d", "iou": None, "gt_pixels": 0, "pred_pixels": 0}
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        cm.per_class_table(["a", "b", "c"])


def test_empty_matrix_has_no_metrics() -> None:
    cm = ConfusionMatrix(2)
    assert math.isnan(cm.mean_iou()) and math.isnan(cm.pixel_accuracy())
    assert cm.metrics(["a", "b"]) == {"mIoU": None, "pixel_accuracy": None,
                                      "per_class": {"a": None, "b": None}}  # fmt: skip


def test_plot_writes_an_image(tmp_path: Path) -> None:
    cm = ConfusionMatrix(3)
    cm.update(PREDICTION, TARGET)
    cm.plot(tmp_path / "cm.png", ["sky", "tree", "road"])
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]
