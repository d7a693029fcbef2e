"""Stage runs in MLflow: tags that trace inputs, one parent per pipeline execution, failures."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from fmbseg import tracking
from fmbseg.config import Params
from fmbseg.models.base import WeightProvenance
from fmbseg.tracking import DvcProcess, stage_run

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARAMS = Params()
CLIP = WeightProvenance("clip", "ViT-B-16", "file", "/w/clip.pt", "c" * 64)
SAM = WeightProvenance("sam", "vit_b", "random-init")


def _git(root: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(command, cwd=root, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository holding a DVC pipeline and the output of one of its stages."""
    root = tmp_path_factory.mktemp("project")
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text("train: {}\n")
    (root / "outputs" / "pseudolabels").mkdir(parents=True)
    (root / "outputs" / "pseudolabels" / "shard-0.parquet").write_bytes(b"rows")
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


def test_the_project_of_a_dvc_experiment_copy_is_its_parent_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmbseg.environment import absolute_tracking_uri, find_project_root, find_workspace

    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    (copy / "src").mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    assert find_workspace(copy / "src") == copy.resolve()
    assert find_project_root(copy / "src") == tmp_path.resolve()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # what DVC sets for a queued experiment
    monkeypatch.chdir(copy)
    assert find_project_root() == tmp_path.resolve()
    assert absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == (
        f"sqlite:///{tmp_path / 'mlflow.db'}"
    )
    for kept in ("sqlite:////abs/m.db", "sqlite:///:memory:", "http://127.0.0.1:5000"):
        assert absolute_tracking_uri(kept, tmp_path) == kept


def test_git_dirty_means_changed_code_not_dvc_lock_or_params(tmp_path: Path) -> None:
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "params.yaml").write_text("train: {}\n")
    (tmp_path / "stage.py").write_text("print(1)\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "start")
    (tmp_path / "untracked.txt").write_text("new")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # as dvc repro does
    (tmp_path / "params.yaml").write_text("train: {epochs: 1}\n")  # logged as params
    assert tracking.git_tags(tmp_path)["git.dirty"] == "false"
    (tmp_path / "stage.py").write_text("print(2)\n")
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
        "merge",
        params,
        inputs=["outputs/pseudolabels", "missing"],
        outputs=["outputs/merged"],
        provenance=[CLIP],
    ) as run:
        run.add_provenance(SAM)
        run.log_metrics({"miou@voc": 0.5, "pixels": 3}, step=2)
        run.set_tags({"note": "first"})
        (project / "outputs" / "merged").mkdir(exist_ok=True)
        (project / "outputs" / "merged" / "labels.png").write_bytes(b"png")
        assert "dvc.out.outputs/merged" not in client.get_run(run.run_id).data.tags
    recorded = client.get_run(run.run_id)
    tags, params_logged = recorded.data.tags, recorded.data.params
    assert recorded.info.status == "FINISHED" and recorded.info.run_name == "merge"
    assert tags["fmbseg.stage"] == "merge" and tags["note"] == "first"
    assert tags["git.commit"] == _git(project, "rev-parse", "HEAD").strip()
    assert tags["git.dirty"] == "false"
    listing = (
        b'[{"md5": "%s", "relpath": "shard-0.parquet"}]' % hashlib.md5(b"rows").hexdigest().encode()
    )
    assert tags["dvc.dep.outputs/pseudolabels"] == hashlib.md5(listing).hexdigest() + ".dir"
    assert not any(key.startswith("dvc.dep.missing") for key in tags)
    # outputs are hashed once written
    assert tags["dvc.out.outputs/merged"] == tracking.dvc_md5(project / "outputs" / "merged")
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


# --- DVC experiments: one store per project, experiment identity ---------------------------------

EXPERIMENT_PIPELINE = """\
stages:
  train:
    cmd: fmbseg -q train --features features --out outputs/model
    deps: [features]
    params: [train]
    outs: [outputs/model]
  register:
    cmd: fmbseg -q register --model outputs/model --evaluations outputs/model --out registered.json
    deps: [outputs/model]
    outs:
      - registered.json:
          cache: false
"""
EXPERIMENT_PARAMS = {
    "models": {"clip": {"backend": "oracle"}, "encoder": {"backend": "oracle"}},
    "pseudolabel": {"templates": ["a photo of a {}."]},
    "train": {"epochs": 1, "heads": 2, "batch_size": 2, "lr": 0.01},
}


