"""One entry point per pipeline stage: arguments -> typed params -> library call -> summary.

``dvc.yaml`` stages, Prefect tasks and users all run these through the ``fmbseg`` command.
Each stage is one MLflow run (see :mod:`fmbseg.tracking`: params, numeric summary values as
metrics, weight provenance and input hashes as tags, small reports as artifacts); the data
gates run at the end of the stage whose output they check and stop the pipeline on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fmbseg.commands import class_names_argument, params_from_args
from fmbseg.config import Params
from fmbseg.errors import InputError
from fmbseg.models.vocabulary import read_vocabulary_file


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
        raise InputError(
            f"{file}: expected a JSON object mapping image ids to lists of class names"
        )
    return data


def parse_worker(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not int(index) < int(count):
        raise InputError(f"--worker {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(index), int(count)


def _print(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2, ensure_ascii=False))


def _numbers(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric values of a summary, nested keys joined with dots (booleans left out)."""
    found: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            found |= _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool) and value == value:
            found[f"{prefix}{key}"] = float(value)
    return found


@contextlib.contextmanager
def _tracked(
    stage: str,
    params: Params,
    inputs: Sequence[str | Path],
    outputs: Sequence[str | Path] = (),
) -> Iterator[Any]:
    """The stage's MLflow run; ``outputs`` are the paths later stages read (their hashes link
    a consumer's run to its producer's, see fmbseg.lineage)."""
    from fmbseg.tracking import stage_run

    with stage_run(
        stage,
        params,
        inputs=[str(path) for path in inputs],
        outputs=[str(path) for path in outputs],
    ) as run:
        yield run


def _record(run: Any, summary: dict[str, Any], artifacts: Sequence[Path] = ()) -> None:
    """Summary numbers as metrics, ``provenance`` as weight tags, existing files as artifacts."""
    run.log_metrics(_numbers({k: v for k, v in summary.items() if k != "provenance"}))
    run.set_tags({f"weights.{role}": tag for role, tag in summary.get("provenance", {}).items()})
    for path in artifacts:
        if path.is_file():
            run.log_artifact(path)


def _gate(run: Any, report: Any, out_dir: Path) -> None:
    """Write the gate's report, attach it to the run, and stop the stage if the gate failed."""
    from fmbseg.gates import run_gate

    try:
        run_gate(report, out_dir)
    finally:
        for path in sorted(out_dir.glob(f"{report.gate}.*")):
            run.log_artifact(path, "gates")


def pseudolabel(args: argparse.Namespace) -> int:
    from fmbseg.pseudolabel.stage import run_pseudolabel

    vocabulary = read_vocabulary_file(args.vocabulary)
    params = params_from_args(args)
    with _tracked("pseudolabel", params, [args.images, args.vocabulary], [args.out]) as run:
        summary = run_pseudolabel(
            params,
            args.images,
            vocabulary,
            args.out,
            image_labels=read_image_labels(args.image_labels) if args.image_labels else None,
            limit=args.limit,
            worker=parse_worker(args.worker),
            restart_if_changed=args.restart_if_changed,
        )
        summary.pop("failed_images")
        _record(run, summary, [Path(args.out) / "summary.json"])
    _print(summary)
    return 0


def merge(args: argparse.Namespace) -> int:
    from fmbseg.gates import check_pseudolabels
    from fmbseg.pseudolabel.merge import run_merge

    params = params_from_args(args)
    out = Path(args.out)
    with _tracked("merge", params, [args.pseudolabels], [out]) as run:
        summary = run_merge(params.merge, args.pseudolabels, out)
        summary.pop("class_pixels")
        _record(run, summary)
        _gate(run, check_pseudolabels(args.pseudolabels, out, params.gates), out / "gates")
    _print(summary)
    return 0


def cache_features(args: argparse.Namespace) -> int:
    from fmbseg.align.features import run_cache_features
    from fmbseg.gates import check_features

    params = params_from_args(args)
    out = Path(args.out)
    with _tracked("features", params, [args.images, args.labels], [out]) as run:
        summary = run_cache_features(
            params,
            args.images,
            args.labels,
            out,
            limit=args.limit,
            restart_if_changed=args.restart_if_changed,
        )
        summary["provenance"] = {"encoder": summary["encoder"]["tag"]}
        _record(run, summary)
        _gate(run, check_features(out, params.gates), out / "gates")
    _print(summary)
    return 0


