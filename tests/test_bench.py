"""The benchmark harness: one tiny case end to end, and its arithmetic on hand-made numbers.

Targets are reported, never asserted: these tests check that ratios, statuses and files are
right, not how fast anything is.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.bench import harness
from fmbseg.bench.catalog import CASES, SCALING_CASES
from fmbseg.bench.harness import command, run_bench
from fmbseg.bench.measure import Recorder
from fmbseg.bench.options import (
    ALL_CASES,
    CASE_NAMES,
    SCALING_CASE_NAMES,
    SIZES,
    BenchOptions,
    add_arguments,
)
from fmbseg.bench.presets import PRESETS
from fmbseg.bench.report import (
    INCONCLUSIVE,
    INFO,
    MET,
    MISSED,
    NOT_RUN,
    Comparison,
    Target,
    compare,
    scaling_checks,
    summarise_case,
    to_markdown,
)
from fmbseg.errors import ConfigError


def test_a_tiny_case_runs_end_to_end_and_writes_json_and_markdown(tmp_path: Path) -> None:
    options = BenchOptions(
        size="tiny", cases=("train_step",), repeats=1, warmup=0, out_dir=tmp_path / "bench"
    )
    report = run_bench(options)

    written = json.loads((tmp_path / "bench" / "bench.json").read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(report))
    assert {"schema", "command", "machine", "device", "versions", "options", "preset", "cases",
            "scaling", "comparisons", "weights", "memory_method"} <= written.keys()  # fmt: skip
    assert (
        written["command"] == "fmbseg bench --size tiny --repeats 1 --warmup 0 --cases train_step"
    )
    assert {"cpu", "cores_logical", "cores_usable", "memory_gib", "date"} <= written[
        "machine"
    ].keys()
    assert {"torch", "timm", "open_clip_torch", "segment-anything"} <= written["versions"].keys()
    assert written["device"]["type"] == "cpu" and written["device"]["threads"] >= 1
    assert written["weights"] == "random-init"

    case = written["cases"]["train_step"]
    assert case["error"] is None and case["info"]["images"] == 5
    assert case["info"]["patches"] == 5 * 8 * 8  # tiny: 112 px at /14
    step = case["measurements"]["ours.loss_forward"]
    assert len(step["seconds"]) == 1 and step["median_s"] == step["min_s"] > 0
    assert step["peak_rss_mib"] >= step["rss_before_mib"] > 0
    assert step["rate_unit"] == "image/s"

    statuses = {row["key"]: row for row in written["comparisons"]}
    share = statuses["loss_share_of_step"]
    assert (
        0 < share["ratio"] < 1 and share["status"] in (MET, MISSED) and share["target"] == "≤ 0.25"
    )
    assert statuses["routes_vs_segment_anything"]["status"] == NOT_RUN
    assert statuses["scale_features_linear"]["status"] == NOT_RUN

    markdown = (tmp_path / "bench" / "bench.md").read_text(encoding="utf-8")
    assert markdown == to_markdown(report)
    assert "| train_step | ours.loss_forward | 1 |" in markdown
    assert "| loss forward+backward ÷ training step (5 images) |" in markdown
    assert "random-init" in markdown


def test_a_failed_case_is_reported_and_the_command_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(harness, "_run_worker", lambda spec, timeout: {"error": "boom"})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--size", "tiny", "--cases", "masks", "--out", str(tmp_path)])

    assert command(args) == 1
    report = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert report["cases"]["masks"] == {
        "error": "boom", "info": {}, "measurements": {}, "wall_seconds": None
    }  # fmt: skip
    assert "| masks | **failed**: boom |" in capsys.readouterr().out


def test_options_are_checked_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown case"):
        run_bench(BenchOptions(cases=("nope",), out_dir=tmp_path))
    with pytest.raises(ConfigError, match="--scale"):
        run_bench(BenchOptions(scale=(10,), out_dir=tmp_path))
    with pytest.raises(ConfigError, match="unknown size"):
        run_bench(BenchOptions(size="huge", out_dir=tmp_path))
    assert not (tmp_path / "bench.json").exists()


def test_the_cli_arguments_name_the_real_sizes_and_cases_and_import_no_models() -> None:
    assert tuple(PRESETS) == SIZES
    assert (tuple(CASES), tuple(SCALING_CASES)) == (CASE_NAMES, SCALING_CASE_NAMES)
    assert (*CASES, *SCALING_CASES) == ALL_CASES
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).cases is None
    heavy = "import sys, fmbseg.bench.options; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", heavy], capture_output=True, text=True)
    assert imported.stdout.strip() == "[]", imported.stderr


def test_command_line_names_only_what_differs_from_the_defaults() -> None:
    assert BenchOptions(quick=True).command_line() == "fmbseg bench --size small --quick"
    options = BenchOptions(size="paper", device="cuda", precision="bf16", scale=(10, 100))
    assert options.command_line() == (
        "fmbseg bench --size paper --device cuda --precision bf16 --scale 10,100"
    )


def measured(**seconds: float) -> dict[str, dict[str, float]]:
    """Measurements whose CPU time is twice their wall time (two busy threads)."""
    return {
        name.replace("__", "."): {"min_s": s, "median_s": 2 * s, "min_cpu_s": 2 * s}
        for name, s in seconds.items()
    }


def test_ratios_use_fastest_rounds_and_targets_decide_the_status() -> None:
    comparisons = (
        Comparison("time", "t", "a", ("ours.x",), ("reference.y",), Target("<=", 0.6)),
        Comparison("throughput", "p", "a", ("reference.y",), ("ours.x",), Target(">=", 0.9)),
        Comparison("share", "s", "b", ("ours.loss",), ("ours.module", "ours.loss")),
        Comparison("missing", "m", "c", ("ours.x",), ("reference.y",), Target("<=", 1.0)),
    )
    rows = compare(
        {
            "a": measured(ours__x=3.0, reference__y=5.0),
            "b": measured(ours__loss=1.0, ours__module=3.0),
        },
        comparisons,
    )
    by_key = {row["key"]: row for row in rows}
    assert by_key["time"]["ratio"] == pytest.approx(0.6) and by_key["time"]["status"] == MET
    assert by_key["time"]["cpu_ratio"] == pytest.approx(0.6)
    assert by_key["throughput"]["ratio"] == pytest.approx(5 / 3)
    assert by_key["throughput"]["status"] == MET and by_key["throughput"]["target"] == "≥ 0.9"
    assert by_key["share"]["ratio"] == pytest.approx(0.25) and by_key["share"]["status"] == INFO
    assert by_key["missing"]["ratio"] is None and by_key["missing"]["status"] == NOT_RUN

    slower = compare({"a": measured(ours__x=3.1, reference__y=5.0)}, comparisons[:1])
    assert slower[0]["status"] == MISSED
    assert Target(">=", 0.9).met(0.9) and not Target(">=", 0.9).met(0.899)


def series(*points: tuple[int, float, float]) -> list[dict[str, float]]:
    return [{"images": n, "min_s": s, "peak_rss_mib": mib} for n, s, mib in points]


def test_scaling_checks_compare_the_cost_of_extra_images_and_the_peak_memory() -> None:
    # 2 s of fixed cost, then 0.1 s per image: linear; memory flat beyond the first shard.
    linear = series((10, 3.0, 400.0), (100, 12.0, 430.0), (1000, 102.0, 431.0))
    # The same start, then 0.2 s per image, and memory that keeps growing.
    superlinear = series((10, 3.0, 400.0), (100, 12.0, 430.0), (1000, 192.0, 600.0))
    noisy = series((10, 3.0, 400.0), (100, 2.5, 430.0), (1000, 100.0, 431.0))

    rows = {row["key"]: row for row in scaling_checks({"scale_pseudolabel": linear})}
    assert rows["scale_pseudolabel_linear"]["ratio"] == pytest.approx(1.0)
    assert rows["scale_pseudolabel_linear"]["status"] == MET
    assert rows["scale_pseudolabel_flat_memory"]["status"] == MET
    assert rows["scale_features_linear"]["status"] == NOT_RUN

    rows = {row["key"]: row for row in scaling_checks({"scale_features": superlinear})}
    assert rows["scale_features_linear"]["ratio"] == pytest.approx(2.0)
    assert rows["scale_features_linear"]["status"] == MISSED
    assert rows["scale_features_flat_memory"]["status"] == MISSED

    rows = {row["key"]: row for row in scaling_checks({"scale_features": noisy})}
    assert rows["scale_features_linear"]["status"] == INCONCLUSIVE


def test_summaries_hold_every_round_and_rates_from_the_fastest() -> None:
    sample = {"peak_rss_mib": 500.0, "rss_before_mib": 400.0, "peak_device_mib": None}
    result = {
        "samples": {
            "ours.batched": [
                sample | {"seconds": s, "cpu_seconds": 2 * s} for s in (2.0, 1.0, 4.0)
            ],
            "ours.merge": [sample | {"seconds": 0.5, "cpu_seconds": 0.4, "peak_rss_mib": 520.0}],
        },
        "info": {"units": {"ours.batched": [20, "crop"]}},
    }
    summary = summarise_case(result)
    batched = summary["ours.batched"]
    assert batched["seconds"] == [2.0, 1.0, 4.0]
    assert (batched["median_s"], batched["min_s"], batched["min_cpu_s"]) == (2.0, 1.0, 2.0)
    assert batched["rate"] == 20.0 and batched["rate_unit"] == "crop/s"
    assert "rate" not in summary["ours.merge"] and summary["ours.merge"]["peak_rss_mib"] == 520.0


def test_recorder_skips_warm_up_and_stops_measuring_when_the_budget_is_spent() -> None:
    recorder = Recorder(torch.device("cpu"), warmup=1, repeats=5, budget_s=0.0)
    calls = 0

    def work() -> None:
        nonlocal calls
        calls += 1

    for _ in recorder.rounds():
        recorder.time("work", work)
    assert calls == 2 and len(recorder.samples["work"]) == 1

    unlimited = Recorder(torch.device("cpu"), warmup=0, repeats=3)
    for _ in unlimited.rounds():
        unlimited.time("work", work)
    assert len(unlimited.samples["work"]) == 3


def test_each_call_gets_its_own_peak_memory() -> None:
    recorder = Recorder(torch.device("cpu"), warmup=0, repeats=1)
    if recorder.memory.method != "vmhwm-reset":
        pytest.skip("per-call peaks need a resettable high-water mark (Linux)")
    for _ in recorder.rounds():
        recorder.time("big", lambda: np.ones(64 * 1024 * 1024 // 8).sum())
        recorder.time("small", lambda: np.ones(16).sum())
    (big,), (small,) = recorder.samples["big"], recorder.samples["small"]
    assert big.peak_rss_mib - big.rss_before_mib > 48
    assert small.peak_rss_mib - small.rss_before_mib < 16


def test_the_onnx_case_compares_onnxruntime_with_torch_on_the_same_windows(
    tmp_path: Path,
) -> None:
    options = BenchOptions(
        size="tiny", cases=("onnx_image_side",), repeats=1, warmup=0, out_dir=tmp_path / "bench"
    )
    report = run_bench(options)
    case = report["cases"]["onnx_image_side"]
    assert case["error"] is None and case["info"]["windows"] > 0
    assert {"ours.onnxruntime", "reference.torch"} <= case["measurements"].keys()
    row = {row["key"]: row for row in report["comparisons"]}["onnxruntime_vs_torch"]
    assert row["ratio"] is not None and row["ratio"] > 0


def test_the_pixelclip_case_times_each_part_of_one_training_step(tmp_path: Path) -> None:
    options = BenchOptions(
        size="tiny", cases=("pixelclip_step",), repeats=1, warmup=0, out_dir=tmp_path / "bench"
    )
    case = run_bench(options)["cases"]["pixelclip_step"]
    assert case["error"] is None
    parts = {"momentum_update", "prompts_text_forward", "teacher_and_mask_pooling",
             "sinkhorn_clustering", "student_forward", "head_and_loss_forward", "backward",
             "clip_and_adamw"}  # fmt: skip
    assert {f"ours.{part}" for part in parts} | {"ours.whole_step"} == case["measurements"].keys()
    shares = case["info"]["shares"]
    assert shares.keys() == parts and sum(shares.values()) == pytest.approx(1, abs=1e-3)
    assert case["info"]["parts_over_whole_step"] > 0


def test_the_fusioner_cases_time_it_beside_fmbseg_on_the_same_inputs(tmp_path: Path) -> None:
    options = BenchOptions(
        size="tiny",
        cases=("fusioner_train_step", "fusioner_inference"),
        repeats=1,
        warmup=0,
        out_dir=tmp_path / "bench",
    )
    report = run_bench(options)
    step, inference = (report["cases"][name] for name in options.cases)
    assert step["error"] is None and inference["error"] is None
    assert {"fusioner.forward", "fusioner.loss_forward", "fusioner.backward",
            "fusioner.optimizer_steps", "fusioner.whole_step",
            "fmbseg.whole_step"} == step["measurements"].keys()  # fmt: skip
    assert step["info"]["decoder_side"] == 2 * step["info"]["grid"]  # tiny: one x2 upsample
    assert {"fusioner.segment", "fusioner.segment_one_class", "fmbseg.segment",
            "fmbseg.segment_one_class"} == inference["measurements"].keys()  # fmt: skip
    assert inference["info"]["classes"] == PRESETS["tiny"].classes
    assert inference["info"]["seconds_per_extra_class"].keys() == {"fusioner", "fmbseg"}
    rows = {row["key"]: row for row in report["comparisons"]}
    for key in ("fusioner_vs_fmbseg_train_step", "fusioner_vs_fmbseg_inference",
                "fusioner_k_classes_vs_one", "fmbseg_k_classes_vs_one"):  # fmt: skip
        assert rows[key]["ratio"] > 0 and rows[key]["status"] == INFO
    assert "Fusioner ÷ FMbSeg training step" in to_markdown(report)


def test_the_benchmarked_fusioner_is_the_papers_size_beyond_tiny() -> None:
    from fmbseg.bench.fusioner import build_fusioner, fusioner_config

    with torch.device("meta"):
        model = build_fusioner(fusioner_config("small"), 768, 768)
    assert 48e6 < sum(p.numel() for p in model.parameters()) < 50e6
