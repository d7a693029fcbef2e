"""Benchmark cases of the newer backends, run on the tiny preset through the real harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmbseg.bench.harness import run_bench
from fmbseg.bench.options import BenchOptions


def test_sam2_and_sam_automatic_masks_are_timed_apart_at_the_same_grid(tmp_path: Path) -> None:
    pytest.importorskip("sam2", reason="the sam2 extra is not installed")
    options = BenchOptions(
        size="tiny", cases=("sam2_automatic_masks",), repeats=1, warmup=0, out_dir=tmp_path
    )
    report = run_bench(options)
    case = report["cases"]["sam2_automatic_masks"]
    assert case["error"] is None
    assert case["measurements"].keys() == {
        "ours.sam2_encoder", "ours.sam2_automatic_masks",
        "reference.sam_encoder", "reference.sam_automatic_masks",
    }  # fmt: skip
    assert case["info"]["grid"] == 4 and case["info"]["encoder_input"] == 256
    assert case["info"]["sam2"] == "sam2.1_hiera_t@256"
    (ratio,) = [c for c in report["comparisons"] if c["key"] == "sam2_vs_sam_automatic_masks"]
    assert ratio["ratio"] > 0 and ratio["status"] == "info"


def test_sam3_batched_prompts_are_timed_against_one_call_per_class(tmp_path: Path) -> None:
    pytest.importorskip("transformers.models.sam3", reason="transformers without SAM 3")
    options = BenchOptions(
        size="tiny", cases=("sam3_prompts",), repeats=1, warmup=0, out_dir=tmp_path
    )
    report = run_bench(options)
    case = report["cases"]["sam3_prompts"]
    assert case["error"] is None and case["info"]["classes"] == 8
    assert case["measurements"].keys() == {
        "ours.vision_embedding", "ours.batched_prompts", "reference.one_call_per_class",
    }  # fmt: skip
    assert case["measurements"]["ours.batched_prompts"]["rate_unit"] == "class/s"
    (ratio,) = [
        c for c in report["comparisons"] if c["key"] == "sam3_batched_vs_one_call_per_class"
    ]
    assert ratio["ratio"] > 0
