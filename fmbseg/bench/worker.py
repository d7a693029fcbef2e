"""One benchmark case in a fresh process: ``python -m fmbseg.bench.worker SPEC.json RESULT.json``.

A fresh process per case keeps one case's models, allocator caches and lazy imports out of the
next case's timings and memory peaks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fmbseg.bench.cases import CaseContext
    from fmbseg.bench.catalog import CASES, SCALING_CASES
    from fmbseg.bench.measure import Recorder, device_info
    from fmbseg.bench.presets import get_preset, register_clip_architecture
    from fmbseg.models.runtime import Runtime

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    preset = get_preset(spec["size"])
    workdir = Path(spec["workdir"])
    register_clip_architecture(preset, workdir / "open_clip")
    runtime = Runtime(spec["device"], spec["precision"])
    context = CaseContext(
        preset=preset,
        runtime=runtime,
        quick=bool(spec["quick"]),
        workdir=workdir,
        images=spec.get("images"),
        data=Path(spec["data"]) if spec.get("data") else None,
    )
    recorder = Recorder(
        runtime.torch_device(), int(spec["warmup"]), int(spec["repeats"]), spec.get("budget_s")
    )
    case = {**CASES, **SCALING_CASES}[spec["case"]]
    start = time.perf_counter()
    info = case(context, recorder)
    return {
        "case": spec["case"],
        "samples": recorder.as_dict(),
        "info": info,
        "device": device_info(runtime.torch_device()),
        "memory_method": recorder.memory.method,
        "wall_seconds": time.perf_counter() - start,
    }


def main(argv: list[str]) -> int:
    spec_path, result_path = (Path(arg) for arg in argv)
    # Models are random-init and never fetched; nothing should try a hub or print progress.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FMBSEG_OFFLINE", "1")
    logging.basicConfig(level=logging.ERROR)
    result = run_spec(json.loads(spec_path.read_text(encoding="utf-8")))
    result_path.write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
