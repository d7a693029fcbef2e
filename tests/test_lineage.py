"""Lineage of a registered model: its source run and every stage run of its pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fmbseg import tracking
from fmbseg.align.module import AlignmentModule, save_module
from fmbseg.config import Params
from fmbseg.errors import FmbsegError
from fmbseg.lineage import format_lineage, lineage
from fmbseg.models.base import WeightProvenance
from fmbseg.registry import register_module
from fmbseg.tracking import DvcProcess, stage_run

HASHES = {
    "data/images": "11111111111111111111111111111111.dir",
    "outputs/pseudolabels": "22222222222222222222222222222222.dir",
    "outputs/labels": "33333333333333333333333333333333.dir",
    "outputs/features": "44444444444444444444444444444444.dir",
}
DVC_LOCK = f"""\
schema: '2.0'
stages:
  pseudolabel:
    cmd: fmbseg pseudolabel
    deps:
    - path: data/images
      md5: {HASHES["data/images"]}
    outs:
    - path: outputs/pseudolabels
      md5: {HASHES["outputs/pseudolabels"]}
  merge:
    cmd: fmbseg merge
    outs:
    - path: outputs/labels
      md5: {HASHES["outputs/labels"]}
  cache-features:
    cmd: fmbseg cache-features
    outs:
    - path: outputs/features
      md5: {HASHES["outputs/features"]}
"""
# stage -> (inputs, weights it used)
PIPELINE = {
    "pseudolabel": (
        ["data/images"],
        [
            WeightProvenance("clip", "ViT-B-16", "file", None, "a" * 64),
            WeightProvenance("sam", "vit_b", "random-init"),
        ],
    ),
    "merge": (["outputs/pseudolabels"], []),
    "cache-features": (
        ["data/images", "outputs/labels"],
        [WeightProvenance("encoder", "dinov2", "synthetic")],
    ),
    "train": (["outputs/features"], []),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    save_file({"text_embeddings": torch.eye(2, 4)}, folder / "text_embeddings.safetensors")
    save_module(
        AlignmentModule(8, 4, depth=1, heads=2),
        folder / "module.safetensors",
        encoder="tiny",
        text_embeddings="text_embeddings.safetensors",
        vocabulary=("cat", "dog"),
    )
    return folder


@pytest.fixture
def pipeline(
    store: Path, trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """Run the four stages as ``dvc repro`` would, from a Prefect flow run; ``train`` registers
    its module. Returns the stage runs' ids."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "dvc.lock").write_text(DVC_LOCK)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-run-42")
    monkeypatch.setattr(tracking, "find_dvc_ancestor", lambda: DvcProcess(777, 1.5))
    run_ids = {}
    for stage, (inputs, weights) in PIPELINE.items():
        monkeypatch.setenv("DVC_STAGE", stage)
        with stage_run(stage, Params(), inputs=inputs, provenance=weights) as run:
            if stage == "train":
                run.log_metrics({"final_loss": 0.25})
                register_module(trained, name="traced", evaluation={"voc": 0.5})
        run_ids[stage] = run.run_id
    return run_ids


def test_lineage_lists_the_pipelines_stage_runs_with_their_inputs_and_weights(
    pipeline: dict[str, str],
) -> None:
    record = lineage("models:/traced@candidate")
    assert (record["model"], record["version"], record["aliases"]) == ("traced", 1, ["candidate"])
    assert record["version_tags"]["miou.voc"] == "0.5"
    source = record["source_run"]
    assert source["run_id"] == pipeline["train"] and source["stage"] == "train"
    assert source["params"]["models.clip.model"] == "ViT-B-16"
    assert source["metrics"] == {"final_loss": 0.25}
    assert source["dvc"] == {"outputs/features": HASHES["outputs/features"]}
    # every output in dvc.lock when training started: the data upstream of the model
    assert source["upstream"] == {
        path: HASHES[path]
        for path in ("outputs/pseudolabels", "outputs/labels", "outputs/features")
    }
    assert record["pipeline"]["name"] == "pipeline"
    assert record["prefect_flow_run_id"] == "flow-run-42"
    stages = {stage["stage"]: stage for stage in record["stages"]}
    assert [stage["stage"] for stage in record["stages"]] == list(PIPELINE)
    assert {name: stages[name]["run_id"] for name in stages} == pipeline
    for name, (inputs, weights) in PIPELINE.items():
        assert stages[name]["status"] == "FINISHED" and stages[name]["dvc_stage"] == name
        assert stages[name]["dvc"] == {path: HASHES[path] for path in inputs}
        assert stages[name]["weights"] == {
            w.role: {"weights": w.tag, "model": w.model} for w in weights
        }

    text = format_lineage(record)
    assert "model traced version 1 (@candidate)" in text
    assert "prefect flow run: flow-run-42" in text
    for name in PIPELINE:
        assert f"{name} [FINISHED] run {pipeline[name]}" in text
    for path, md5 in HASHES.items():
        assert f"input {path}: md5 {md5}" in text
    assert f"weights clip (ViT-B-16): sha256:{'a' * 64}" in text
    assert f"pipeline data outputs/labels: md5 {HASHES['outputs/labels']}" in text


def test_a_version_registered_outside_a_pipeline_has_no_stage_runs(
    store: Path, trained: Path
) -> None:
    version = register_module(trained, name="standalone")
    record = lineage(f"models:/standalone/{version}")
    assert record["source_run"]["name"] == "register"
    assert record["pipeline"] is None and record["stages"] == []
    assert "pipeline run: none" in format_lineage(record)


def test_lineage_needs_a_registered_version(store: Path) -> None:
    with pytest.raises(FmbsegError, match="^runs:/abc/module: expected a registered model URI"):
        lineage("runs:/abc/module")
    with pytest.raises(FmbsegError, match="^models:/unknown@champion: "):
        lineage("models:/unknown@champion")
