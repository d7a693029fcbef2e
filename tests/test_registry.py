"""Registering trained models (any method), alias-based promotion, and resolving a model."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from fmbseg.errors import FmbsegError, WeightsError
from fmbseg.methods import register_method, write_model_record
from fmbseg.oracle.scenes import OracleWorld, write_scene_folder
from fmbseg.registry import (
    cache_dir,
    pip_requirements,
    promote,
    record_evaluation,
    register_module,
    resolve_model,
)
from fmbseg.segmenter import load_segmenter

if TYPE_CHECKING:
    from mlflow import MlflowClient

WORLD = OracleWorld()


@pytest.fixture(scope="module")
def trained(oracle_run) -> tuple[Path, Any]:
    """A trained FMbSeg folder (oracle backends) and the params it works with."""
    return oracle_run.module.parent, oracle_run.params


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FMBSEG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def client() -> MlflowClient:
    import mlflow

    return mlflow.MlflowClient()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_registering_twice_gives_versions_1_and_2_with_candidate_on_the_newest(
    store: Path, trained: tuple[Path, Any]
) -> None:
    folder, params = trained
    first = register_module(folder, params=params, name="twice", evaluation={"voc": 0.25})
    second = register_module(
        folder, params=params, name="twice", evaluation={"voc": 0.5, "context": 0.125}
    )
    assert (first, second) == (1, 2)
    version = client().get_model_version_by_alias("twice", "candidate")
    assert version.version == 2
    assert version.tags["miou.voc"] == "0.5" and version.tags["miou.context"] == "0.125"
    assert version.tags["fmbseg.method"] == "fmbseg"
    # the oracle's fake encoder and text model have synthetic weights
    assert version.tags["weights.encoder"] == version.tags["weights.text"] == "synthetic"
    assert len(version.tags["model.sha256"]) == 64
    assert client().get_model_version("twice", 1).aliases == []
    run = client().get_run(version.run_id)
    assert run.info.run_name == "register" and run.info.status == "FINISHED"


def test_the_registered_model_is_code_plus_the_trained_files_with_pinned_requirements(
    store: Path, trained: tuple[Path, Any], tmp_path: Path
) -> None:
    import mlflow

    folder, params = trained
    register_module(folder, params=params, name="logged")
    local = Path(mlflow.artifacts.download_artifacts("models:/logged/1", dst_path=str(tmp_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["model_code_path"].endswith("mlflow_model.py")
    assert not list(local.rglob("*.pkl"))
    requirements = (local / "requirements.txt").read_text().split()
    assert set(pip_requirements()) <= set(requirements)
    assert {"torch", "numpy", "pillow", "pydantic"} <= {r.split("==")[0] for r in requirements}
    assert all("+" not in line for line in requirements)
    listed = json.loads((folder / "model.json").read_text())["files"]
    stored = sorted(p.name for p in (local / "artifacts" / "model").iterdir())
    assert stored == sorted([*listed, "model.json", "run.json", "metrics.json", "serving.json"])
    serving = json.loads((local / "artifacts" / "model" / "serving.json").read_text())
    assert serving["models"] == params.models.model_dump(mode="json")
    assert serving["inference"] == params.inference.model_dump(mode="json")
    assert serving["provenance"] == {"encoder": "synthetic", "text": "synthetic"}
    # The signature says: images in, class names as params, label maps out.
    signature = mlmodel["signature"]
    assert json.loads(signature["inputs"]) == [
        {"type": "binary", "name": "image", "required": True}
    ]
    params_spec = {p["name"]: p for p in json.loads(signature["params"])}
    assert params_spec["classes"]["shape"] == [-1] and params_spec["classes"]["type"] == "string"
    assert {"background", "return_scores"} <= set(params_spec)
    assert [c["name"] for c in json.loads(signature["outputs"])] == ["labels", "score"]
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["params"]["classes"] and example["dataframe_split"]["columns"] == ["image"]


def test_the_registered_model_segments_images_given_as_bytes_base64_or_arrays(
    store: Path, trained: tuple[Path, Any], tmp_path: Path
) -> None:
    import base64

    import mlflow

    folder, params = trained
    register_module(folder, params=params, name="segments")
    scenes = write_scene_folder(WORLD, 3, tmp_path / "in", seed=11, sizes=((64, 80),))
    images = [np.asarray(Image.open(tmp_path / "in" / "images" / f"{i:04d}.png")) for i in range(3)]
    column = [png(images[0]), base64.b64encode(png(images[1])).decode(), images[2]]
    classes = list(WORLD.class_names)
    model = mlflow.pyfunc.load_model("models:/segments@candidate")
    result = model.predict(
        pd.DataFrame({"image": column}), params={"classes": classes, "return_scores": True}
    )
    local = load_segmenter(params, folder)
    for image, scene, labels, score in zip(images, scenes, result["labels"], result["score"]):
        expected = local.segment(image, classes)
        np.testing.assert_array_equal(labels, expected.labels)
        np.testing.assert_allclose(score, expected.scores.max(0).values.numpy(), atol=1e-6)
        assert (labels == scene.labels).mean() >= 0.8  # the oracle world's truth


def test_bad_requests_are_refused_with_a_one_line_reason(
    store: Path, trained: tuple[Path, Any]
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    folder, params = trained
    register_module(folder, params=params, name="refuses")
    model = mlflow.pyfunc.load_model("models:/refuses/1")
    good = png(np.full((32, 32, 3), 128, np.uint8))
    with pytest.raises(MlflowException, match="params.classes: give the class names"):
        model.predict(pd.DataFrame({"image": [good]}))
    with pytest.raises(MlflowException, match=r"image 1: cannot decode image"):
        model.predict(pd.DataFrame({"image": [good, b"\x89PNG broken"]}), params={"classes": ["a"]})
    with pytest.raises(MlflowException, match="background class 'sky' is not one of"):
        model.predict(
            pd.DataFrame({"image": [good]}), params={"classes": ["a", "b"], "background": "sky"}
        )


class ChannelScorer:
    """Scores class k by colour channel k % 3, times a weight read from the model's file."""

    patch_size = 4
    provenance: Mapping[str, Any] = {}

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def prepare(self, class_names: tuple[str, ...]) -> int:
        return len(class_names)

    def score_windows(self, windows: torch.Tensor, vocabulary: int) -> torch.Tensor:
        return self.weight * torch.stack([windows[:, k % 3] for k in range(vocabulary)], 1)


