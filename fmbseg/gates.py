"""Data gates between pipeline stages: great-expectations suites over tables built from each
stage's outputs, so a bad manifest, pseudo-label run or feature cache stops the pipeline before
the next (expensive) stage trains on it.

Each check builds small pandas tables, validates them in an ephemeral great-expectations
context (nothing is written to disk by GE, no progress bars) and returns a :class:`GateReport`;
:func:`run_gate` writes the report (JSON and Markdown) and raises :class:`GateFailed` when any
expectation failed. great_expectations is imported lazily: importing it costs seconds.

Tables per gate:

- manifest: the manifest itself (one row per image file);
- pseudolabels: ``masks``, one row per (shard, class id, route) with the extremes of that
  group's scores and area fractions (bounds hold for every mask iff they hold for the
  extremes, and memory stays at one shard's masks), and ``images``, one row per image of the
  run with its read / merged status and merged labelled fraction;
- features: ``shards``, one row per shard with the loader's verification outcome, and
  ``images``, one row per cached image with its labelled patch fraction.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.config import GatesConfig
from fmbseg.errors import FmbsegError, InputError
from fmbseg.io.atomic import write_text_atomic

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from great_expectations.core.expectation_validation_result import (
        ExpectationValidationResult,
    )
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.expectations import Expectation

MANIFEST_COLUMNS = ("image_id", "path", "split", "width", "height", "decodable", "error", "bytes")
PARAM = "param"
"""Key of an expectation's ``meta`` (and of its report details) naming the params.yaml key that
sets its bound, so a failed report says what to change."""


def _set_by(key: str) -> dict[str, str]:
    return {PARAM: f"gates.{key}"}


@dataclass(frozen=True)
class ExpectationResult:
    """One expectation's outcome: ``observed`` is what was measured, ``details`` the rule and
    the offending rows (up to ``max_listed``)."""

    expectation: str
    success: bool
    observed: Any
    details: dict[str, Any]


@dataclass(frozen=True)
class GateReport:
    gate: str
    source: str
    results: tuple[ExpectationResult, ...]

    @property
    def success(self) -> bool:
        return bool(self.results) and all(result.success for result in self.results)

    @property
    def failed(self) -> list[str]:
        return [result.expectation for result in self.results if not result.success]

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "source": self.source,
            "success": self.success,
            "failed": self.failed,
            "results": [
                {
                    "expectation": r.expectation,
                    "success": r.success,
                    "observed": r.observed,
                    "details": r.details,
                }
                for r in self.results
            ],
        }


class GateFailed(FmbsegError):
    """A data gate found outputs that break its expectations; the report says which rows."""

    def __init__(self, gate: str, failed: Sequence[str], report_path: Path) -> None:
        self.gate = gate
        self.failed = list(failed)
        self.report_path = report_path
        super().__init__(f"gate {gate!r} failed: {', '.join(failed)}; see {report_path}")


# --- great-expectations plumbing -----------------------------------------------------------------


def _context() -> AbstractDataContext:
    """A fresh in-memory context (cheap once GE is imported): nothing persists, nothing prints."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _plain(value: Any) -> Any:
    """GE results hold numpy scalars and NaN; reports are strict JSON."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _name(table: str, kwargs: dict[str, Any], kind: str) -> str:
    columns = kwargs.get("column") or ",".join(
        str(kwargs[key]) for key in ("column_A", "column_B") if key in kwargs
    )
    return f"{table}.{kind}" + (f"({columns})" if columns else "")


def _exception_messages(info: dict[str, Any]) -> list[str]:
    """GE reports an expectation's exception either directly or per failing metric."""
    entries = [info] if "raised_exception" in info else list(info.values())
    return sorted(
        {str(entry["exception_message"]) for entry in entries if entry.get("raised_exception")}
    )


def _outcome(
    table: str,
    result: ExpectationValidationResult,
    frame: pd.DataFrame,
    row_ids: Sequence[str],
    max_listed: int,
) -> ExpectationResult:
    config = result.expectation_config
    kwargs = {key: value for key, value in config.kwargs.items() if key != "batch_id"}
    measured = result.result or {}
    details: dict[str, Any] = {"rule": config.description, "kwargs": _plain(kwargs)}
    if PARAM in (config.meta or {}):
        details[PARAM] = config.meta[PARAM]
    if "observed_value" in measured:
        observed: Any = _plain(measured["observed_value"])
    elif "unexpected_count" in measured:
        observed = {
            "unexpected": _plain(measured["unexpected_count"]),
            "of": _plain(measured["element_count"]),
            "values": _plain(measured.get("partial_unexpected_list", [])),
        }
        details["rows"] = _plain(measured.get("partial_unexpected_index_list", []))
    else:
        observed = None
    errors = _exception_messages(result.exception_info or {})
    if errors:
        details["errors"] = errors
    success = bool(result.success) and not errors
    if not success and not details.get("rows"):
        rows = _extreme_rows(frame, kwargs, observed, row_ids, max_listed)
        if rows:
            details["rows"] = rows
    return ExpectationResult(_name(table, kwargs, config.type), success, observed, details)


