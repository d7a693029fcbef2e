"""The torchvision repair: imports work on CPU torch, and NMS matches a plain reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fmbseg.compat import nms_reference_kernel


def plain_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Textbook greedy NMS, one pair at a time, stable order for equal scores."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept: list[int] = []
    for i in order:
        x1, y1, x2, y2 = boxes[i].tolist()
        suppressed = False
        for j in kept:
            a1, b1, a2, b2 = boxes[j].tolist()
            inter = max(0.0, min(x2, a2) - max(x1, a1)) * max(0.0, min(y2, b2) - max(y1, b1))
            union = (x2 - x1) * (y2 - y1) + (a2 - a1) * (b2 - b1) - inter
            if inter / union > threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
    return kept


def random_boxes(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(n, 2, generator=generator) * 100
    sizes = torch.rand(n, 2, generator=generator) * 40 + 1
    return torch.cat([corners, corners + sizes], dim=1)


def test_heavy_libraries_import_after_fmbseg() -> None:
    code = "import fmbseg, torchvision, timm, open_clip, segment_anything; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
def test_torchvision_nms_matches_plain_reference(seed: int, threshold: float) -> None:
    from torchvision.ops import nms

    boxes = random_boxes(60, seed)
    scores = torch.rand(60, generator=torch.Generator().manual_seed(100 + seed))
    assert nms(boxes, scores, threshold).tolist() == plain_nms(boxes, scores, threshold)


def test_ties_keep_input_order_and_identical_boxes_collapse() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.9])
    assert nms_reference_kernel(boxes, scores, 0.5).tolist() == [3, 2]
    assert plain_nms(boxes, scores, 0.5) == [3, 2]


def test_iou_equal_to_threshold_is_kept() -> None:
    # IoU of these two boxes is exactly 0.5: torchvision drops only IoU > threshold.
    boxes = torch.tensor([[0, 0, 4, 3], [0, 0, 2, 3.0]])
    scores = torch.tensor([1.0, 0.5])
    assert nms_reference_kernel(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms_reference_kernel(boxes, scores, 0.49).tolist() == [0]


def test_empty_input() -> None:
    from torchvision.ops import batched_nms, nms

    empty = torch.zeros((0, 4))
    assert nms(empty, torch.zeros(0), 0.5).shape == (0,)
    assert batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)


@pytest.mark.parametrize("n", [50, 2000])  # 2000 boxes take torchvision's per-class path
def test_batched_nms_only_suppresses_within_a_class(n: int) -> None:
    from torchvision.ops import batched_nms

    boxes = random_boxes(n, 7)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(8))
    classes = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(9))
    expected: list[int] = []
    for c in range(3):
        index = torch.nonzero(classes == c).flatten()
        expected += [int(index[i]) for i in plain_nms(boxes[index], scores[index], 0.5)]
    expected.sort(key=lambda i: -float(scores[i]))
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == expected


def test_repair_is_skipped_when_native_ops_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.machinery

    from fmbseg import compat

    monkeypatch.setattr(compat, "_native_ops_load", lambda origin: True)
    monkeypatch.setitem(compat._state, "patched", False)
    finder = compat._TorchvisionFinder()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    defined: list[bool] = []
    monkeypatch.setattr(compat, "_define_cpu_ops", lambda: defined.append(True))
    spec = finder.find_spec("torchvision")
    assert spec is not None
    assert not isinstance(spec.loader, compat._RepairingLoader)
    assert isinstance(spec, importlib.machinery.ModuleSpec)
    assert defined == []