def masks(args: argparse.Namespace) -> int:
    """Class-agnostic masks for the method ``train.method`` names (a marker when it needs none)."""
    from fmbseg.pseudolabel.agnostic import run_masks

    params = params_from_args(args)
    inputs = [args.images, *([args.pseudolabels] if args.pseudolabels else [])]
    with _tracked("masks", params, inputs, [args.out]) as run:
        summary = run_masks(
            params,
            args.images,
            args.out,
            pseudolabels=args.pseudolabels,
            limit=args.limit,
            restart_if_changed=args.restart_if_changed,
        )
        summary.pop("failed_images", None)
        run.set_tags({"fmbseg.mask_source": summary.get("source", "none")})
        _record(run, summary, [Path(args.out) / "summary.json"])
    _print(summary)
    return 0


def train(args: argparse.Namespace) -> int:
    """Train the Stage 2 method ``train.method`` names on what the earlier stages produced."""
    from fmbseg.methods import TrainInputs, get_method

    params = params_from_args(args)
    method = get_method(params.train.method)
    inputs = TrainInputs(
        **{
            name: Path(value)
            for name in ("features", "images", "labels", "masks")
            if (value := getattr(args, name)) is not None
        }
    )
    out = Path(args.out)
    given = [str(path) for path in vars(inputs).values() if path is not None]
    with _tracked("train", params, given, [out, out / "module.safetensors"]) as run:
        run.set_tags({"fmbseg.method": method.name})

        def log_epoch(record: dict[str, Any]) -> None:
            run.log_metrics(_numbers(record), step=int(record["epoch"]))

        metrics = method.train(
            params,
            inputs,
            out,
            on_epoch=log_epoch,
            restart_if_changed=args.restart_if_changed,
        )
        if "mask_source" in metrics:  # methods trained on class-agnostic masks (PixelCLIP)
            run.set_tags({"fmbseg.mask_source": str(metrics["mask_source"])})
        _record(
            run,
            metrics,
            [out / name for name in ("metrics.json", "loss.csv", "loss.png", "model.json")],
        )
    _print(metrics)
    return 0


