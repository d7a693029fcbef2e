"""From raw samples to the report: medians, rates, ratios against references, targets, tables.

Targets are reported as met or missed, never enforced: the numbers come from whatever machine
ran them, and on shared machines timings move by several times between runs, which is why every
target is a ratio of two measurements taken in the same rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

MET, MISSED, INFO, NOT_RUN = "met", "missed", "info", "not run"
INCONCLUSIVE = "inconclusive"  # the data ran but noise left no ratio to judge


@dataclass(frozen=True)
class Target:
    op: Literal["<=", ">="]
    value: float

    def met(self, ratio: float) -> bool:
        return ratio <= self.value if self.op == "<=" else ratio >= self.value

    def __str__(self) -> str:
        return f"{'≤' if self.op == '<=' else '≥'} {self.value:g}"


@dataclass(frozen=True)
class Comparison:
    """``ratio = sum(numerator) / sum(denominator)`` of fastest rounds, within one case.

    The fastest round, not the median: load from other processes only ever adds time, so the
    minimum is the closest to what the code itself costs. The same ratio of CPU times is
    reported beside it: steadier under load, but it counts a two-thread second twice, so where
    the two sides parallelise differently only the wall-clock ratio says what a user waits.
    """

    key: str
    title: str
    case: str
    numerator: tuple[str, ...]
    denominator: tuple[str, ...]
    target: Target | None = None


OURS_ROUTES = ("ours.sam_encoder", "ours.route_1_1", "ours.route_1_2")
REFERENCE_ROUTES = (
    "reference.predictor_encoder",
    "reference.route_1_1",
    "reference.automatic_mask_generator",
)
LOSS = ("ours.loss_forward", "ours.loss_backward")
STEP_PARTS = ("ours.module_forward", *LOSS, "ours.module_backward", "ours.optimizer_step")

COMPARISONS: tuple[Comparison, ...] = (
    Comparison(
        "routes_vs_segment_anything",
        "routes 1.1+1.2 on one SAM embedding ÷ SamPredictor + SamAutomaticMaskGenerator, time",
        "sam_routes",
        OURS_ROUTES,
        REFERENCE_ROUTES,
        Target("<=", 0.6),
    ),
    Comparison(
        "route_12_vs_automatic_mask_generator",
        "route 1.2 with its embedding ÷ SamAutomaticMaskGenerator (+ naming), time",
        "sam_routes",
        ("ours.sam_encoder", "ours.route_1_2"),
        ("reference.automatic_mask_generator",),
    ),
    Comparison(
        "sam2_vs_sam_automatic_masks",
        "SAM 2 hiera-small ÷ SAM, encoder + automatic masks, same grid and input side, time",
        "sam2_automatic_masks",
        ("ours.sam2_encoder", "ours.sam2_automatic_masks"),
        ("reference.sam_encoder", "reference.sam_automatic_masks"),
    ),
    Comparison(
        "sam3_batched_vs_one_call_per_class",
        "SAM 3 on K classes: batched prompts on one embedding ÷ one transformers call per class",
        "sam3_prompts",
        ("ours.batched_prompts",),
        ("reference.one_call_per_class",),
    ),
    Comparison(
        "clip_batched_vs_one_crop",
        "dense CLIP features batched ÷ one crop at a time, time",
        "clip_dense",
        ("ours.batched",),
        ("reference.one_crop_at_a_time",),
    ),
    Comparison(
        "cache_vs_bare_forward",
        "feature caching ÷ bare timm forward, throughput",
        "cache_features",
        ("reference.bare_forward",),
        ("ours.cache_features",),
        Target(">=", 0.9),
    ),
    Comparison(
        "inference_vs_bare_encoder",
        "inference per image ÷ bare encoder over the same windows, time",
        "inference",
        ("ours.segment",),
        ("reference.bare_encoder",),
        Target("<=", 1.15),
    ),
    Comparison(
        "onnxruntime_vs_torch",
        "exported image side on onnxruntime ÷ the same network in torch, same windows, time",
        "onnx_image_side",
        ("ours.onnxruntime",),
        ("reference.torch",),
    ),
    Comparison(
        "fusioner_vs_fmbseg_train_step",
        "Fusioner ÷ FMbSeg training step, same 5 images' cached grids, time",
        "fusioner_train_step",
        ("fusioner.whole_step",),
        ("fmbseg.whole_step",),
    ),
    Comparison(
        "fusioner_vs_fmbseg_inference",
        "Fusioner ÷ FMbSeg inference per image, same windows and K classes, time",
        "fusioner_inference",
        ("fusioner.segment",),
        ("fmbseg.segment",),
    ),
    Comparison(
        "fusioner_k_classes_vs_one",
        "Fusioner inference, K classes ÷ 1 class, time",
        "fusioner_inference",
        ("fusioner.segment",),
        ("fusioner.segment_one_class",),
    ),
    Comparison(
        "fmbseg_k_classes_vs_one",
        "FMbSeg inference, K classes ÷ 1 class, time",
        "fusioner_inference",
        ("fmbseg.segment",),
        ("fmbseg.segment_one_class",),
    ),
    Comparison(
        "loss_share_of_step",
        "loss forward+backward ÷ training step (5 images)",
        "train_step",
        LOSS,
        STEP_PARTS,
        Target("<=", 0.25),
    ),
)

SCALING_STAGES = {"scale_pseudolabel": "pseudo-labelling", "scale_features": "feature caching"}
LINEAR = Target("<=", 1.5)  # seconds per extra image, last step ÷ the step before
FLAT = Target("<=", 1.1)  # peak RSS at the largest N ÷ at the next largest


def summarise_case(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per measurement: every repeat's seconds, median, min, rate, peak memory."""
    units = result["info"].get("units", {})
    summary = {}
    for name, samples in result["samples"].items():
        seconds = [s["seconds"] for s in samples]
        median = statistics.median(seconds)
        device = [s["peak_device_mib"] for s in samples if s["peak_device_mib"] is not None]
        record: dict[str, Any] = {
            "seconds": seconds,
            "median_s": median,
            "min_s": min(seconds),
            "cpu_seconds": [s["cpu_seconds"] for s in samples],
            "min_cpu_s": min(s["cpu_seconds"] for s in samples),
            "peak_rss_mib": max(s["peak_rss_mib"] for s in samples),
            "rss_before_mib": min(s["rss_before_mib"] for s in samples),
            "peak_device_mib": max(device) if device else None,
        }
        if name in units:
            count, unit = units[name]
            fastest = min(seconds)
            record |= {"rate": count / fastest if fastest > 0 else None, "rate_unit": f"{unit}/s"}
        summary[name] = record
    return summary