def tiny_feature_cache(out: Path, scratch: Path) -> None:
    """Oracle features of four scenes, labelled with their true label maps."""
    import numpy as np
    from PIL import Image

    from fmbseg.align.features import run_cache_features
    from fmbseg.config import load_params
    from fmbseg.masks import IGNORE_LABEL
    from fmbseg.oracle.scenes import IGNORE_PNG, OracleWorld, write_scene_folder
    from fmbseg.pseudolabel.merge import label_map_path, write_label_map

    world = OracleWorld()
    write_scene_folder(world, 4, scratch / "scenes", seed=3, sizes=((64, 64),))
    labels = scratch / "merged"
    for path in sorted((scratch / "scenes" / "labels").glob("*.png")):
        label_map = np.asarray(Image.open(path)).astype(np.uint16)
        label_map[label_map == IGNORE_PNG] = IGNORE_LABEL
        write_label_map(label_map_path(labels, path.stem), label_map)
    run = {"pseudolabel_run": {"vocabulary": list(world.class_names)}}
    (labels / "run.json").write_text(json.dumps(run), encoding="utf-8")
    params = load_params(None, ["models.encoder.backend=oracle", "features.image_size=64"])
    run_cache_features(params, scratch / "scenes" / "images", labels, out, show_progress=False)


