"""Small CLI commands that belong to no pipeline stage, and helpers every command shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from fmbseg.config import Params, load_params, to_yaml

DEFAULT_PARAMS = Path("params.yaml")


def params_from_args(args: argparse.Namespace) -> Params:
    """``--params`` if given, else ./params.yaml when present, else defaults; then ``-S``."""
    path = Path(args.params) if args.params else (DEFAULT_PARAMS if DEFAULT_PARAMS.is_file() else None)
    return load_params(path, args.overrides)


def show_config(args: argparse.Namespace) -> int:
    print(to_yaml(params_from_args(args)), end="")
    return 0