class ChannelMethod:
    name = "channels"
    paper = "none: a test method"

    def train(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise NotImplementedError

    def load(self, params: Any, model_dir: Path, device: torch.device) -> ChannelScorer:
        return ChannelScorer(json.loads((model_dir / "weights" / "w.json").read_text())["w"])


def test_any_method_is_registered_with_exactly_the_files_its_model_json_lists(
    store: Path, trained: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    import fmbseg.methods

    monkeypatch.setattr(fmbseg.methods, "_registry", dict(fmbseg.methods._registry))
    register_method("channels", ChannelMethod())
    folder = tmp_path / "channels"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "w.json").write_text('{"w": 2.0}')
    (folder / "notes.txt").write_text("not part of the model")
    write_model_record(folder, "channels", ("weights/w.json",))
    register_module(folder, params=trained[1], name="channels")
    assert client().get_model_version("channels", 1).tags["fmbseg.method"] == "channels"
    local = resolve_model("models:/channels@candidate")
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert files == ["model.json", "serving.json", "weights/w.json"]
    red, green = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0], green[..., 1] = 200, 200
    model = mlflow.pyfunc.load_model("models:/channels/1")
    result = model.predict(
        pd.DataFrame({"image": [png(red), png(green)]}), params={"classes": ["r", "g", "b"]}
    )
    assert [labels.tolist() for labels in result["labels"]] == [
        np.zeros((8, 8), int).tolist(),
        np.ones((8, 8), int).tolist(),
    ]


def test_registering_into_a_given_run_links_the_version_to_it(
    store: Path, trained: tuple[Path, Any]
) -> None:
    from fmbseg.tracking import experiment_id

    train_run = client().create_run(experiment_id(client()), run_name="train").info.run_id
    client().set_terminated(train_run, "FINISHED")
    version = register_module(trained[0], params=trained[1], name="linked", run_id=train_run)
    assert client().get_model_version("linked", version).run_id == train_run
    assert client().get_run(train_run).info.status == "FINISHED"


def test_a_folder_without_a_trained_model_is_a_weights_error(
    store: Path, trained: tuple[Path, Any], tmp_path: Path
) -> None:
    with pytest.raises(WeightsError, match="model.json not found"):
        register_module(tmp_path, params=trained[1], name="nothing")
    assert client().search_registered_models(filter_string="name='nothing'") == []


