"""Typed params: defaults <- file <- overrides, strict, with one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmbseg.config import ModelsConfig, Params, load_params, save_config
from fmbseg.errors import ConfigError


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
        assert {params.data.train, *params.data.evaluate} <= known
    roles = (paper.models.clip, paper.models.sam, paper.models.encoder)
    assert not any(role.allow_random_init for role in roles)
    assert (paper.models.clip.model, paper.models.sam.variant) == ("ViT-L-14", "vit_h")
    assert paper.train.epochs == 10 and paper.train.batch_size == 5
    assert len(paper.data.evaluate) == 7
