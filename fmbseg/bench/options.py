"""What a benchmark run is asked to do, and the ``fmbseg bench`` arguments that say it.

Standard library only: the CLI builds every sub-command's arguments on each start, so this
module must not import numpy, torch or the model code (the harness checks the names below
against the real presets and cases).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fmbseg.errors import ConfigError

SIZES = ("tiny", "small", "quickstart", "paper")
CASE_NAMES = (
    "clip_dense",
    "sam_routes",
    "masks",
    "cache_features",
    "train_step",
    "inference",
    "onnx_image_side",
    "pixelclip_step",
    "fusioner_train_step",
    "fusioner_inference",
    "sam2_automatic_masks",
    "sam3_prompts",
)
SCALING_CASE_NAMES = ("scale_pseudolabel", "scale_features")
ALL_CASES = (*CASE_NAMES, *SCALING_CASE_NAMES)
DEFAULT_SCALE = (10, 100, 1000)
DEFAULT_REPEATS = 3
QUICK_BUDGET_S = 30.0


@dataclass(frozen=True)
class BenchOptions:
    size: str = "small"
    # Measured rounds stop after QUICK_BUDGET_S per case; smaller SAM grid and image sets.
    quick: bool = False
    repeats: int = DEFAULT_REPEATS  # measured rounds (at most, with ``quick``)
    warmup: int = 1
    device: str = "cpu"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    threads: int | None = None  # torch threads in the workers; default: torch's own choice
    cases: tuple[str, ...] = ALL_CASES
    scale: tuple[int, ...] = DEFAULT_SCALE
    out_dir: Path = Path("outputs/bench")
    timeout_s: float = 1800.0  # per worker process

    @property
    def budget_s(self) -> float | None:
        return QUICK_BUDGET_S if self.quick else None

    def command_line(self) -> str:
        """The ``fmbseg bench`` call that reproduces this run."""
        parts = ["fmbseg bench", f"--size {self.size}"]
        parts += ["--quick"] if self.quick else []
        parts += [f"--repeats {self.repeats}"] if self.repeats != DEFAULT_REPEATS else []
        parts += [f"--warmup {self.warmup}"] if self.warmup != 1 else []
        parts += [f"--device {self.device}"] if self.device != "cpu" else []
        parts += [f"--precision {self.precision}"] if self.precision != "fp32" else []
        parts += [f"--threads {self.threads}"] if self.threads else []
        parts += [f"--cases {','.join(self.cases)}"] if self.cases != ALL_CASES else []
        parts += (
            [f"--scale {','.join(map(str, self.scale))}"] if self.scale != DEFAULT_SCALE else []
        )
        return " ".join(parts)

    def check(self) -> None:
        """Refuse impossible options before any process is started."""
        if self.size not in SIZES:
            raise ConfigError(f"bench: unknown size {self.size!r} (sizes: {', '.join(SIZES)})")
        unknown = sorted(set(self.cases) - set(ALL_CASES))
        if unknown:
            raise ConfigError(f"bench: unknown case(s) {unknown} (cases: {', '.join(ALL_CASES)})")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError("bench: --repeats must be at least 1 and --warmup at least 0")
        if any(n < 1 for n in self.scale) or len(set(self.scale)) < 2:
            raise ConfigError("bench: --scale needs at least two different positive image counts")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fmbseg bench`` options."""
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="small",
        help="models: tiny (tests), small (CPU: CLIP B/32, SAM vit_b at 512 px, DINOv2 S/14), "
        "quickstart (small with SAM vit_b at 1024 px), paper (GPU: CLIP L/14, SAM vit_h, "
        "DINOv2 L/14); default %(default)s",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"stop measuring a case after {QUICK_BUDGET_S:.0f} s (at least one round); "
        "smaller SAM grid and image sets",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="measured rounds per case (default %(default)s)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="unrecorded rounds first (default %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument(
        "--cases", default=None, help=f"comma-separated subset of: {', '.join(ALL_CASES)}"
    )
    parser.add_argument(
        "--scale",
        default=",".join(map(str, DEFAULT_SCALE)),
        help="image counts of the scaling cases (default %(default)s)",
    )
    parser.add_argument("--out", default="outputs/bench", help="folder for bench.json, bench.md")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds allowed per worker process"
    )


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    try:
        scale = tuple(int(n) for n in args.scale.split(","))
    except ValueError:
        raise ConfigError(
            f"bench: --scale {args.scale!r}: expected numbers like 10,100,1000"
        ) from None
    return BenchOptions(
        size=args.size,
        quick=args.quick,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        cases=tuple(args.cases.split(",")) if args.cases else ALL_CASES,
        scale=scale,
        out_dir=Path(args.out),
        timeout_s=args.timeout,
    )
