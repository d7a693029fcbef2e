"""Make torchvision importable on CPU-only torch builds whose torchvision wheel is CUDA-only.

The only torchvision wheel that matches some torch releases links ``libtorch_cuda.so``; on a
CPU torch its native ops fail to load and ``import torchvision`` dies registering fake
kernels for ``torchvision::nms``. timm, open_clip and segment_anything all import
torchvision, and SAM's mask generators call ``batched_nms``.

The repair runs only when torchvision is first imported and its native library does not load:
it defines the ``torchvision::nms`` / ``torchvision::qnms`` operators with a pure-torch CPU
kernel, then lets ``torchvision.ops.nms`` use it. Where the native ops load, it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_state: dict[str, Any] = {"patched": False, "library": None}


def nms_reference_kernel(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """Greedy NMS with torchvision's contract: indices of kept boxes by decreasing score.

    A box is dropped when its IoU with an already kept, higher-scoring box is strictly greater
    than ``iou_threshold``. Equal scores keep their input order (stable sort).
    """
    import torch

    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    x1, y1, x2, y2 = sorted_boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    n = sorted_boxes.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = slice(i + 1, n)
        inter_w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        inter_h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = inter_w * inter_h
        iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def _native_ops_load(origin: str) -> bool:
    import torch

    lib = Path(origin).parent / "_C.so"
    if not lib.exists():
        return False
    try:
        torch.ops.load_library(str(lib))
    except (OSError, ImportError, RuntimeError):
        return False
    return True


def _define_cpu_ops() -> None:
    import torch

    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.impl("nms", nms_reference_kernel, "CPU")
    _state["library"] = library  # the registration lives as long as this object


def _after_import() -> None:
    """Let ``torchvision.ops.nms`` reach the CPU kernel instead of refusing for lack of ops."""
    import torchvision.ops.boxes as boxes

    boxes._assert_has_ops = lambda: None


class _RepairingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _after_import()


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Sees the first ``import torchvision`` and repairs it if its native ops cannot load."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "torchvision" or _state["patched"]:
            return None
        _state["patched"] = True
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or spec.loader is None:
            return spec
        if _native_ops_load(spec.origin):
            return spec
        _define_cpu_ops()
        spec.loader = _RepairingLoader(spec.loader)
        return spec


def install_torchvision_hook() -> None:
    """Arrange for the repair to run when torchvision is first imported (cheap, idempotent)."""
    if _state["patched"] or "torchvision" in sys.modules:
        return
    if not any(isinstance(finder, _TorchvisionFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def torchvision_was_repaired() -> bool:
    """True when this process runs torchvision on the pure-torch CPU NMS kernel."""
    return _state["library"] is not None
