"""Registering trained modules, alias-based promotion, and resolving a model for use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from fmbseg.align.module import AlignmentModule, load_module, save_module
from fmbseg.errors import FmbsegError, WeightsError
from fmbseg.registry import promote, record_evaluation, register_module, resolve_module

if TYPE_CHECKING:
    from mlflow import MlflowClient


def write_trained_folder(folder: Path, seed: int) -> AlignmentModule:
    """What ``fmbseg train`` leaves behind, for a tiny module."""
    torch.manual_seed(seed)
    module = AlignmentModule(8, 4, depth=1, heads=2)
    folder.mkdir(parents=True)
    text = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    save_file({"text_embeddings": text}, folder / "text_embeddings.safetensors")
    save_module(
        module,
        folder / "module.safetensors",
        encoder="tiny-encoder",
        text_embeddings="text_embeddings.safetensors",
        vocabulary=("cat", "dog"),
    )
    (folder / "metrics.json").write_text('{"final_loss": 0.5}\n')
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AlignmentModule]:
    folder = tmp_path_factory.mktemp("train") / "stage2"
    return folder, write_trained_folder(folder, seed=0)


def client() -> MlflowClient:
    import mlflow

    return mlflow.MlflowClient()


def test_registering_twice_gives_versions_1_and_2_with_candidate_on_the_newest(
    store: Path, trained: tuple[Path, AlignmentModule]
) -> None:
    folder, _ = trained
    first = register_module(folder, name="twice", evaluation={"voc": 0.25})
    second = register_module(folder, name="twice", evaluation={"voc": 0.5, "context": 0.125})
    assert (first, second) == (1, 2)
    version = client().get_model_version_by_alias("twice", "candidate")
    assert version.version == 2
    assert version.tags["miou.voc"] == "0.5" and version.tags["miou.context"] == "0.125"
    assert (
        version.tags["module.sha256"]
        == load_module(folder / "module.safetensors")[1].weights_sha256
    )
    assert client().get_model_version("twice", 1).aliases == []
    run = client().get_run(version.run_id)
    assert run.info.run_name == "register" and run.info.status == "FINISHED"


def test_the_registered_model_is_code_plus_safetensors_with_pinned_requirements(
    store: Path, trained: tuple[Path, AlignmentModule], tmp_path: Path
) -> None:
    import mlflow

    folder, module = trained
    register_module(folder, name="served")
    local = Path(mlflow.artifacts.download_artifacts("models:/served/1", dst_path=str(tmp_path)))
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["model_code_path"].endswith("mlflow_model.py")
    assert not list(local.rglob("*.pkl"))
    requirements = (local / "requirements.txt").read_text().split()
    # MLflow adds itself: loading the model needs it.
    names = sorted(line.split("==")[0] for line in requirements)
    assert names == ["mlflow", "numpy", "safetensors", "torch"]
    assert all("+" not in line for line in requirements)
    assert sorted(p.name for p in (local / "artifacts").iterdir()) == [
        "metrics.json",
        "module.json",
        "module.safetensors",
        "text_embeddings.safetensors",
    ]
    features = np.random.default_rng(0).random((2, 5, 8), dtype=np.float32)
    predicted = mlflow.pyfunc.load_model("models:/served/1").predict(features)
    with torch.no_grad():
        expected = module(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-6)


def test_registering_into_a_given_run_links_the_version_to_it(
    store: Path, trained: tuple[Path, AlignmentModule]
) -> None:
    from fmbseg.tracking import experiment_id

    train_run = client().create_run(experiment_id(client()), run_name="train").info.run_id
    client().set_terminated(train_run, "FINISHED")
    version = register_module(trained[0], name="linked", run_id=train_run)
    assert client().get_model_version("linked", version).run_id == train_run
    assert client().get_run(train_run).info.status == "FINISHED"


def test_a_folder_without_a_trained_module_is_a_weights_error(store: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="module.json"):
        register_module(tmp_path, name="nothing")


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
    trained: tuple[Path, AlignmentModule],
    champion: dict[str, float] | None,
    candidate: dict[str, float],
    promoted: bool,
    request: pytest.FixtureRequest,
) -> None:
    name = f"promote-{request.node.callspec.id}"
    if champion is not None:
        register_module(trained[0], name=name, evaluation=champion)
        assert promote(name, ["voc", "context"]).promoted
    version = register_module(trained[0], name=name, evaluation={**candidate, "other": 0.9})
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
    store: Path, trained: tuple[Path, AlignmentModule]
) -> None:
    register_module(trained[0], name="partial", evaluation={"voc": 0.9})
    with pytest.raises(FmbsegError, match=r"version 1 \(@candidate\) has no mIoU for .*context"):
        promote("partial", ["voc", "context"])
    with pytest.raises(FmbsegError, match="no version with alias 'release'"):
        promote("partial", ["voc"], alias_from="release")
    assert client().get_model_version("partial", 1).aliases == ["candidate"]


def test_a_champion_lacking_a_new_dataset_is_compared_once_evaluated_on_it(
    store: Path, trained: tuple[Path, AlignmentModule]
) -> None:
    register_module(trained[0], name="grown", evaluation={"voc": 0.4})
    promote("grown", ["voc"])
    register_module(trained[0], name="grown", evaluation={"voc": 0.3, "context": 0.3})
    with pytest.raises(FmbsegError, match=r"version 1 \(@champion\) has no mIoU for .*context"):
        promote("grown", ["voc", "context"])
    record_evaluation("grown", 1, {"context": 0.1})
    result = promote("grown", ["voc", "context"])
    assert (result.promoted, result.champion_miou) == (True, pytest.approx(0.25))


def test_resolve_module_takes_a_file_a_folder_or_a_registry_uri(
    store: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "train"
    module = write_trained_folder(folder, seed=3)
    weights = folder / "module.safetensors"
    assert resolve_module(weights) == weights
    assert resolve_module(folder) == weights
    register_module(folder, name="resolved")
    local = resolve_module("models:/resolved@candidate", dst_dir=tmp_path / "download")
    assert local.is_relative_to(tmp_path / "download") and local != weights
    loaded, info = load_module(local)
    assert info.vocabulary == ("cat", "dog")
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    again = resolve_module("models:/resolved/1", dst_dir=tmp_path / "again")
    assert again.read_bytes() == weights.read_bytes()


def test_resolve_module_errors_name_what_was_asked_for(store: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="missing.safetensors: alignment module not found"):
        resolve_module(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match=r"^models:/absent@champion: cannot download"):
        resolve_module("models:/absent@champion", dst_dir=tmp_path)
