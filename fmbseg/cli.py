"""The ``fmbseg`` command.

Sub-commands are declared here with their arguments and run by a function named as
``module:function``, imported only when that sub-command runs, so ``fmbseg --help`` stays
fast. Errors meant for users (:class:`FmbsegError`) print as one line; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fmbseg import __version__


def _params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", default=None, help="params file (default: ./params.yaml when present)"
    )
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one param (repeatable), e.g. -S models.device=cuda",
    )


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    target: str  # "module:function", called with the parsed arguments
    arguments: Callable[[argparse.ArgumentParser], None] = _params_arguments


def _pseudolabel_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--images", required=True, help="folder of unlabelled images")
    parser.add_argument("--vocabulary", required=True, help="text file, one class name per line")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument(
        "--image-labels", default=None, help="JSON {image_id: [class, ...]}: semi-supervised variant"
    )
    parser.add_argument("--worker", default="0/1", help="I/N: process every N-th shard from I")


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--pseudolabels", required=True, help="a finished pseudolabel folder")
    parser.add_argument("--out", required=True, help="output folder for label maps")


def _features_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--images", required=True, help="folder of the training images")
    parser.add_argument("--labels", required=True, help="a finished merge folder (label maps)")
    parser.add_argument("--out", required=True, help="output folder for feature shards")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--features", required=True, help="a finished feature cache")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, module)")


COMMANDS: tuple[Command, ...] = (
    Command("config", "print the resolved params (defaults <- file <- -S)", "fmbseg.commands:show_config"),
    Command(
        "pseudolabel",
        "Stage 1: CLIP+SAM pseudo-labels (routes 1.1 and 1.2) for a folder of images",
        "fmbseg.stages:pseudolabel",
        _pseudolabel_arguments,
    ),
    Command(
        "merge",
        "Stage 1: subsample route 1.2, merge with 1.1 into label maps",
        "fmbseg.stages:merge",
        _merge_arguments,
    ),
    Command(
        "cache-features",
        "Stage 2: frozen-encoder patch features and patch pseudo-labels, sharded",
        "fmbseg.stages:cache_features",
        _features_arguments,
    ),
    Command(
        "train",
        "Stage 2: train the alignment module (resumes from the last epoch checkpoint)",
        "fmbseg.stages:train",
        _train_arguments,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmbseg",
        description="Annotation-free, open-vocabulary semantic segmentation (FMbSeg).",
    )
    parser.add_argument("--version", action="version", version=f"fmbseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.arguments(sub)
        sub.set_defaults(target=command.target)
    return parser


def _run(target: str, args: argparse.Namespace) -> int:
    module, _, function = target.partition(":")
    result = getattr(importlib.import_module(module), function)(args)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from fmbseg.environment import apply_quiet_defaults
    from fmbseg.errors import FmbsegError

    apply_quiet_defaults()
    try:
        return _run(args.target, args)
    except FmbsegError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