def _status(ratio: float | None, target: Target | None, ran: bool) -> str:
    if ratio is None:
        return INCONCLUSIVE if ran else NOT_RUN
    if target is None:
        return INFO
    return MET if target.met(ratio) else MISSED


def compare(
    measurements: Mapping[str, Mapping[str, Mapping[str, Any]]],
    comparisons: Sequence[Comparison] = COMPARISONS,
) -> list[dict[str, Any]]:
    """Each comparison's ratio of summed medians, and its target's status."""
    rows = []
    for comparison in comparisons:
        case = measurements.get(comparison.case, {})
        ratios: dict[str, float | None] = {"min_s": None, "min_cpu_s": None}
        names = comparison.numerator + comparison.denominator
        if all(name in case for name in names):
            for field in ratios:
                top = sum(case[name][field] for name in comparison.numerator)
                bottom = sum(case[name][field] for name in comparison.denominator)
                ratios[field] = top / bottom if bottom > 0 else None
        row = _row(comparison.key, comparison.title, ratios["min_s"], comparison.target, bool(case))
        rows.append(row | {"cpu_ratio": ratios["min_cpu_s"]})
    return rows


def _row(
    key: str, title: str, ratio: float | None, target: Target | None, ran: bool
) -> dict[str, Any]:
    return {
        "key": key,
        "title": title,
        "ratio": ratio,
        "target": str(target) if target else None,
        "status": _status(ratio, target, ran),
    }


