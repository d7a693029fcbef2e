"""Typed params: defaults <- file <- overrides, strict, with one-line errors naming the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from fmbseg.config import ModelsConfig, Params, load_params, save_config
from fmbseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MISSING = object()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_then_file_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  device: cuda\n  clip:\n    model: ViT-L-14\n")
    params = load_params(path, ["models.clip.batch_size=4"])
    assert params.models.device == "cuda"
    assert params.models.clip.model == "ViT-L-14"
    assert params.models.clip.batch_size == 4
    assert params.models.sam == ModelsConfig().sam  # untouched sections keep their defaults


def test_configs_are_frozen() -> None:
    params = Params()
    with pytest.raises(Exception):
        params.models.device = "cuda"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  clip:\n    modle: x\n", "models.clip.modle: unknown key"),
        ("models:\n  clip:\n    batch_size: many\n", "models.clip.batch_size"),
        ("models:\n  clip:\n    batch_size: 1.5\n", "models.clip.batch_size"),
        ("models:\n  precision: fp8\n", "models.precision"),
        ("models:\n  clip:\n    allow_random_init: 'no'\n", "models.clip.allow_random_init"),
        ("nonsense: 1\n", "nonsense: unknown key"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_params(path)
    message = str(error.value)
    assert str(path) in message and expected in message
    assert "\n" not in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  clip: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_params(path)


def test_missing_file_and_malformed_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_params(None, ["models.device"])


def test_saved_config_loads_back_identically(tmp_path: Path) -> None:
    params = load_params(None, ["models.encoder.overrides={depth: 2}", "models.device=cuda:1"])
    save_config(params, tmp_path / "out" / "config.yaml")
    assert load_params(tmp_path / "out" / "config.yaml") == params


def test_shipped_params_files_are_valid_and_the_paper_refuses_random_weights() -> None:
    from fmbseg.datasets.registry import list_datasets
    from fmbseg.demo import DEMO_BUILDERS

    root = Path(__file__).resolve().parents[1]
    quickstart = load_params(root / "params.yaml")
    paper = load_params(root / "configs" / "paper.yaml")
    known = set(list_datasets()) | set(DEMO_BUILDERS)
    for params in (quickstart, paper):
        assert {*params.data.download, *params.data.evaluate} <= known
        # The training folder is one the download stage writes (or a folder of the user's).
        assert params.data.train in {f"{params.data.root}/{name}" for name in params.data.download}
    roles = (paper.models.clip, paper.models.sam, paper.models.encoder)
    assert not any(role.allow_random_init for role in roles)
    assert (paper.models.clip.model, paper.models.sam.variant) == ("ViT-L-14", "vit_h")
    assert paper.train.epochs == 10 and paper.train.batch_size == 5
    assert len(paper.data.evaluate) == 7


def leaf_keys(config: BaseModel, prefix: str = "") -> list[str]:
    """Dotted keys of every value that is not itself a config section."""
    keys: list[str] = []
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            keys += leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


@pytest.mark.parametrize(
    "shipped", ["params.yaml", "configs/paper.yaml", "configs/sam3-teacher.yaml"]
)
def test_shipped_params_files_write_every_key(shipped: str) -> None:
    """`dvc exp run -S key=value` only sets keys the file already has (else it needs `+key`)."""
    data = yaml.safe_load((REPO / shipped).read_text(encoding="utf-8"))
    missing = []
    for key in leaf_keys(Params()):
        node = data
        for part in key.split("."):
            node = node.get(part, MISSING) if isinstance(node, dict) else MISSING
        if node is MISSING:
            missing.append(key)
    assert not missing, f"{shipped} lacks {missing}: add them with their defaults"


def test_dvc_set_param_works_without_plus_on_a_key_left_at_its_default(tmp_path: Path) -> None:
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", copy)
    apply_overrides(copy, ["gates.manifest.min_width=500", "models.clip.checkpoint=clip.pt"])
    params = load_params(copy)
    assert params.gates.manifest.min_width == 500
    assert params.models.clip.checkpoint == "clip.pt"