@pytest.mark.parametrize(
    ("champion", "candidate", "promoted"),
    [
        (None, {"voc": 0.3, "context": 0.2}, True),
        ({"voc": 0.3, "context": 0.2}, {"voc": 0.2, "context": 0.4}, True),  # 0.30 > 0.25
        ({"voc": 0.3, "context": 0.2}, {"voc": 0.4, "context": 0.05}, False),  # 0.225 < 0.25
        ({"voc": 0.3, "context": 0.2}, {"voc": 0.2, "context": 0.3}, False),  # equal
    ],
    ids=["no-champion", "better", "worse", "equal"],
)
def test_champion_moves_only_to_a_strictly_better_candidate(
    store: Path,
    trained: tuple[Path, Any],
    champion: dict[str, float] | None,
    candidate: dict[str, float],
    promoted: bool,
    request: pytest.FixtureRequest,
) -> None:
    folder, params = trained
    name = f"promote-{request.node.callspec.id}"
    if champion is not None:
        register_module(folder, params=params, name=name, evaluation=champion)
        assert promote(name, ["voc", "context"]).promoted
    version = register_module(
        folder, params=params, name=name, evaluation={**candidate, "other": 0.9}
    )
    result = promote(name, ["voc", "context"])
    assert result.promoted is promoted
    assert result.candidate_version == version
    assert result.candidate_miou == pytest.approx(sum(candidate.values()) / 2)
    assert result.champion_version == (None if champion is None else 1)
    holder = client().get_model_version_by_alias(name, "champion").version
    assert holder == (version if promoted else 1)
    tags = client().get_model_version(name, version).tags
    assert tags["promotion.champion.decision"] == ("promoted" if promoted else "rejected")
    assert float(tags["promotion.champion.candidate_miou"]) == result.candidate_miou
    assert tags["promotion.champion.champion_version"] == str(result.champion_version)
    assert tags["promotion.champion.datasets"] == "voc,context"
    assert tags["promotion.champion.time"] == result.decided_at


def test_a_candidate_without_a_configured_datasets_score_is_refused(
    store: Path, trained: tuple[Path, Any]
) -> None:
    register_module(trained[0], params=trained[1], name="partial", evaluation={"voc": 0.9})
    with pytest.raises(FmbsegError, match=r"version 1 \(@candidate\) has no mIoU for .*context"):
        promote("partial", ["voc", "context"])
    with pytest.raises(FmbsegError, match="no version with alias 'release'"):
        promote("partial", ["voc"], alias_from="release")
    assert client().get_model_version("partial", 1).aliases == ["candidate"]


def test_a_champion_lacking_a_new_dataset_is_compared_once_evaluated_on_it(
    store: Path, trained: tuple[Path, Any]
) -> None:
    folder, params = trained
    register_module(folder, params=params, name="grown", evaluation={"voc": 0.4})
    promote("grown", ["voc"])
    register_module(folder, params=params, name="grown", evaluation={"voc": 0.3, "context": 0.3})
    with pytest.raises(FmbsegError, match=r"version 1 \(@champion\) has no mIoU for .*context"):
        promote("grown", ["voc", "context"])
    record_evaluation("grown", 1, {"context": 0.1})
    result = promote("grown", ["voc", "context"])
    assert (result.promoted, result.champion_miou) == (True, pytest.approx(0.25))


def test_resolve_model_takes_a_folder_a_file_in_it_or_a_uri_cached_by_version(
    store: Path, trained: tuple[Path, Any], own_cache: Path
) -> None:
    folder, params = trained
    assert resolve_model(folder) == folder
    assert resolve_model(folder / "module.safetensors") == folder
    register_module(folder, params=params, name="resolved")
    local = resolve_model("models:/resolved@candidate")
    assert local.is_relative_to(own_cache) and cache_dir() == own_cache
    assert (local / "module.safetensors").read_bytes() == (
        folder / "module.safetensors"
    ).read_bytes()
    stamp = (local / "model.json").stat().st_mtime_ns
    # the alias and the version number name the same download; nothing else is left behind
    assert resolve_model("models:/resolved/1") == local
    assert (local / "model.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (own_cache / "models").iterdir()] == [local.name]
    register_module(folder, params=params, name="resolved")
    assert resolve_model("models:/resolved@candidate") != local  # version 2 now


def test_resolve_model_errors_name_what_was_asked_for(store: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="missing: trained model not found"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(WeightsError, match=r"^models:/absent@champion: cannot download"):
        resolve_model("models:/absent@champion")