def scaling_checks(points: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Linear time: the cost of one more image stays put as N grows (fixed costs cancel in the
    differences). Flat memory: the peak does not grow from the next-largest N to the largest.
    Uses each N's fastest round, as :func:`compare` does."""
    rows = []
    for case, stage in SCALING_STAGES.items():
        series = sorted(points.get(case, []), key=lambda p: p["images"])
        linear = flat = None
        if len(series) >= 2:
            origin = {"images": 0, "min_s": 0.0}
            marginals = [
                (b["min_s"] - a["min_s"]) / (b["images"] - a["images"])
                for a, b in zip([origin, *series], series, strict=False)
            ]
            if marginals[-2] > 0 and marginals[-1] > 0:  # else noise outweighed the work
                linear = marginals[-1] / marginals[-2]
            flat = series[-1]["peak_rss_mib"] / series[-2]["peak_rss_mib"]
        ran = len(series) >= 2
        rows.append(
            _row(
                f"{case}_linear",
                f"{stage}: s per extra image, largest step ÷ previous",
                linear,
                LINEAR,
                ran,
            )
        )
        rows.append(
            _row(
                f"{case}_flat_memory",
                f"{stage}: peak RSS, largest N ÷ next largest",
                flat,
                FLAT,
                ran,
            )
        )
    return rows


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if value == 0 or abs(value) >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as the tables docs/benchmarks.md shows."""
    machine, device, versions = report["machine"], report["device"], report["versions"]
    shown = ", ".join(f"{name} {version}" for name, version in versions.items() if version)
    lines = [
        f"`{report['command']}`",
        "",
        f"- {machine['date']}; {machine['cpu']}, {machine['cores_usable']} usable cores "
        f"({machine['cores_logical']} logical), {machine['memory_gib']} GiB",
        f"- device: {device.get('type', '?')} ({device.get('name', '?')}), "
        f"{device.get('threads', '?')} torch threads, {report['options']['precision']}; "
        f"weights: {report['weights']}",
        f"- {shown}",
        f"- size `{report['options']['size']}`: {report['models']}; "
        f"up to {report['options']['repeats']} measured round(s) after "
        f"{report['options']['warmup']} warm-up; ratios use each measurement's fastest round; "
        f"memory: {report['memory_method']}",
        "",
        "| case | measurement | rounds | median s | min s | rate | peak RSS MiB |"
        + (" peak GPU MiB |" if device.get("type") == "cuda" else ""),
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if device.get("type") == "cuda" else ""),
    ]
    for case, result in report["cases"].items():
        if result.get("error"):
            lines.append(f"| {case} | **failed**: {result['error']} | | | | | |")
            continue
        for name, m in result["measurements"].items():
            rate = f"{_number(m.get('rate'))} {m['rate_unit']}" if m.get("rate") else "–"
            row = (
                f"| {case} | {name} | {len(m['seconds'])} | {_number(m['median_s'])} "
                f"| {_number(m['min_s'])} | {rate} "
                f"| {_number(m['peak_rss_mib'])} |"
            )
            if device.get("type") == "cuda":
                row += f" {_number(m['peak_device_mib'])} |"
            lines.append(row)
    lines += [
        "",
        "| comparison | ratio | CPU-time ratio | target | status |",
        "|---|---:|---:|---|---|",
    ]
    for row in report["comparisons"]:
        lines.append(
            f"| {row['title']} | {_number(row['ratio'])} | {_number(row.get('cpu_ratio'))} "
            f"| {row['target'] or '–'} | {row['status']} |"
        )
    scaling = report.get("scaling", {})
    if scaling:
        lines += [
            "",
            "| scaling | images | rounds | min s | s/image | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for case, series in scaling.items():
            for point in series:
                if point.get("error"):
                    lines.append(
                        f"| {SCALING_STAGES[case]} | {point['images']} | **failed** | | | |"
                    )
                    continue
                lines.append(
                    f"| {SCALING_STAGES[case]} | {point['images']} | {len(point['seconds'])} "
                    f"| {_number(point['min_s'])} | {_number(point['min_s'] / point['images'])} "
                    f"| {_number(point['peak_rss_mib'])} |"
                )
    return "\n".join(lines) + "\n"
