"""Small CLI commands that belong to no pipeline stage, and helpers every command shares."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fmbseg.config import Params, load_params, to_yaml

DEFAULT_PARAMS = Path("params.yaml")


def params_from_args(args: argparse.Namespace) -> Params:
    """``--params`` if given, else ./params.yaml when present, else defaults; then ``-S``."""
    path = (
        Path(args.params) if args.params else (DEFAULT_PARAMS if DEFAULT_PARAMS.is_file() else None)
    )
    return load_params(path, args.overrides)


def class_names_argument(value: str) -> tuple[str, ...]:
    """``--classes`` is a comma-separated list, or a class-name file."""
    from fmbseg.models.vocabulary import read_vocabulary_file, validate_vocabulary

    if Path(value).is_file():
        return read_vocabulary_file(value)
    return validate_vocabulary(value.split(","))


def show_config(args: argparse.Namespace) -> int:
    print(to_yaml(params_from_args(args)), end="")
    return 0


def promote(args: argparse.Namespace) -> int:
    """Move `champion` to `candidate` only when the candidate's mean mIoU is strictly better."""
    import json

    from fmbseg.registry import promote as promote_version

    datasets = (
        args.datasets.split(",") if args.datasets else list(params_from_args(args).data.evaluate)
    )
    result = promote_version(args.name, datasets)
    print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return 0


def lineage(args: argparse.Namespace) -> int:
    from fmbseg.lineage import format_lineage
    from fmbseg.lineage import lineage as model_lineage

    record = model_lineage(args.model)
    if args.json:
        import json

        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        print(format_lineage(record))
    return 0


def export(args: argparse.Namespace) -> int:
    import json

    from fmbseg.export import export_onnx

    record = export_onnx(
        params_from_args(args), args.model, class_names_argument(args.classes), args.out
    )
    print(json.dumps({key: record[key] for key in ("method", "vocabulary", "files")}, indent=2))
    return 0
