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


def _restart_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="replace outputs made with other inputs or params instead of refusing",
    )


def _pseudolabel_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--images", required=True, help="folder of unlabelled images")
    parser.add_argument("--vocabulary", required=True, help="text file, one class name per line")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument(
        "--image-labels",
        default=None,
        help="JSON {image_id: [class, ...]}: semi-supervised variant",
    )
    parser.add_argument("--worker", default="0/1", help="I/N: process every N-th shard from I")
    _restart_argument(parser)


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
    _restart_argument(parser)


def _masks_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--images", required=True, help="folder of the training images")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument(
        "--pseudolabels", default=None, help="a finished pseudolabel run: its route 1.2 is reused"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    _restart_argument(parser)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--features", default=None, help="a finished feature cache")
    parser.add_argument("--images", default=None, help="folder of the training images")
    parser.add_argument("--labels", default=None, help="a finished merge folder (label maps)")
    parser.add_argument("--masks", default=None, help="a finished class-agnostic mask folder")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, model)")
    _restart_argument(parser)


def _download_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", help="a benchmark (voc21, ade20k, ...) or demo set (demo_train, demo_voc)"
    )
    parser.add_argument("--root", default="data", help="datasets folder (default: %(default)s)")
    parser.add_argument("--base-url", default=None, help="a mirror serving the archives")


def _manifest_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--dataset", required=True, help="a dataset folder (images/<split>/...)")
    parser.add_argument("--split", action="append", required=True, help="split(s) to list")
    parser.add_argument("--out", required=True, help="output folder")


DEFAULT_MODEL = "outputs/model/module.safetensors"


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument("--classes", required=True, help='"cat,dog,grass" or a file, one per line')
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="trained model folder or MLflow URI (models:/fmbseg@champion)",
    )
    parser.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--background", help="the class that stands for background (inference.background rule)"
    )


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="the page's default model (file, folder or URI)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=7860,
        help="port on 127.0.0.1, 0 = any free (default: %(default)s)",
    )


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="trained model or MLflow URI")
    parser.add_argument("--classes", required=True, help='"cat,dog,grass" or a file, one per line')
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="(default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder (replaced whole)")


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--dataset", required=True, help="a benchmark name or a dataset folder")
    parser.add_argument("--split", default="val", help="split (default: %(default)s)")
    parser.add_argument("--root", default=None, help="datasets folder (default: data.root)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="module file or MLflow URI")
    parser.add_argument(
        "--pseudolabels", default=None, help="score a merge folder instead (Stage 1 alone)"
    )
    parser.add_argument("--out", required=True, help="output folder for metrics and plots")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument(
        "--protocol",
        choices=("tcl", "sclip", "pascal5i", "coco20i", "mosaic4"),
        default=None,
        help="evaluation protocol (default: inference.protocol; docs/method.md); pascal5i, "
        "coco20i, mosaic4: Fusioner's 1-way episodes",
    )
    parser.add_argument("--fold", type=int, default=None, help="pascal5i/coco20i fold (0-3)")
    parser.add_argument("--mosaics", type=int, default=1000, help="mosaic4: how many (seed 0)")


def _register_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument("--model", required=True, help="a training output folder")
    parser.add_argument("--evaluations", required=True, help="folder of <dataset>/metrics.json")
    parser.add_argument(
        "--name", default="fmbseg", help="registered model name (default: %(default)s)"
    )
    parser.add_argument("--out", required=True, help="JSON record of the new version")


def _promote_arguments(parser: argparse.ArgumentParser) -> None:
    _params_arguments(parser)
    parser.add_argument(
        "--name", default="fmbseg", help="registered model name (default: %(default)s)"
    )
    parser.add_argument("--datasets", default=None, help="comma-separated (default: data.evaluate)")


def _lineage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="models:/fmbseg@champion, models:/fmbseg/3, ...")
    parser.add_argument("--json", action="store_true", help="all of it as JSON")


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from fmbseg.bench.options import add_arguments

    add_arguments(parser)


COMMANDS: tuple[Command, ...] = (
    Command(
        "config",
        "print the resolved params (defaults <- file <- -S)",
        "fmbseg.commands:show_config",
    ),
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
        "masks",
        "class-agnostic masks of every image (SAM or DINO k-means) for methods that train on them",
        "fmbseg.stages:masks",
        _masks_arguments,
    ),
    Command(
        "train",
        "Stage 2: train the method train.method names (resumes from its last checkpoint)",
        "fmbseg.stages:train",
        _train_arguments,
    ),
    Command(
        "download",
        "get a dataset into the folder layout",
        "fmbseg.stages:download",
        _download_arguments,
    ),
    Command(
        "manifest",
        "list a dataset split's images (decoded once)",
        "fmbseg.stages:manifest",
        _manifest_arguments,
    ),
    Command(
        "predict",
        "segment images with any class names (label and overlay PNGs)",
        "fmbseg.stages:predict",
        _predict_arguments,
    ),
    Command(
        "demo",
        "a local web page: upload an image, type classes, see and download the segmentation",
        "fmbseg.web.app:command",
        _demo_arguments,
    ),
    Command(
        "evaluate", "mIoU on a labelled dataset", "fmbseg.stages:evaluate", _evaluate_arguments
    ),
    Command(
        "register",
        "register the trained module in MLflow (alias: candidate)",
        "fmbseg.stages:register",
        _register_arguments,
    ),
    Command(
        "promote",
        "move the champion alias to the candidate if its mIoU is better",
        "fmbseg.commands:promote",
        _promote_arguments,
    ),
    Command(
        "lineage", "what produced a registered model", "fmbseg.commands:lineage", _lineage_arguments
    ),
    Command(
        "export",
        "export a trained model's image side and a vocabulary for onnxruntime (no torch)",
        "fmbseg.commands:export",
        _export_arguments,
    ),
    Command(
        "bench",
        "measure the stages on this machine, as ratios against reference code",
        "fmbseg.bench.harness:command",
        _bench_arguments,
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
    # Other libraries speak at WARNING and above; fmbseg's own progress at INFO unless --quiet.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fmbseg").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from fmbseg.environment import apply_quiet_defaults
    from fmbseg.errors import FmbsegError, UnavailableError

    apply_quiet_defaults()
    try:
        return _run(args.target, args)
    except FmbsegError as exc:
        if args.debug:
            raise
        retry = f" [exit status {exc.exit_code}: a retry can succeed once the server answers]"
        print(f"error: {exc}{retry if isinstance(exc, UnavailableError) else ''}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        from fmbseg.extras import missing_extra_message

        message = missing_extra_message(exc, args.command)
        if message is None or args.debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
