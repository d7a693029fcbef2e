"""Run the benchmark cases, each in a fresh worker process, and write the report.

Entry points: :func:`run_bench` for code, :func:`command` for the ``fmbseg bench`` sub-command
(its arguments: :func:`fmbseg.bench.options.add_arguments`). Writes ``bench.json`` (every
number) and ``bench.md`` (the tables) into the output folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fmbseg.bench.cases import prepare_scaling_sets
from fmbseg.bench.catalog import CASES, SCALING_CASES
from fmbseg.bench.measure import machine_info, package_versions
from fmbseg.bench.options import BenchOptions, options_from_args
from fmbseg.bench.presets import Preset, get_preset
from fmbseg.bench.report import compare, scaling_checks, summarise_case, to_markdown
from fmbseg.io.atomic import write_text_atomic

SCHEMA = "fmbseg-bench/1"
JSON_FILE = "bench.json"
MARKDOWN_FILE = "bench.md"


def _run_worker(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The worker's result, or ``{"error": ...}`` with the last line it printed."""
    workdir = Path(spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file, result_file = workdir / "spec.json", workdir / "result.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    command = [sys.executable, "-m", "fmbseg.bench.worker", str(spec_file), str(result_file)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0 or not result_file.is_file():
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(result_file.read_text(encoding="utf-8"))


def run_bench(options: BenchOptions, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the selected cases and write ``bench.json`` and ``bench.md`` into ``options.out_dir``.

    Returns the report (what ``bench.json`` holds). A failed case is recorded with its error and
    the others still run.
    """
    options.check()
    preset = get_preset(options.size)
    base_spec = {
        "size": options.size,
        "quick": options.quick,
        "warmup": options.warmup,
        "repeats": options.repeats,
        "budget_s": options.budget_s,
        "device": options.device,
        "precision": options.precision,
        "threads": options.threads,
    }
    plain = [name for name in options.cases if name in CASES]
    scaled = [name for name in options.cases if name in SCALING_CASES]
    sizes = sorted(options.scale)
    jobs = [(name, None) for name in plain] + [(name, n) for name in scaled for n in sizes]
    scratch = Path(tempfile.mkdtemp(prefix="fmbseg-bench-"))
    results: list[tuple[str, int | None, dict[str, Any]]] = []
    try:
        if scaled:
            log(f"preparing {sum(sizes)} scaling images")
            prepare_scaling_sets(scratch / "scaling", sizes)
        for position, (name, images) in enumerate(jobs, 1):
            label = name if images is None else f"{name} ({images} images)"
            started = time.perf_counter()
            spec = base_spec | {
                "case": name,
                "workdir": str(scratch / f"{position:02d}-{name}"),
                "images": images,
                "data": str(scratch / "scaling") if images else None,
            }
            result = _run_worker(spec, options.timeout_s)
            elapsed = time.perf_counter() - started
            outcome = f"failed: {result['error']}" if "error" in result else f"{elapsed:.0f} s"
            log(f"[{position}/{len(jobs)}] {label}: {outcome}")
            results.append((name, images, result))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = build_report(options, preset, results)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(options.out_dir / JSON_FILE, json.dumps(report, indent=2, ensure_ascii=False))
    write_text_atomic(options.out_dir / MARKDOWN_FILE, to_markdown(report))
    return report


def build_report(
    options: BenchOptions,
    preset: Preset,
    results: Sequence[tuple[str, int | None, dict[str, Any]]],
) -> dict[str, Any]:
    """Every number and where it came from, as plain data."""
    cases: dict[str, Any] = {}
    scaling: dict[str, list[dict[str, Any]]] = {}
    measured = [result for _, _, result in results if "error" not in result]
    for name, images, result in results:
        error = result.get("error")
        if images is None:
            cases[name] = {
                "error": error,
                "info": result.get("info", {}),
                "measurements": {} if error else summarise_case(result),
                "wall_seconds": result.get("wall_seconds"),
            }
            continue
        point: dict[str, Any] = {"images": images, "error": error}
        if not error:
            (measurement,) = summarise_case(result).values()
            point |= measurement
        scaling.setdefault(name, []).append(point)
    measurements = {name: case["measurements"] for name, case in cases.items()}
    valid_scaling = {k: [p for p in v if not p["error"]] for k, v in scaling.items()}
    options_record = asdict(options) | {
        "out_dir": str(options.out_dir),
        "budget_s": options.budget_s,
    }
    return {
        "schema": SCHEMA,
        "command": options.command_line(),
        "machine": machine_info(),
        "device": measured[0]["device"] if measured else {"type": options.device},
        "versions": package_versions(),
        "weights": "random-init",
        "options": options_record,
        "preset": preset.describe(),
        "models": (
            f"CLIP {preset.clip_model}, SAM {preset.sam.name} at {preset.sam.image_size} px, "
            f"{preset.encoder_model} at {preset.feature_size} px"
        ),
        "memory_method": measured[0]["memory_method"] if measured else None,
        "cases": cases,
        "scaling": scaling,
        "comparisons": compare(measurements) + scaling_checks(valid_scaling),
    }


def command(args: argparse.Namespace) -> int:
    """``fmbseg bench``: progress on stderr, the tables on stdout; status 1 if a case failed."""
    options = options_from_args(args)
    report = run_bench(options, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(to_markdown(report), end="")
    print(
        f"wrote {options.out_dir / JSON_FILE} and {options.out_dir / MARKDOWN_FILE}",
        file=sys.stderr,
    )
    failed = [case for case, result in report["cases"].items() if result["error"]] + [
        case for case, series in report["scaling"].items() if any(p["error"] for p in series)
    ]
    return 1 if failed else 0
