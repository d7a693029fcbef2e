"""Vocabulary validation and prompt-averaged class embeddings, against a counting fake text model."""

from __future__ import annotations

import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from fmbseg.errors import InputError
from fmbseg.models.vocabulary import DEFAULT_TEMPLATES, VocabularyEncoder, validate_vocabulary


class CountingTextModel:
    """Fixed, distinct unit embeddings per prompt; records every encode_text call."""

    embed_dim = 8

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def embedding(self, prompt: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
        return F.normalize(torch.randn(self.embed_dim, generator=generator), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([self.embedding(text) for text in texts])


TEMPLATES = ("a photo of a {}.", "a drawing of the {}.", "{}")


def test_validate_strips_and_keeps_order() -> None:
    assert validate_vocabulary(["  cat", "dog  ", "sky"]) == ("cat", "dog", "sky")


def test_validate_accepts_spaces_hyphens_and_non_ascii_letters() -> None:
    names = ["traffic light", "t-shirt", "café", "Straßenbahn", "自行车"]
    assert validate_vocabulary(names) == tuple(names)


@pytest.mark.parametrize(
    ("names", "named"),
    [
        ([], "no class names"),
        (["cat", "   "], "'   '"),
        (["cat", ""], "''"),
        (["Cat", "dog", " cat "], "'cat'"),  # duplicates ignore case and surrounding space
        (["bus", "BUS"], "'BUS'"),
        ("cat", "'cat'"),  # a bare string is not a list of names
        (["cat", None], "None"),
    ],
)
def test_validate_rejects_and_names_the_offending_value(names: object, named: str) -> None:
    with pytest.raises(InputError) as caught:
        validate_vocabulary(names)  # type: ignore[arg-type]
    assert named in str(caught.value)


def test_default_template_is_the_papers() -> None:
    assert DEFAULT_TEMPLATES == ("a photo of a {}.",)


def test_embedding_averages_every_template_in_one_batched_call() -> None:
    model = CountingTextModel()
    names = ["traffic light", "cat"]

    embeddings = VocabularyEncoder(model, TEMPLATES).embed(names)

    assert len(model.calls) == 1
    assert sorted(model.calls[0]) == sorted(t.replace("{}", n) for n in names for t in TEMPLATES)
    for row, name in zip(embeddings, names, strict=True):
        mean = torch.stack([model.embedding(t.replace("{}", name)) for t in TEMPLATES]).mean(0)
        assert torch.allclose(row, F.normalize(mean, dim=-1), atol=1e-6)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_single_template_gives_the_prompt_embedding() -> None:
    model = CountingTextModel()
    embeddings = VocabularyEncoder(model).embed(["dog"])
    assert torch.allclose(embeddings[0], model.embedding("a photo of a dog."), atol=1e-6)


def test_a_vocabulary_is_encoded_once() -> None:
    model = CountingTextModel()
    encoder = VocabularyEncoder(model, TEMPLATES)

    first = encoder.embed(["cat", "dog"])
    again = encoder.embed([" cat", "dog "])  # the same vocabulary once validated
    assert len(model.calls) == 1
    assert again is first

    reordered = encoder.embed(["dog", "cat"])
    assert len(model.calls) == 2
    assert torch.equal(reordered, first.flip(0))


def test_invalid_vocabulary_is_refused_before_encoding() -> None:
    model = CountingTextModel()
    with pytest.raises(InputError):
        VocabularyEncoder(model).embed(["cat", "Cat"])
    assert model.calls == []


@pytest.mark.parametrize("templates", [(), ("a photo of a cat.",)])
def test_templates_need_a_slot_for_the_name(templates: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        VocabularyEncoder(CountingTextModel(), templates)


def test_import_does_not_load_torch() -> None:
    probe = "import sys, fmbseg.models.vocabulary; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_vocabulary_file_lines_are_class_ids(tmp_path) -> None:
    from fmbseg.models.vocabulary import read_vocabulary_file

    path = tmp_path / "classes.txt"
    path.write_text("cat\n  traffic light \ncrème brûlée\n\n", encoding="utf-8")
    assert read_vocabulary_file(path) == ("cat", "traffic light", "crème brûlée")
    path.write_text("cat\n\ndog\n", encoding="utf-8")
    with pytest.raises(InputError, match="classes.txt: line 2 is blank"):
        read_vocabulary_file(path)
    path.write_text("cat\nCat\n", encoding="utf-8")
    with pytest.raises(InputError, match="classes.txt: .*duplicate class name 'Cat'"):
        read_vocabulary_file(path)
    path.write_bytes(b"\xff\xfe cat")
    with pytest.raises(InputError, match="not UTF-8"):
        read_vocabulary_file(path)
    with pytest.raises(InputError, match="class-name file not found"):
        read_vocabulary_file(tmp_path / "absent.txt")
