"""Class vocabularies: validated names and their prompt-averaged text embeddings.

Cheap to import (torch is imported when embeddings are computed), so entry points can validate a
vocabulary before any model is built.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fmbseg.errors import InputError

if TYPE_CHECKING:
    import torch

    from fmbseg.models.base import VisionLanguageModel

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def validate_vocabulary(names: Iterable[str]) -> tuple[str, ...]:
    """Stripped class names; an empty vocabulary, blank or duplicate names are input errors.

    Names are NFC-normalised (one spelling of "crème" whatever the keyboard), and duplicates are
    compared case-insensitively, since "Cat" and "cat" would compete for the same pixels with
    near-identical text embeddings.
    """
    if isinstance(names, str):
        raise InputError(f"vocabulary: expected a list of class names, got the string {names!r}")
    cleaned: list[str] = []
    first_seen: dict[str, str] = {}
    for position, raw in enumerate(names):
        if not isinstance(raw, str):
            raise InputError(f"vocabulary entry {position}: expected a class name, got {raw!r}")
        name = unicodedata.normalize("NFC", raw).strip()
        if not name:
            raise InputError(f"vocabulary entry {position}: blank class name {raw!r}")
        key = name.casefold()
        if key in first_seen:
            raise InputError(
                f"vocabulary entry {position}: duplicate class name {name!r} "
                f"(same as {first_seen[key]!r})"
            )
        first_seen[key] = name
        cleaned.append(name)
    if not cleaned:
        raise InputError("vocabulary: no class names given")
    return tuple(cleaned)


def read_vocabulary_file(path: str | Path) -> tuple[str, ...]:
    """A UTF-8 file of class names, one per line: line N is class N-1, so only trailing blank
    lines are allowed; names are validated as by :func:`validate_vocabulary`."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{file}: class-name file not found") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if "" in (line.strip() for line in lines):
        blank = [line.strip() for line in lines].index("") + 1
        raise InputError(f"{file}: line {blank} is blank (every line is a class)")
    try:
        return validate_vocabulary(lines)
    except InputError as exc:
        raise InputError(f"{file}: {exc}") from None


class VocabularyEncoder:
    """One text embedding per class: every template filled, encoded, averaged, re-normalised.

    Embeddings are cached per vocabulary on the instance, so a stage that scores many images
    against the same class names encodes them once.
    """

    def __init__(
        self, model: VisionLanguageModel, templates: tuple[str, ...] = DEFAULT_TEMPLATES
    ) -> None:
        if not templates or any("{}" not in template for template in templates):
            raise ValueError(f"templates must be non-empty and each contain '{{}}': {templates!r}")
        self.model = model
        self.templates = tuple(templates)
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}

    def embed(self, class_names: Iterable[str]) -> torch.Tensor:
        """(K, D) normalised embeddings in the order of ``class_names`` (shared, do not modify)."""
        names = validate_vocabulary(class_names)
        if names not in self._cache:
            self._cache[names] = self._encode(names)
        return self._cache[names]

    def _encode(self, names: tuple[str, ...]) -> torch.Tensor:
        import torch.nn.functional as F

        prompts = [template.replace("{}", name) for name in names for template in self.templates]
        per_prompt = self.model.encode_text(prompts)
        per_class = per_prompt.reshape(len(names), len(self.templates), -1).mean(dim=1)
        return F.normalize(per_class, dim=-1)