def dvc_environment() -> dict[str, str]:
    """Tracking on, into the project's default store (no MLFLOW_TRACKING_URI), ``fmbseg`` and
    ``dvc`` of this interpreter first on PATH, no context of the caller's pipeline."""
    drop = ("MLFLOW_TRACKING_URI", "FMBSEG_PIPELINE_RUN_ID", "FMBSEG_EXPERIMENT", "MLFLOW_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("DVC_")}
    bin_dir = str(Path(sys.executable).parent)
    return env | {
        "FMBSEG_TRACKING": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
    }


def dvc(root: Path, *args: str, timeout: float = 120) -> str:
    """``dvc ARGS`` in ``root``; its output goes through a file, not a pipe, which the queue's
    background workers would hold open."""
    with tempfile.TemporaryFile("w+") as output:
        done = subprocess.run(
            [str(Path(sys.executable).with_name("dvc")), *args],
            cwd=root,
            env=dvc_environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        output.seek(0)
        text = output.read()
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{text}"
    return text


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "features"
    tiny_feature_cache(folder, tmp_path_factory.mktemp("scratch"))
    return folder


@pytest.fixture(scope="module")
def dvc_project(features: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC project: oracle features (``dvc add``-ed), a train and a register stage."""
    import shutil

    root = tmp_path_factory.mktemp("experiments")
    shutil.copytree(features, root / "features")
    (root / "notes.txt").write_bytes(b"a\r\nb\n")
    (root / "dvc.yaml").write_text(EXPERIMENT_PIPELINE)
    (root / "params.yaml").write_text(yaml.safe_dump(EXPERIMENT_PARAMS))
    _git(root, "init", "-q")
    _git(root, "config", "user.name", "t")
    _git(root, "config", "user.email", "t@example.org")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    dvc(root, "config", "core.check_update", "false")
    dvc(root, "add", "-q", "features", "notes.txt")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "pipeline")
    return root


def test_queued_experiments_record_into_the_projects_store_with_their_identity(
    dvc_project: Path,
) -> None:
    import mlflow

    root = dvc_project
    baseline = _git(root, "rev-parse", "HEAD").strip()
    dvc(root, "exp", "run", "--queue", "-n", "more-epochs", "-S", "train.epochs=2")
    dvc(root, "exp", "run", "--queue", "-n", "higher-lr", "-S", "train.lr=0.05")
    dvc(root, "queue", "start", "-j", "2")
    try:
        deadline = time.monotonic() + 300
        while re.search(r"\b(Queued|Running)\b", status := dvc(root, "queue", "status")):
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:
        dvc(root, "queue", "stop")
    assert status.count("Success") == 2, status + dvc(root, "queue", "logs", "higher-lr")

    # the store is the project's, not one in DVC's deleted copies of it
    assert sorted(path.name for path in root.glob("mlflow.db")) == ["mlflow.db"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'fmbseg'")
    assert len(versions) == 2
    experiments = {}
    for version in versions:
        register = client.get_run(version.run_id)
        assert Path(register.info.artifact_uri.removeprefix("file://")).is_relative_to(
            root / "mlartifacts"
        )
        experiments[register.data.tags["dvc.exp.name"]] = register.data.tags
    assert set(experiments) == {"more-epochs", "higher-lr"}
    for name, changed in (
        ("more-epochs", {"train.epochs": "2"}),
        ("higher-lr", {"train.lr": "0.05"}),
    ):
        tags = experiments[name]
        assert tags["dvc.exp.baseline"] == baseline
        assert tags["git.commit"] == baseline and tags["git.dirty"] == "false"
        assert {
            key.removeprefix("dvc.exp.param."): value
            for key, value in tags.items()
            if key.startswith("dvc.exp.param.")
        } == changed
    # each experiment's train run is found from its model, with the experiment's output hash
    refs = _git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps")
    commits = {line.split()[0].rsplit("/", 1)[1]: line.split()[1] for line in refs.splitlines()}
    for name in experiments:
        lock = yaml.safe_load(_git(root, "show", f"{commits[name]}:dvc.lock"))
        (model_out,) = lock["stages"]["train"]["outs"]
        train = client.search_runs(
            [client.get_experiment_by_name("fmbseg").experiment_id],
            filter_string=f"tags.`dvc.exp.name` = '{name}' and tags.`fmbseg.stage` = 'train'",
        )
        assert len(train) == 1
        assert train[0].data.tags["dvc.out.outputs/model"] == model_out["md5"]


def test_hashes_are_the_ones_dvc_records(dvc_project: Path) -> None:
    for name in ("features", "notes.txt"):
        (recorded,) = yaml.safe_load((dvc_project / f"{name}.dvc").read_text())["outs"]
        assert tracking.dvc_md5(dvc_project / name) == recorded["md5"], name


def test_gitignores_dvc_writes_after_a_stage_leave_its_output_hash_alone(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "checkpoints").mkdir(parents=True)
    (model / "module.safetensors").write_bytes(b"weights")
    (model / "checkpoints" / "last.pt").write_bytes(b"state")
    recorded_by_the_stage = tracking.dvc_md5(model)
    (model / ".gitignore").write_text("/module.safetensors\n/checkpoints\n")
    (model / "checkpoints" / ".gitignore").write_text("/last.pt\n")
    assert tracking.dvc_md5(model) == recorded_by_the_stage
    (model / "module.json").write_text("{}")
    assert tracking.dvc_md5(model) != recorded_by_the_stage


# --- a tracking server that does not answer -------------------------------------------------------

TRAIN_PARAMS = {
    "models": {"clip": {"backend": "oracle"}},
    "pseudolabel": {"templates": ["a photo of a {}."]},
    "train": {"epochs": 3, "heads": 2, "batch_size": 2},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fmbseg_train(cwd: Path, features: Path, uri: str) -> subprocess.CompletedProcess[str]:
    (cwd / "params.yaml").write_text(yaml.safe_dump(TRAIN_PARAMS))
    env = dvc_environment() | {"MLFLOW_TRACKING_URI": uri}
    command = ["-q", "train", "--features", str(features), "--out", "model"]
    return subprocess.run(
        [sys.executable, "-m", "fmbseg.cli", *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert stderr.rstrip().endswith(line), stderr
    return line


def test_an_unreachable_tracking_server_fails_the_stage_at_once_before_it_writes(
    features: Path, tmp_path: Path
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = fmbseg_train(tmp_path, features, uri)
    elapsed = time.monotonic() - started
    assert done.returncode == 3  # not 2: a retry can succeed once the server answers
    assert elapsed < 20, elapsed  # the process itself (imports) takes most of it
    error = one_error_line(done.stderr)
    assert error.startswith(f"error: MLflow tracking server {uri} is not answering (")
    assert "nothing was run" in error and "FMBSEG_TRACKING=0" in error
    assert error.endswith("[exit status 3: a retry can succeed once the server answers]")
    assert not (tmp_path / "model").exists()


class StoppingServer:
    """MLflow's tracking server on 127.0.0.1 (in a thread, SQLite store) that shuts itself
    down once it has answered ``requests`` log-batch calls."""

    def __init__(self, folder: Path, requests: int) -> None:
        from mlflow.server import app
        from werkzeug.serving import make_server

        self.remaining = requests

        def stop_after_log_batches(environ: dict, start_response: Any) -> Any:
            response = app(environ, start_response)
            if environ["PATH_INFO"].endswith("/runs/log-batch"):
                self.remaining -= 1
                if self.remaining == 0:
                    threading.Thread(target=self.stop).start()
            return response

        self.server = make_server("127.0.0.1", 0, stop_after_log_batches, threaded=True)
        self.uri = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_tracking_server_lost_mid_stage_keeps_the_outputs_and_says_how_to_record_them(
    features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    database = f"sqlite:///{tmp_path / 'server.db'}"
    monkeypatch.setenv("_MLFLOW_SERVER_FILE_STORE", database)
    monkeypatch.setenv("_MLFLOW_SERVER_ARTIFACT_ROOT", str(tmp_path / "server-artifacts"))
    server = StoppingServer(tmp_path, requests=2)  # the params, then epoch 1's metrics
    done = fmbseg_train(tmp_path, features, server.uri)
    assert server.remaining <= 0
    assert done.returncode == 3, done.stderr
    error = one_error_line(done.stderr)
    assert error.startswith("error: train: outputs are written, but MLflow run ")
    assert f"the tracking server {server.uri} stopped answering" in error
    assert "run the stage again to record it" in error
    assert (tmp_path / "model" / "module.safetensors").is_file()
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())
    (run,) = mlflow.MlflowClient(database).search_runs(["1"])
    assert run.info.run_id in error and run.info.status == "RUNNING"