def _extreme_rows(
    frame: pd.DataFrame,
    kwargs: dict[str, Any],
    observed: Any,
    row_ids: Sequence[str],
    max_listed: int,
) -> list[dict[str, Any]]:
    """A failed aggregate (a column's mean) names no rows of its own: list the rows furthest on
    the wrong side of its bound, so the report says where to look."""
    column = kwargs.get("column")
    if column not in frame.columns or not isinstance(observed, int | float):
        return []
    high = kwargs.get("max_value")
    too_high = high is not None and observed > high
    ordered = frame.sort_values(column, ascending=not too_high, na_position="last")
    shown = list(dict.fromkeys(c for c in (*row_ids, column) if c in frame.columns))
    return _plain(ordered[shown].head(max_listed).to_dict("records"))


def _validate(
    context: AbstractDataContext,
    table: str,
    frame: pd.DataFrame,
    expectations: list[Expectation],
    row_ids: Sequence[str],
    max_listed: int,
) -> list[ExpectationResult]:
    """One suite over one in-memory table; offending rows are named by ``row_ids`` columns."""
    import great_expectations as gx

    batch = (
        context.data_sources.add_pandas(table)
        .add_dataframe_asset(table)
        .add_batch_definition_whole_dataframe(table)
    )
    suite = context.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=table, data=batch, suite=suite)
    )
    run = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={
            "result_format": "SUMMARY",
            "partial_unexpected_count": max_listed,
            "unexpected_index_column_names": [c for c in row_ids if c in frame.columns],
        },
    )
    return [_outcome(table, result, frame, row_ids, max_listed) for result in run.results]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None


# --- manifest ------------------------------------------------------------------------------------


