"""The Prefect flows drive DVC and MLflow on a real project folder (oracle backends)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ORACLE = {
    "models": {
        "clip": {"backend": "oracle"},
        "sam": {"backend": "oracle"},
        "encoder": {"backend": "oracle"},
    },
    "pseudolabel": {"short_side": 128, "crop_stride": 32, "images_per_shard": 2},
    "features": {"image_size": 64},
    "train": {"heads": 2},
    "inference": {"short_side": 64, "window": 64, "stride": 32},
}


def deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        base[key] = deep_update(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def run(*argv: str, cwd: Path) -> str:
    bin_dir = str(Path(sys.executable).parent)
    result = subprocess.run(
        [str(Path(bin_dir) / argv[0]) if argv[0] == "dvc" else argv[0], *argv[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This repository's dvc.yaml and params.yaml, switched to oracle backends, in a new repo."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), ORACLE)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "init", "-q", cwd=root)
    run("dvc", "init", "-q", cwd=root)
    run("dvc", "config", "core.analytics", "false", cwd=root)
    return root


@pytest.fixture(scope="module")
def prefect_and_mlflow(project: Path) -> Iterator[object]:
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMBSEG_TRACKING", "1")
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        patch.delenv("FMBSEG_PIPELINE_RUN_ID", raising=False)
        with prefect_test_harness(server_startup_timeout=120):
            import mlflow

            yield mlflow.MlflowClient()


def stage_runs(client, parent_run_id: str) -> list[str]:
    runs = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
    )
    return sorted(run.data.tags["fmbseg.stage"] for run in runs)


def test_pipeline_flow_runs_dvc_end_to_end_under_one_parent_run(
    project: Path, prefect_and_mlflow
) -> None:
    from flows.pipeline import pipeline

    client = prefect_and_mlflow
    result = pipeline(project_dir=str(project))
    assert result["promotion"]["promoted"] and result["promotion"]["reason"] == "no champion yet"
    assert stage_runs(client, result["pipeline_run_id"]) == sorted(
        ["manifest", "pseudolabel", "masks", "merge", "features", "train", "evaluate", "register"]
    )
    parent = client.get_run(result["pipeline_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"]
    assert "up to date" in run("dvc", "status", cwd=project)
    champion = client.get_model_version_by_alias("fmbseg", "champion")
    assert int(champion.version) == 1


def test_changing_one_param_reruns_exactly_its_dependent_stages(
    project: Path, prefect_and_mlflow
) -> None:
    from flows.pipeline import pipeline

    run("dvc", "exp", "run", "--help", cwd=project)  # the DVC experiments CLI is there
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = pipeline(project_dir=str(project))
    assert stage_runs(prefect_and_mlflow, result["pipeline_run_id"]) == [
        "evaluate",
        "register",
        "train",
    ]
    assert result["promotion"]["candidate_version"] == 2


def test_sharded_pseudolabelling_flow_records_the_stage_output_and_its_producer(
    project: Path, prefect_and_mlflow
) -> None:
    from flows.pipeline import pipeline
    from flows.pseudolabel import pseudolabel_sharded

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pseudolabel"]["points_per_class"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sharded_run = pseudolabel_sharded(project_dir=str(project), workers=2)
    status = run("dvc", "status", "pseudolabel", "merge", cwd=project)
    assert "up to date" in status, status
    summary = yaml.safe_load((project / "outputs" / "pseudolabels" / "summary.json").read_text())
    assert summary["shards_done"] == summary["shards"] == 3

    # A model trained on those labels names the sharded flow's run as their producer.
    version = pipeline(project_dir=str(project))["promotion"]["candidate_version"]
    bin_dir = Path(sys.executable).parent
    record = json.loads(
        run(str(bin_dir / "fmbseg"), "lineage", f"models:/fmbseg/{version}", "--json", cwd=project)
    )
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    (locked,) = [out["md5"] for out in lock["stages"]["pseudolabel"]["outs"]]
    producers = [
        stage
        for stage in record["stages"]
        if stage["outputs"].get("outputs/pseudolabels") == locked
    ]
    assert [p["stage"] for p in producers] == ["pseudolabel"], record["stages"]
    assert producers[0]["pipeline_run_id"] == sharded_run
    assert "outputs/pseudolabels" not in {item["path"] for item in record["data"]}


def test_prefect_yaml_deploys_existing_flows() -> None:
    import importlib

    from prefect import Flow

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        entrypoint = deployment["entrypoint"]  # path/to/file.py:function or module.function
        module, _, name = entrypoint.rpartition(":" if ":" in entrypoint else ".")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
        assert isinstance(flow, Flow)
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties)
        assert deployment["work_pool"]["name"] in {"gpu", "cpu"}
