"""Stage 2 methods are chosen by name; a trained folder says which method made it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fmbseg.config import load_params
from fmbseg.errors import ConfigError, WeightsError
from fmbseg.methods import (
    MODEL_FILE,
    available_methods,
    get_method,
    read_model_record,
    register_method,
    write_model_record,
)
from fmbseg.oracle.scenes import OracleWorld, make_scene
from fmbseg.segmenter import load_segmenter


@pytest.fixture(autouse=True)
def own_method_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Methods a test registers are gone after it."""
    import fmbseg.methods

    monkeypatch.setattr(fmbseg.methods, "_registry", dict(fmbseg.methods._registry))


def test_unknown_method_names_the_key_and_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"train.method: unknown method 'nope' \(known: .*fmbseg"):
        get_method("nope")


def test_a_registered_method_is_found_by_name() -> None:
    class Dummy:
        name = "dummy-test"

    register_method("dummy-test", Dummy())
    assert "dummy-test" in available_methods()
    assert get_method("dummy-test").name == "dummy-test"


def test_fmbseg_training_ends_with_its_model_record(oracle_run) -> None:
    record = read_model_record(oracle_run.module)
    assert record.method == "fmbseg"
    folder = oracle_run.module.parent
    assert all((folder / name).is_file() for name in record.files)
    assert {"module.safetensors", "module.json", "text_embeddings.safetensors"} <= set(record.files)


def test_a_folder_from_before_method_names_is_fmbseg(oracle_run, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    shutil.copytree(oracle_run.module.parent, legacy)
    (legacy / MODEL_FILE).unlink()
    assert read_model_record(legacy).method == "fmbseg"


def test_records_that_are_missing_or_wrong_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no trained model here"):
        read_model_record(tmp_path)
    (tmp_path / MODEL_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(WeightsError, match=r"model.json: not a trained-model record"):
        read_model_record(tmp_path)
    with pytest.raises(WeightsError, match="weights.bin: file of the trained x model not found"):
        write_model_record(tmp_path, "x", ("weights.bin",))


def test_load_segmenter_dispatches_on_the_recorded_method(oracle_run, tmp_path: Path) -> None:
    world = OracleWorld()
    copy = tmp_path / "model"
    shutil.copytree(oracle_run.module.parent, copy)
    calls = []

    class Recording:
        name = "recording-test"

        def load(self, params, model_dir, device):
            calls.append(model_dir)
            return get_method("fmbseg").load(params, model_dir, device)

    register_method("recording-test", Recording())
    record = json.loads((copy / MODEL_FILE).read_text())
    (copy / MODEL_FILE).write_text(json.dumps(record | {"method": "recording-test"}))
    segmenter = load_segmenter(oracle_run.params, copy / "module.safetensors")
    assert calls == [copy]
    scene = make_scene(world, 64, 80, seed=3)
    labels = segmenter.segment(scene.image, world.class_names).labels
    assert labels.shape == (64, 80)
    assert (labels == scene.labels).mean() >= 0.85


def test_train_method_is_a_param() -> None:
    assert load_params(None).train.method == "fmbseg"
    assert load_params(None, ["train.method=fusioner"]).train.method == "fusioner"
