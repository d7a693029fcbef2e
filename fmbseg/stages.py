"""One entry point per pipeline stage: arguments -> typed params -> library call -> summary.

``dvc.yaml`` stages, Prefect tasks and users all run these through the ``fmbseg`` command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fmbseg.commands import params_from_args
from fmbseg.errors import InputError
from fmbseg.models.vocabulary import validate_vocabulary


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """A UTF-8 text file with one class name per line; blank lines are skipped."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{file}: class-name file not found") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return validate_vocabulary(line for line in lines if line.strip())
    except InputError as exc:
        raise InputError(f"{file}: {exc}") from None


def read_image_labels(path: str | Path) -> dict[str, list[str]]:
    """Image-level labels for the semi-supervised variant: JSON ``{image_id: [class, ...]}``."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{file}: cannot read image labels ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()
    ):
        raise InputError(f"{file}: expected a JSON object mapping image ids to lists of class names")
    return data


def parse_worker(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not int(index) < int(count):
        raise InputError(f"--worker {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(index), int(count)


def _print(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2, ensure_ascii=False))


def pseudolabel(args: argparse.Namespace) -> int:
    from fmbseg.pseudolabel.stage import run_pseudolabel

    vocabulary = read_class_names(args.vocabulary)
    params = params_from_args(args)
    summary = run_pseudolabel(
        params,
        args.images,
        vocabulary,
        args.out,
        image_labels=read_image_labels(args.image_labels) if args.image_labels else None,
        limit=args.limit,
        worker=parse_worker(args.worker),
    )
    summary.pop("failed_images")
    _print(summary)
    return 0


def merge(args: argparse.Namespace) -> int:
    from fmbseg.pseudolabel.merge import run_merge

    summary = run_merge(params_from_args(args).merge, args.pseudolabels, args.out)
    summary.pop("class_pixels")
    _print(summary)
    return 0


def cache_features(args: argparse.Namespace) -> int:
    from fmbseg.align.features import run_cache_features

    summary = run_cache_features(
        params_from_args(args), args.images, args.labels, args.out, limit=args.limit
    )
    _print(summary)
    return 0


def train(args: argparse.Namespace) -> int:
    from fmbseg.align.train import run_train

    _print(run_train(params_from_args(args), args.features, args.out))
    return 0