def check_manifest(manifest_path: str | Path, config: GatesConfig) -> GateReport:
    """The image table before Stage 1: unique ids and paths, readable images of sane sizes."""
    import great_expectations.expectations as gxe
    import pandas as pd
    from great_expectations.expectations.row_conditions import Column

    path = Path(manifest_path)
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable Parquet manifest ({exc})") from None
    if {"width", "height"} <= set(frame.columns):
        frame["pixels"] = frame["width"].astype("int64") * frame["height"].astype("int64")
    bounds = config.manifest
    readable = Column("decodable") == True  # noqa: E712 - a GE row condition, not a comparison
    expectations: list[Expectation] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="lists at least one image"),
        gxe.ExpectTableColumnsToMatchSet(
            column_set=list(MANIFEST_COLUMNS), exact_match=False, description="has every column"
        ),
        *(
            gxe.ExpectColumnValuesToNotBeNull(column=column, description=f"no {column} is missing")
            for column in ("image_id", "path", "split", "decodable")
        ),
        gxe.ExpectColumnValuesToBeUnique(column="image_id", description="image ids are unique"),
        gxe.ExpectColumnValuesToBeUnique(column="path", description="no file is listed twice"),
        gxe.ExpectColumnValuesToBeInSet(
            column="decodable",
            value_set=[True],
            mostly=1.0 - bounds.max_undecodable_fraction,
            description=f"at most {bounds.max_undecodable_fraction:.1%} of images undecodable",
            meta=_set_by("manifest.max_undecodable_fraction"),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="split",
            value_set=list(bounds.splits),
            description="splits are known",
            meta=_set_by("manifest.splits"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="width",
            min_value=bounds.min_width,
            row_condition=readable,
            description=f"decodable images are at least {bounds.min_width} pixels wide",
            meta=_set_by("manifest.min_width"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="height",
            min_value=bounds.min_height,
            row_condition=readable,
            description=f"decodable images are at least {bounds.min_height} pixels high",
            meta=_set_by("manifest.min_height"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="pixels",
            max_value=bounds.max_pixels,
            row_condition=readable,
            description=f"decodable images have at most {bounds.max_pixels} pixels",
            meta=_set_by("manifest.max_pixels"),
        ),
    ]
    results = _validate(
        _context(), "manifest", frame, expectations, ("image_id", "error"), config.max_listed
    )
    return GateReport("manifest", str(path), tuple(results))


# --- pseudo-labels -------------------------------------------------------------------------------


def _rle_mismatches(table: pa.Table) -> np.ndarray:
    """Per mask row: its run lengths are negative, do not cover height*width, or do not add up
    to its recorded area (vectorised over the shard, no mask is decoded)."""
    import pyarrow.compute as pc

    rle = table.column("rle").combine_chunks()
    count = len(rle)
    lengths = pc.list_value_length(rle).fill_null(0).to_numpy(zero_copy_only=False)
    runs = pc.list_flatten(rle).to_numpy(zero_copy_only=False).astype(np.int64)
    owner = np.repeat(np.arange(count), lengths)
    position = np.arange(runs.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    total = np.bincount(owner, weights=runs, minlength=count)
    ones = np.bincount(owner, weights=np.where(position % 2 == 1, runs, 0), minlength=count)
    negative = np.bincount(owner, weights=runs < 0, minlength=count) > 0
    height = table.column("height").to_numpy(zero_copy_only=False).astype(np.int64)
    width = table.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
    area = table.column("area").to_numpy(zero_copy_only=False).astype(np.int64)
    return negative | (total != height * width) | (ones != area)


def _mask_profile(table: pa.Table, shard: str, sizes: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """One shard's masks reduced to one row per (class id, route) with the extremes the
    expectations bound, and counts of masks that contradict their run lengths or image."""
    frame = table.drop_columns(["rle"]).to_pandas()
    pixels = frame["height"].astype("int64") * frame["width"].astype("int64")
    frame["area_fraction"] = frame["area"] / pixels
    frame["score_missing"] = frame["score"].isna()
    frame["rle_mismatch"] = _rle_mismatches(table)
    frame["unlisted"] = [
        sizes.get(key) != (h, w)
        for key, h, w in zip(frame["image_id"], frame["height"], frame["width"], strict=True)
    ]
    profile = (
        frame.groupby(["class_id", "route"], dropna=False)
        .agg(
            masks=("area", "size"),
            score_min=("score", "min"),
            score_max=("score", "max"),
            score_missing=("score_missing", "sum"),
            area_fraction_min=("area_fraction", "min"),
            area_fraction_max=("area_fraction", "max"),
            rle_mismatches=("rle_mismatch", "sum"),
            unlisted_masks=("unlisted", "sum"),
        )
        .reset_index()
    )
    profile.insert(0, "shard", shard)
    return profile


def _pseudolabel_tables(
    pseudo_dir: Path, merged_dir: Path
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """The run record, the masks profile and the images table, one shard in memory at a time."""
    import pandas as pd
    import pyarrow.parquet as pq

    from fmbseg.io.runs import RUN_FILE
    from fmbseg.pseudolabel.merge import label_map_path
    from fmbseg.pseudolabel.stage import SHARD_DIR, SUMMARY_FILE

    if not (pseudo_dir / SUMMARY_FILE).is_file():
        raise InputError(f"{pseudo_dir}: no finished pseudo-label run ({SUMMARY_FILE} missing)")
    if not (merged_dir / SUMMARY_FILE).is_file():
        raise InputError(f"{merged_dir}: no finished merge ({SUMMARY_FILE} missing)")
    run = _read_json(pseudo_dir / RUN_FILE)
    if _read_json(merged_dir / RUN_FILE).get("pseudolabel_run") != run:
        raise InputError(f"{merged_dir}: merges another pseudo-label run than {pseudo_dir}")

    profiles: list[pd.DataFrame] = []
    images: list[dict[str, Any]] = []
    for info_path in sorted((pseudo_dir / SHARD_DIR).glob("*.json")):
        shard = info_path.stem
        info = _read_json(info_path)
        merged_path = merged_dir / SHARD_DIR / info_path.name
        merged = _read_json(merged_path)["images"] if merged_path.is_file() else []
        stats = {image["id"]: image for image in merged}
        sizes = {image["id"]: (image["height"], image["width"]) for image in info["images"]}
        parquet = info_path.with_suffix(".parquet")
        try:
            table = pq.read_table(parquet)
        except (OSError, ValueError) as exc:
            raise InputError(f"{parquet}: not a readable mask table ({exc})") from None
        profiles.append(_mask_profile(table, shard, sizes))
        for key in [*sizes, *info["failed"]]:
            stat = stats.get(key)
            images.append(
                {
                    "image_id": key,
                    "shard": shard,
                    "read": key in sizes,
                    "merged": stat is not None and label_map_path(merged_dir, key).is_file(),
                    "labelled_fraction": None if stat is None else stat["labelled_fraction"],
                    "merged_classes": None if stat is None else len(stat["class_pixels"]),
                }
            )
    columns = ["image_id", "shard", "read", "merged", "labelled_fraction", "merged_classes"]
    masks = pd.concat(profiles, ignore_index=True) if profiles else pd.DataFrame()
    return run, masks, pd.DataFrame(images, columns=columns)


def check_pseudolabels(
    pseudo_dir: str | Path, merged_dir: str | Path, config: GatesConfig
) -> GateReport:
    """Stage 1's masks and merged label maps before Stage 2 caches features from them."""
    import great_expectations.expectations as gxe

    pseudo, merged = Path(pseudo_dir), Path(merged_dir)
    try:
        run, masks, images = _pseudolabel_tables(pseudo, merged)
        classes = len(run["vocabulary"])
        routes = list(run["pseudolabel"]["routes"])
        listed = int(run["images"])
    except (KeyError, TypeError) as exc:
        raise InputError(f"{pseudo}: pseudo-label outputs lack an expected field ({exc})") from None
    bounds = config.pseudolabels
    zero = [0]
    mask_rules: list[Expectation] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="the run produced masks"),
        gxe.ExpectColumnValuesToNotBeNull(column="class_id", description="every mask has a class"),
        gxe.ExpectColumnValuesToBeBetween(
            column="class_id",
            min_value=0,
            max_value=classes - 1,
            description=f"class ids index the vocabulary of {classes}",
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="route", description="every mask has a route"),
        gxe.ExpectColumnValuesToBeInSet(
            column="route", value_set=routes, description="routes are those the run was set to"
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="score_missing", value_set=zero, description="every mask has a (non-NaN) score"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="score_min",
            min_value=bounds.min_score,
            description="scores are not too low",
            meta=_set_by("pseudolabels.min_score"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="score_max",
            max_value=bounds.max_score,
            description="scores are not too high",
            meta=_set_by("pseudolabels.max_score"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="area_fraction_min",
            min_value=bounds.min_mask_area_fraction,
            strict_min=True,
            description=f"masks cover more than {bounds.min_mask_area_fraction} of their image",
            meta=_set_by("pseudolabels.min_mask_area_fraction"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="area_fraction_max",
            max_value=bounds.max_mask_area_fraction,
            description=f"masks cover at most {bounds.max_mask_area_fraction} of their image",
            meta=_set_by("pseudolabels.max_mask_area_fraction"),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="rle_mismatches",
            value_set=zero,
            description="run lengths cover the image and add up to the mask's area",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="unlisted_masks",
            value_set=zero,
            description="masks belong to an image their shard read, at its size",
        ),
    ]
    image_rules: list[Expectation] = [
        gxe.ExpectTableRowCountToEqual(value=listed, description="every listed image has a record"),
        gxe.ExpectColumnValuesToBeUnique(column="image_id", description="images are recorded once"),
        gxe.ExpectColumnValuesToBeInSet(
            column="read",
            value_set=[True],
            mostly=1.0 - bounds.max_failed_fraction,
            description=f"at most {bounds.max_failed_fraction:.1%} of images failed",
            meta=_set_by("pseudolabels.max_failed_fraction"),
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="read",
            column_B="merged",
            description="exactly the images read have a merged label map",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="labelled_fraction",
            min_value=0.0,
            max_value=1.0,
            description="labelled fractions are fractions",
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="labelled_fraction",
            min_value=bounds.min_mean_labelled_fraction,
            description=f"merged maps label at least {bounds.min_mean_labelled_fraction:.0%} "
            "of pixels on average",
            meta=_set_by("pseudolabels.min_mean_labelled_fraction"),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="merged_classes",
            value_set=[classes],
            description="merged label maps hold only vocabulary classes",
        ),
    ]
    context = _context()
    results = _validate(
        context, "masks", masks, mask_rules, ("shard", "class_id", "route"), config.max_listed
    )
    results += _validate(
        context, "images", images, image_rules, ("image_id", "shard"), config.max_listed
    )
    return GateReport("pseudolabels", f"{pseudo} + {merged}", tuple(results))


# --- features ------------------------------------------------------------------------------------


def _feature_tables(features_dir: Path) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Shard verification outcomes and per-image labelled patch fractions, one shard loaded at a
    time through the loader (which checks hash, shapes against index.json, dtypes, finiteness
    and the label range)."""
    import pandas as pd

    from fmbseg.align.features import IGNORE_PATCH, FeatureShards

    cache = FeatureShards(features_dir)
    shards: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for position, entry in enumerate(cache.index["shards"]):
        problem = None
        fractions: list[float | None] = [None] * len(entry["images"])
        try:
            shard = cache.load(position)
        except InputError as exc:
            problem = str(exc)
        else:
            if shard.features.shape[0] != len(shard):
                problem = f"holds {shard.features.shape[0]} feature rows for {len(shard)} images"
            else:
                labelled = (shard.labels != IGNORE_PATCH).flatten(1).float().mean(1)
                fractions = labelled.tolist()
        shards.append(
            {
                "shard": entry["file"],
                "images": len(entry["images"]),
                "verified": problem is None,
                "problem": problem,
            }
        )
        images += [
            {"image_id": key, "shard": entry["file"], "labelled_patch_fraction": fraction}
            for key, fraction in zip(entry["images"], fractions, strict=True)
        ]
    return (
        cache.index,
        pd.DataFrame(shards, columns=["shard", "images", "verified", "problem"]),
        pd.DataFrame(images, columns=["image_id", "shard", "labelled_patch_fraction"]),
    )


def check_features(features_dir: str | Path, config: GatesConfig) -> GateReport:
    """Stage 2's feature cache before training reads it for many epochs."""
    import great_expectations.expectations as gxe

    folder = Path(features_dir)
    index, shards, images = _feature_tables(folder)
    grid, dim = index["grid"], index["dim"]
    bound = config.features.min_labelled_patch_fraction
    shard_rules: list[Expectation] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="the cache holds a shard"),
        gxe.ExpectColumnValuesToBeInSet(
            column="verified",
            value_set=[True],
            description=f"shards match their sha256, are {grid[0]}x{grid[1]}x{dim} as index.json "
            f"says, finite, with labels in [-1, {len(index['vocabulary'])})",
        ),
    ]
    image_rules: list[Expectation] = [
        gxe.ExpectTableRowCountToEqual(
            value=int(index["images"]), description="shards list as many images as index.json"
        ),
        gxe.ExpectColumnValuesToBeUnique(column="image_id", description="images are cached once"),
        gxe.ExpectColumnMeanToBeBetween(
            column="labelled_patch_fraction",
            min_value=bound,
            description=f"at least {bound:.0%} of patches carry a label",
            meta=_set_by("features.min_labelled_patch_fraction"),
        ),
    ]
    context = _context()
    results = _validate(
        context, "shards", shards, shard_rules, ("shard", "problem"), config.max_listed
    )
    results += _validate(
        context, "images", images, image_rules, ("image_id", "shard"), config.max_listed
    )
    return GateReport("features", str(folder), tuple(results))


# --- reports -------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: GateReport) -> str:
    """A short human view: every expectation with its observed value, then failed rows."""
    status = "passed" if report.success else "FAILED"
    lines = [
        f"# Gate `{report.gate}`: {status}",
        "",
        f"Checked: `{report.source}`",
        "",
        "| result | expectation | rule | observed |",
        "|---|---|---|---|",
    ]
    for r in report.results:
        mark = "ok" if r.success else "**FAIL**"
        rule = r.details.get("rule") or ""
        lines.append(f"| {mark} | `{r.expectation}` | {_cell(rule)} | {_cell(r.observed)} |")
    for r in report.results:
        if not r.success:
            lines += ["", *_failure_section(r)]
    return "\n".join(lines) + "\n"


def _failure_section(result: ExpectationResult) -> list[str]:
    """What was expected and measured, which param sets the bound, and the rows to look at."""
    details = result.details
    lines = [f"## `{result.expectation}`", "", f"- expected: {_cell(details.get('rule') or '')}"]
    lines.append(f"- observed: {_cell(result.observed)}")
    if PARAM in details:
        lines.append(f"- bound set by: `{details[PARAM]}` in params.yaml")
    lines += [f"- error: {_cell(error)}" for error in details.get("errors", [])]
    rows = details.get("rows", [])
    if rows:
        lines.append(f"- rows (the first {len(rows)}, at most `gates.max_listed`):")
        lines += [f"  - {_cell(row)}" for row in rows]
    return lines


def run_gate(report: GateReport, out_dir: str | Path) -> Path:
    """Write ``<gate>.json`` and ``<gate>.md`` into ``out_dir``; raise :class:`GateFailed` if
    any expectation failed. Returns the JSON report's path."""
    out = Path(out_dir)
    json_path = out / f"{report.gate}.json"
    text = json.dumps(_plain(report.to_dict()), indent=2, ensure_ascii=False, allow_nan=False)
    write_text_atomic(json_path, text + "\n")
    write_text_atomic(out / f"{report.gate}.md", render_markdown(report))
    if not report.success:
        raise GateFailed(report.gate, report.failed, json_path)
    return json_path
