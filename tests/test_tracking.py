"""Stage runs in MLflow: tags that trace inputs, one parent per pipeline execution, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fmbseg import tracking
from fmbseg.config import Params
from fmbseg.models.base import WeightProvenance
from fmbseg.tracking import DvcProcess, stage_run

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARAMS = Params()
CLIP = WeightProvenance("clip", "ViT-B-16", "file", "/w/clip.pt", "c" * 64)
SAM = WeightProvenance("sam", "vit_b", "random-init")

DVC_LOCK = """\
schema: '2.0'
stages:
  pseudolabel:
    cmd: fmbseg pseudolabel data/images
    deps:
    - path: data/images
      hash: md5
      md5: 11111111111111111111111111111111.dir
    - path: data/vocabulary.txt
      hash: md5
      md5: 55555555555555555555555555555555
    outs:
    - path: outputs/pseudolabels
      hash: md5
      md5: 22222222222222222222222222222222.dir
  merge:
    cmd: fmbseg merge outputs/pseudolabels
    deps:
    - path: outputs/pseudolabels
      hash: md5
      md5: 00000000000000000000000000000000.dir
    outs:
    - path: outputs/labels
      hash: md5
      md5: 33333333333333333333333333333333.dir
"""
IMAGES_DVC = """\
outs:
- md5: 44444444444444444444444444444444.dir
  path: images
  hash: md5
"""


def _git(root: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(command, cwd=root, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository with a DVC pipeline's lock file and one ``dvc add``-ed folder."""
    root = tmp_path_factory.mktemp("project")
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "dvc.lock").write_text(DVC_LOCK)
    (root / "data").mkdir()
    (root / "data" / "images.dvc").write_text(IMAGES_DVC)
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "pipeline")
    return root


