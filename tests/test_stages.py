"""The stage entry points chained through the ``fmbseg`` command, with oracle backends."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fmbseg.errors import InputError
from fmbseg.oracle.scenes import OracleWorld, write_scene_folder
from fmbseg.stages import parse_worker

ORACLE = [
    "-S",
    "models.clip.backend=oracle",
    "-S",
    "models.sam.backend=oracle",
    "-S",
    "models.encoder.backend=oracle",
    "-S",
    "pseudolabel.short_side=256",
    "-S",
    "pseudolabel.crop_stride=32",
    "-S",
    "features.image_size=64",
    "-S",
    "train.epochs=2",
    "-S",
    "train.heads=2",
]


def fmbseg(*args: str, cwd: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "fmbseg.cli", "-q", *args], capture_output=True, text=True, cwd=cwd
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_stage_1_and_2_chain_end_to_end(tmp_path: Path) -> None:
    world = OracleWorld()
    write_scene_folder(world, 6, tmp_path / "scenes", seed=2, sizes=((80, 96),))
    (tmp_path / "classes.txt").write_text("\n".join(world.class_names), encoding="utf-8")
    labelled = fmbseg(
        "pseudolabel",
        *ORACLE,
        "--images",
        "scenes/images",
        "--vocabulary",
        "classes.txt",
        "--out",
        "pl",
        cwd=tmp_path,
    )
    merged = fmbseg("merge", *ORACLE, "--pseudolabels", "pl", "--out", "merged", cwd=tmp_path)
    cached = fmbseg(
        "cache-features",
        *ORACLE,
        "--images",
        "scenes/images",
        "--labels",
        "merged",
        "--out",
        "features",
        cwd=tmp_path,
    )
    trained = fmbseg("train", *ORACLE, "--features", "features", "--out", "model", cwd=tmp_path)
    assert labelled["images"] == merged["images"] == 6
    assert cached["source_images"] == 6  # cached entries are tiles of them
    assert trained["epochs"] == 2
    assert (tmp_path / "model" / "module.safetensors").is_file()


@pytest.mark.parametrize("text", ["1", "2/2", "a/3", "-1/2"])
def test_worker_must_be_index_of_count(text: str) -> None:
    with pytest.raises(InputError, match="expected I/N"):
        parse_worker(text)
    assert parse_worker("1/3") == (1, 3)


def test_evaluate_names_unknown_and_missing_datasets(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fmbseg.cli", "evaluate", "--out", "eval", "--dataset"]
    unknown = subprocess.run([*command, "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert unknown.returncode == 2
    assert (
        "unknown dataset 'nope' (known: ade20k" in unknown.stderr and "demo_voc" in unknown.stderr
    )
    missing = subprocess.run([*command, "voc21"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2
    assert "not downloaded yet; run: fmbseg download voc21" in missing.stderr


def test_train_and_evaluate_log_their_charts_as_mlflow_artifacts(
    oracle_run, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every chart can be seen offline: the PNGs beside loss.csv and per_class.csv are artifacts
    of the stage's MLflow run."""
    import mlflow

    from fmbseg.cli import main

    dataset = tmp_path / "dataset"
    shutil.copytree(oracle_run.scenes / "images", dataset / "images" / "val")
    shutil.copytree(oracle_run.scenes / "labels", dataset / "masks" / "val")
    (dataset / "classes.txt").write_text("\n".join(OracleWorld().class_names), encoding="utf-8")
    features = oracle_run.module.parents[1] / "features"
    monkeypatch.chdir(tmp_path)
    small = ["-S", "inference.short_side=64", "-S", "inference.window=64"]
    train = ["train", *ORACLE, "--features", str(features), "--out", "model"]
    evaluate = ["evaluate", *ORACLE, *small, "--dataset", "dataset", "--split", "val"]
    assert main(["-q", *train]) == 0
    assert main(["-q", *evaluate, "--model", "model/module.safetensors", "--out", "eval"]) == 0
    client = mlflow.MlflowClient()
    runs = client.search_runs(client.search_experiments()[0].experiment_id.split())
    logged = {
        run.data.tags["fmbseg.stage"]: {
            item.path for item in client.list_artifacts(run.info.run_id)
        }
        for run in runs
    }
    assert {"loss.csv", "loss.png"} <= logged["train"]
    assert {"per_class.csv", "per_class.png", "confusion.png"} <= logged["evaluate"]


def test_evaluate_with_the_sclip_protocol_on_the_quickstart_set(
    oracle_run, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fmbseg evaluate --protocol sclip`` on demo_voc (VOC's 21 classes: SCLIP's cfg_voc21
    settings): the protocol and the background rule are in metrics.json and on the MLflow run."""
    import mlflow

    from fmbseg.cli import main
    from fmbseg.demo import build_demo_voc

    build_demo_voc(tmp_path / "demo_voc")
    monkeypatch.chdir(tmp_path)
    evaluate = ["evaluate", *ORACLE, "--dataset", "demo_voc", "--split", "val"]
    model = str(oracle_run.module)
    assert main(["-q", *evaluate, "--protocol", "sclip", "--model", model, "--out", "eval"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["protocol"] == "sclip"
    assert metrics["protocol_reference"] == "wangf3014/SCLIP configs/cfg_voc21.py"
    assert metrics["background_rule"] == "sclip_probability:0.1@scale65,area:0.1"
    assert metrics["templates"] == 80
    assert metrics["resize"] == "keep-ratio short 336 / long 2048"
    assert metrics["windows"] == "224 stride 112, averaged per pixel"
    client = mlflow.MlflowClient()
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`fmbseg.stage` = 'evaluate' and tags.`fmbseg.protocol` = 'sclip'",
    )
    assert run.data.params["inference.protocol"] == "sclip"
    assert run.data.tags["fmbseg.background_rule"] == metrics["background_rule"]