def download(args: argparse.Namespace) -> int:
    """A benchmark (download, verify, extract, convert) or a demo set (built offline)."""
    import shutil
    import tempfile

    from fmbseg.datasets.download import run_download
    from fmbseg.demo import DEMO_BUILDERS

    root = Path(args.root)
    if args.name not in DEMO_BUILDERS:
        _print(run_download(args.name, root, base_url=args.base_url))
        return 0
    target = root / args.name
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=root, prefix=f".{args.name}."))
        try:
            DEMO_BUILDERS[args.name](building)
            building.rename(target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    _print({"name": args.name, "path": str(target)})
    return 0


def manifest(args: argparse.Namespace) -> int:
    """The image table of the training split, gated, and the vocabulary to pseudo-label with."""
    from fmbseg.gates import check_manifest
    from fmbseg.manifest import (
        build_manifest,
        training_vocabulary,
        write_manifest,
        write_vocabulary,
    )

    params = params_from_args(args)
    out = Path(args.out)
    vocabulary = training_vocabulary(args.dataset, params.data.vocabulary)
    with _tracked("manifest", params, [args.dataset], [out, out / "classes.txt"]) as run:
        columns = build_manifest(args.dataset, args.split, params.pseudolabel.max_image_pixels)
        path = write_manifest(columns, out)
        write_vocabulary(vocabulary, out)
        summary = {
            "images": len(columns["image_id"]),
            "undecodable": columns["decodable"].count(False),
            "classes": len(vocabulary),
        }
        _record(run, summary)
        _gate(run, check_manifest(path, params.gates), out / "gates")
    _print(summary | {"manifest": str(path)})
    return 0


def predict(args: argparse.Namespace) -> int:
    from fmbseg.predict import run_predict

    summary = run_predict(
        params_from_args(args),
        args.inputs,
        class_names_argument(args.classes),
        args.model,
        args.out,
        background=args.background,
    )
    _print(summary)
    if summary["failed"]:
        failed = summary["failed"]
        print(
            f"error: {len(failed)} of {len(failed) + summary['images']} images failed: "
            + "; ".join(failed.values()),
            file=sys.stderr,
        )
        return 1
    return 0


def _dataset_folder(args: argparse.Namespace, params: Params) -> Path:
    """``--dataset``: a folder, or a name under ``--root`` (default ``data.root``)."""
    dataset = Path(args.dataset)
    if not dataset.is_dir():
        dataset = Path(args.root or params.data.root) / args.dataset
    if dataset.is_dir():
        return dataset
    from fmbseg.datasets.registry import list_datasets
    from fmbseg.demo import DEMO_BUILDERS

    known = sorted([*list_datasets(), *DEMO_BUILDERS])
    if args.dataset not in known:
        raise InputError(
            f"unknown dataset {args.dataset!r} (known: {', '.join(known)}, or a folder)"
        )
    raise InputError(f"{dataset}: not downloaded yet; run: fmbseg download {args.dataset}")


def evaluate_episodes(args: argparse.Namespace) -> int:
    """Fusioner's 1-way episode protocols on a dataset folder (mosaic4: a class-folder set)."""
    from fmbseg.evaluation.episodes import run_episodes

    params = params_from_args(args)
    dataset = _dataset_folder(args, params)
    out = Path(args.out)
    with _tracked("evaluate", params, [dataset, args.model], [out]) as run:
        run.set_tags({"fmbseg.dataset": dataset.name, "fmbseg.protocol": args.protocol})
        metrics = run_episodes(
            params,
            dataset,
            out,
            protocol=args.protocol,
            model=args.model,
            fold=args.fold,
            split=args.split,
            limit=args.limit,
            mosaics=args.mosaics,
        )
        _record(
            run, {k: metrics[k] for k in ("mIoU", "FB-IoU", "episodes")}, [out / "metrics.json"]
        )
    _print({k: metrics[k] for k in ("mIoU", "FB-IoU", "episodes", "protocol", "fold")})
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from fmbseg.evaluate import run_evaluate
    from fmbseg.evaluation.episodes import EPISODE_PROTOCOLS

    if args.protocol in EPISODE_PROTOCOLS:
        return evaluate_episodes(args)
    if args.protocol:
        args.overrides = [*args.overrides, f"inference.protocol={args.protocol}"]
    params = params_from_args(args)
    dataset = _dataset_folder(args, params)
    out = Path(args.out)
    source = args.pseudolabels or args.model
    with _tracked("evaluate", params, [dataset, source], [out]) as run:
        run.set_tags({"fmbseg.dataset": dataset.name, "fmbseg.evaluated": str(source)})
        metrics = run_evaluate(
            params,
            dataset,
            out,
            split=args.split,
            model=None if args.pseudolabels else args.model,
            pseudolabels=args.pseudolabels,
            limit=args.limit,
        )
        run.set_tags(
            {
                "fmbseg.protocol": metrics["protocol"],
                "fmbseg.background_rule": metrics["background_rule"],
            }
        )
        _record(
            run,
            {key: metrics[key] for key in ("mIoU", "pixel_accuracy", "images", "provenance")},
            [
                out / name
                for name in ("metrics.json", "per_class.csv", "per_class.png", "confusion.png")
            ],
        )
    _print({key: metrics[key] for key in ("mIoU", "pixel_accuracy", "images")})
    return 0


def register(args: argparse.Namespace) -> int:
    """Register the trained module with its per-dataset mIoU; the new version is `candidate`."""
    from fmbseg.io.atomic import write_text_atomic
    from fmbseg.registry import register_module

    params = params_from_args(args)
    files = sorted(Path(args.evaluations).glob("*/metrics.json"))
    evaluation = {
        path.parent.name: json.loads(path.read_text(encoding="utf-8"))["mIoU"] for path in files
    }
    evaluated = [path.parent for path in files]
    with _tracked("register", params, [args.model, *evaluated]) as run:
        version = register_module(
            args.model, params=params, name=args.name, evaluation=evaluation, run_id=run.run_id
        )
    record = {"name": args.name, "version": version, "alias": "candidate", "mIoU": evaluation}
    write_text_atomic(args.out, json.dumps(record, indent=2))
    _print(record)
    return 0