@pytest.fixture
def client(store: Path, project: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    import mlflow

    monkeypatch.chdir(project)
    return mlflow.MlflowClient()


def under_dvc(monkeypatch: pytest.MonkeyPatch, stage: str, pid: int = 4242) -> None:
    """As if ``dvc repro`` (process ``pid``) ran ``stage``."""
    monkeypatch.setenv("DVC_STAGE", stage)
    monkeypatch.setattr(tracking, "find_dvc_ancestor", lambda: DvcProcess(pid, 1_700_000_000.25))


def parent_of(client: MlflowClient, run_id: str) -> str | None:
    return client.get_run(run_id).data.tags.get("mlflow.parentRunId")


def test_dvc_hashes_prefer_stage_outputs_then_dvc_files_then_dependencies(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project / "data")  # relative inputs are relative to the stage's folder
    inputs = [
        "../outputs/pseudolabels",
        "images/train",  # inside the dvc-added folder
        project / "data/vocabulary.txt",
        "unknown",
    ]
    assert tracking.dvc_hashes(project, inputs) == {
        "outputs/pseudolabels": "22222222222222222222222222222222.dir",  # not merge's stale dep
        "data/images": "44444444444444444444444444444444.dir",  # the .dvc file, not the dep
        "data/vocabulary.txt": "55555555555555555555555555555555",
    }


def test_git_dirty_means_changed_tracked_files_other_than_dvc_lock(tmp_path: Path) -> None:
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "params.yaml").write_text("train: {}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "start")
    (tmp_path / "untracked.txt").write_text("new")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # as dvc repro does
    assert tracking.git_tags(tmp_path)["git.dirty"] == "false"
    (tmp_path / "params.yaml").write_text("train: {epochs: 1}\n")
    assert tracking.git_tags(tmp_path)["git.dirty"] == "true"
    assert tracking.git_tags(tmp_path.parent / "elsewhere-not-a-repo") == {}


def test_stage_run_records_params_git_inputs_weights_and_flow_run(
    client: MlflowClient, store: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-run-7")
    params = PARAMS.model_copy(
        update={"pseudolabel": PARAMS.pseudolabel.model_copy(update={"templates": ("x" * 7000,)})}
    )
    with stage_run(
        "merge", params, inputs=["outputs/pseudolabels", "missing"], provenance=[CLIP]
    ) as run:
        run.add_provenance(SAM)
        run.log_metrics({"miou@voc": 0.5, "pixels": 3}, step=2)
        run.set_tags({"note": "first"})
    recorded = client.get_run(run.run_id)
    tags, params_logged = recorded.data.tags, recorded.data.params
    assert recorded.info.status == "FINISHED" and recorded.info.run_name == "merge"
    assert tags["fmbseg.stage"] == "merge" and tags["note"] == "first"
    assert tags["git.commit"] == _git(project, "rev-parse", "HEAD").strip()
    assert tags["git.dirty"] == "false"
    assert tags["dvc.dep.outputs/pseudolabels"] == "22222222222222222222222222222222.dir"
    assert not any(key.startswith("dvc.dep.missing") for key in tags)
    assert tags["weights.clip"] == f"sha256:{'c' * 64}" and tags["weights.clip.model"] == "ViT-B-16"
    assert tags["weights.sam"] == "random-init"
    assert tags["prefect.flow_run_id"] == "flow-run-7"
    assert "mlflow.parentRunId" not in tags and "dvc.stage" not in tags
    assert params_logged["models.clip.model"] == "ViT-B-16"
    assert params_logged["train.epochs"] == "10"
    assert params_logged["models.clip.checkpoint"] == "null"
    assert len(params_logged["pseudolabel.templates"]) == tracking.MAX_PARAM_VALUE
    assert recorded.data.metrics == {"miou_at_voc": 0.5, "pixels": 3.0}
    experiment = client.get_experiment(recorded.info.experiment_id)
    assert experiment.name == "fmbseg"
    assert experiment.artifact_location == (store.resolve() / "mlartifacts" / "fmbseg").as_uri()


def test_stages_of_one_dvc_process_share_one_parent_and_another_gets_its_own(
    client: MlflowClient, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = project / tracking.PIPELINE_RECORDS
    records.mkdir(parents=True, exist_ok=True)
    ended = records / "1-1-00000000.json"  # pid 1 exists but was not started at t=0.001 s
    ended.write_text(json.dumps({"run_id": "gone"}))
    under_dvc(monkeypatch, "pseudolabel")
    with stage_run("pseudolabel", PARAMS, inputs=["data/images"]) as first:
        pass
    under_dvc(monkeypatch, "merge")
    with stage_run("merge", PARAMS) as second:
        pass
    assert not ended.exists()
    mine = list(records.glob("4242-1700000000250-*.json"))
    assert len(mine) == 1
    under_dvc(monkeypatch, "merge", pid=4343)
    with stage_run("merge", PARAMS) as other:
        pass
    parent = parent_of(client, first.run_id)
    assert parent is not None and parent == parent_of(client, second.run_id)
    assert parent_of(client, other.run_id) not in (None, parent)
    pipeline = client.get_run(parent)
    assert pipeline.info.run_name == "pipeline" and pipeline.info.status == "FINISHED"
    assert pipeline.data.tags["fmbseg.pipeline"] == "dvc:4242-1700000000250"
    assert pipeline.data.tags["git.commit"] == _git(project, "rev-parse", "HEAD").strip()
    assert client.get_run(first.run_id).data.tags["dvc.stage"] == "pseudolabel"
    assert not mine[0].exists()  # the fake dvc process 4242 is not alive any more


def test_concurrent_stages_of_one_dvc_process_agree_on_the_parent(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    under_dvc(monkeypatch, "pseudolabel", pid=5151)
    start = threading.Barrier(3)
    run_ids: list[str] = []

    def stage() -> None:
        start.wait()
        with stage_run("pseudolabel", PARAMS) as run:
            run_ids.append(run.run_id)

    threads = [threading.Thread(target=stage) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(run_ids) == 3
    assert len({parent_of(client, run_id) for run_id in run_ids}) == 1
    live = client.search_runs(
        [client.get_run(run_ids[0]).info.experiment_id],
        filter_string="tags.`fmbseg.pipeline` = 'dvc:5151-1700000000250'",
    )
    assert len(live) == 1


def test_pipeline_run_id_from_the_flow_wins_and_its_status_is_left_to_the_flow(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = tracking.experiment_id(client)
    flow_parent = client.create_run(experiment, run_name="flow").info.run_id
    monkeypatch.setenv("FMBSEG_PIPELINE_RUN_ID", flow_parent)
    under_dvc(monkeypatch, "train")
    with stage_run("train", PARAMS) as run:
        pass
    assert parent_of(client, run.run_id) == flow_parent
    assert client.get_run(flow_parent).info.status == "RUNNING"


def test_a_failing_stage_ends_failed_and_so_does_its_pipeline(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    under_dvc(monkeypatch, "train", pid=6161)
    with pytest.raises(RuntimeError, match="diverged"), stage_run("train", PARAMS) as failed:
        raise RuntimeError("diverged")
    under_dvc(monkeypatch, "evaluate", pid=6161)
    with stage_run("evaluate", PARAMS) as later:
        pass
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(later.run_id).info.status == "FINISHED"
    assert client.get_run(parent_of(client, failed.run_id)).info.status == "FAILED"


def test_outside_dvc_and_a_flow_a_stage_run_has_no_parent(client: MlflowClient) -> None:
    with stage_run("train", PARAMS) as run:
        pass
    assert parent_of(client, run.run_id) is None


def test_with_tracking_off_stages_run_without_importing_mlflow(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys
        from fmbseg.config import Params
        from fmbseg.tracking import stage_run
        with stage_run("train", Params(), inputs=["x"]) as run:
            run.log_metrics({"miou@voc": 1.0})
            run.set_tags({"a": "b"})
            run.log_artifacts(".")
        assert run.run_id is None
        assert "mlflow" not in sys.modules, "mlflow was imported"
    """)
    env = {**os.environ, "FMBSEG_TRACKING": "0", "MLFLOW_TRACKING_URI": "sqlite:///nowhere.db"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "nowhere.db").exists()


def test_the_nearest_dvc_ancestor_process_is_found(tmp_path: Path) -> None:
    probe = (
        "from fmbseg.tracking import find_dvc_ancestor as f; import os; "
        "print(f().pid == os.getppid())"
    )
    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text(
        f"#!{sys.executable}\nimport subprocess, sys\n"
        f"sys.exit(subprocess.call([sys.executable, '-c', {probe!r}]))\n"
    )
    fake_dvc.chmod(0o755)
    done = subprocess.run([str(fake_dvc)], check=False, capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr
