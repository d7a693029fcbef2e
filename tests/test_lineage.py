"""Lineage of a registered model: the chain of stage runs that produced it, found by the hashes
of what each stage read and wrote, across partial re-runs and DVC experiments."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from fmbseg import tracking
from fmbseg.config import Params
from fmbseg.errors import FmbsegError
from fmbseg.lineage import format_lineage, lineage
from fmbseg.models.base import WeightProvenance
from fmbseg.tracking import DvcProcess, dvc_md5, stage_run

CLIP = WeightProvenance("clip", "ViT-B-16", "file", None, "a" * 64)
SAM = WeightProvenance("sam", "vit_b", "random-init")
ENCODER = WeightProvenance("encoder", "dinov2", "synthetic")
# stage -> (inputs, outputs, weights), in dvc.yaml's order
PIPELINE: dict[str, tuple[list[str], list[str], list[WeightProvenance]]] = {
    "pseudolabel": (["data/images"], ["outputs/pseudolabels"], [CLIP, SAM]),
    "merge": (["outputs/pseudolabels"], ["outputs/merged"], []),
    "features": (["data/images", "outputs/merged"], ["outputs/features"], [ENCODER]),
    "train": (["outputs/features"], ["outputs/model"], []),
    "evaluate": (["data/voc", "outputs/model"], ["outputs/eval/voc"], []),
    "register": (["outputs/model", "outputs/eval/voc"], [], []),
}
FULL_CHAIN = list(PIPELINE)


def register(run_id: str, name: str) -> int:
    """A new version of model ``name`` logged by run ``run_id``, with alias ``candidate`` (what
    fmbseg.registry does, without building a model: lineage reads only the version's run)."""
    import mlflow

    client = mlflow.MlflowClient()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id).version
    client.set_registered_model_alias(name, "candidate", version)
    return int(version)


def _git(root: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(command, cwd=root, check=True, capture_output=True, text=True).stdout


Execution = Callable[..., dict[str, str]]


@pytest.fixture
def project(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git project with its data and params; DVC and Prefect context cleared."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"epochs": 10}}))
    for folder, name in (("data/images", "a.png"), ("data/voc", "b.png")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / name).write_bytes(f"{tmp_path}/{name}".encode())  # unique
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "project")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    return tmp_path


@pytest.fixture
def execute(project: Path, monkeypatch: pytest.MonkeyPatch) -> Execution:
    """``execute(pid, stages, epochs=..., model=...)`` runs ``stages`` as one ``dvc`` process
    ``pid`` would: every stage writes its outputs from its inputs and ``epochs``; ``register``
    registers a version of ``model``. Returns ``{stage: run id}``."""

    def run(pid: int, stages: list[str], epochs: int = 10, model: str = "traced") -> dict[str, str]:
        monkeypatch.setattr(tracking, "find_dvc_ancestor", lambda: DvcProcess(pid, 1.5))
        params = Params()
        params = params.model_copy(
            update={"train": params.train.model_copy(update={"epochs": epochs})}
        )
        run_ids = {}
        for stage in stages:
            inputs, outputs, weights = PIPELINE[stage]
            monkeypatch.setenv("DVC_STAGE", stage)
            with stage_run(
                stage, params, inputs=inputs, outputs=outputs, provenance=weights
            ) as stage_record:
                for out in outputs:
                    shutil.rmtree(project / out, ignore_errors=True)
                    (project / out).mkdir(parents=True)
                    read = {path: dvc_md5(project / path) for path in inputs}
                    (project / out / "made.json").write_text(json.dumps([stage, epochs, read]))
                if stage == "register":
                    register(stage_record.run_id, model)
            run_ids[stage] = stage_record.run_id
        return run_ids

    return run


def chain(record: dict) -> list[tuple[str, str]]:
    return [(stage["stage"], stage["run_id"]) for stage in record["stages"]]


def test_a_partial_rerun_links_the_model_to_the_upstream_runs_of_an_earlier_execution(
    project: Path, execute: Execution
) -> None:
    first = execute(101, FULL_CHAIN)
    # `dvc repro` after a change that only evaluation reads: evaluate and register re-run
    (project / "data/voc/b.png").write_bytes(b"relabelled")
    second = execute(202, ["evaluate", "register"])

    record = lineage("models:/traced/2")
    assert chain(record) == [(stage, first[stage]) for stage in FULL_CHAIN[:4]] + [
        ("evaluate", second["evaluate"]),
        ("register", second["register"]),
    ]
    assert record["source_run"]["run_id"] == second["register"]
    assert record["data"] == [
        {"path": "data/images", "md5": dvc_md5(project / "data/images")},
        {"path": "data/voc", "md5": dvc_md5(project / "data/voc")},
    ]
    stages = {stage["stage"]: stage for stage in record["stages"]}
    # the evaluation's input is what it read in this run, not dvc.lock's previous value
    assert stages["evaluate"]["inputs"]["data/voc"] == dvc_md5(project / "data/voc")
    assert stages["pseudolabel"]["weights"] == {
        "clip": {"weights": CLIP.tag, "model": "ViT-B-16"},
        "sam": {"weights": "random-init", "model": "vit_b"},
    }
    commit = _git(project, "rev-parse", "HEAD").strip()
    for name, stage in stages.items():
        assert stage["status"] == "FINISHED" and stage["git_commit"] == commit
        assert stage["params"]["train.epochs"] == "10" and stage["experiment"] is None
        assert stage["outputs"] == {out: dvc_md5(project / out) for out in PIPELINE[name][1]}
    assert stages["train"]["pipeline_run_id"] != stages["evaluate"]["pipeline_run_id"]
    # the first version still resolves to the first execution
    assert chain(lineage("models:/traced/1")) == [(stage, first[stage]) for stage in FULL_CHAIN]

    text = format_lineage(record)
    assert "model traced version 2" in text
    assert "stages (6, upstream first):" in text
    assert f"pseudolabel [FINISHED] run {first['pseudolabel']}" in text
    assert "weights sam (vit_b): random-init" in text
    assert f"data/voc: md5 {dvc_md5(project / 'data/voc')}" in text


def test_an_experiments_model_names_the_experiment_and_its_changed_params(
    project: Path, execute: Execution, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = execute(303, FULL_CHAIN, model="experimented")
    baseline = _git(project, "rev-parse", "HEAD").strip()
    # what `dvc exp run -S train.epochs=3 -n more-epochs` does: params changed, DVC's variables
    (project / "params.yaml").write_text(yaml.safe_dump({"train": {"epochs": 3}}))
    monkeypatch.setenv("DVC_EXP_NAME", "more-epochs")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
    experiment = execute(404, ["train", "evaluate", "register"], epochs=3, model="experimented")

    record = lineage("models:/experimented@candidate")
    assert record["version"] == 2
    assert chain(record) == [(stage, first[stage]) for stage in FULL_CHAIN[:3]] + [
        (stage, experiment[stage]) for stage in FULL_CHAIN[3:]
    ]
    for stage in record["stages"]:
        if stage["run_id"] in experiment.values():
            assert stage["experiment"] == "more-epochs"
            assert stage["experiment_baseline"] == baseline
            assert stage["experiment_params"] == {"train.epochs": "3"}
            assert stage["params"]["train.epochs"] == "3"
            assert stage["git_commit"] == baseline and stage["git_dirty"] == "false"
        else:
            assert stage["experiment"] is None and stage["params"]["train.epochs"] == "10"
    assert record["pipeline"]["run_id"] == record["stages"][-1]["pipeline_run_id"]
    text = format_lineage(record)
    assert f"train [FINISHED] run {experiment['train']}" in text
    assert "experiment more-epochs" in text
    assert "param train.epochs = 3 (changed by the experiment)" in text


def test_the_lineage_command_prints_it_all_as_json(
    project: Path, execute: Execution, capsys: pytest.CaptureFixture[str]
) -> None:
    from fmbseg.cli import main

    execute(505, FULL_CHAIN, model="printed")
    capsys.readouterr()
    assert main(["lineage", "models:/printed@candidate", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(lineage("models:/printed@candidate")))
    assert [stage["stage"] for stage in printed["stages"]] == FULL_CHAIN


def test_a_version_registered_outside_a_pipeline_has_no_upstream_runs(store: Path) -> None:
    import mlflow

    with mlflow.start_run(run_name="register") as run:
        version = register(run.info.run_id, "standalone")
    record = lineage(f"models:/standalone/{version}")
    assert record["source_run"]["name"] == "register"
    assert record["pipeline"] is None
    assert [stage["run_id"] for stage in record["stages"]] == [record["source_run"]["run_id"]]
    assert "pipeline run: none" in format_lineage(record)


def test_lineage_needs_a_registered_version(store: Path) -> None:
    with pytest.raises(FmbsegError, match="^runs:/abc/module: expected a registered model URI"):
        lineage("runs:/abc/module")
    with pytest.raises(FmbsegError, match="^models:/unknown@champion: "):
        lineage("models:/unknown@champion")
