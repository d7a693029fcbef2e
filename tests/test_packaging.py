"""The install: ranges in pyproject.toml, exact pins in constraints.txt, one setup command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.!]+", version), f"not an exact pin: {line!r}"
            found[canonicalize_name(name)] = version
    return found


def requirements(extra: str | None = None) -> list[Requirement]:
    texts = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(text) for text in texts]


def test_every_requirement_is_pinned_in_the_constraints_within_its_range() -> None:
    pinned = pins()
    for extra in [None, *PROJECT["optional-dependencies"]]:
        for requirement in requirements(extra):
            name = canonicalize_name(requirement.name)
            if name == "fmbseg":
                continue
            assert name in pinned, f"{requirement} ([{extra}]) has no pin in constraints.txt"
            assert requirement.specifier.contains(pinned[name], prereleases=True), (
                f"constraints.txt pins {name}=={pinned[name]}, outside {requirement}"
            )
    # torch and torchvision move together; left alone the resolver moves both
    assert (pinned["torch"], pinned["torchvision"]) == ("2.13.0", "0.28.0")


def test_the_light_install_leaves_the_mlops_stack_to_the_pipeline_extra() -> None:
    base = {canonicalize_name(r.name) for r in requirements()}
    pipeline = {canonicalize_name(r.name) for r in requirements("pipeline")}
    assert {"mlflow", "prefect", "dvc", "great-expectations"} <= pipeline
    assert not base & pipeline
    assert all(str(r.specifier) for r in requirements()), "ranges, not bare names"
    assert not [r for r in requirements() if any(s.operator == "==" for s in r.specifier)]
    dev = {str(r) for r in requirements("dev")}
    assert "fmbseg[demo,pipeline]" in {str(Requirement(t)) for t in dev}


def test_the_readme_setup_installs_everything_with_the_constraints_in_one_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- ci:setup -->\n```bash\n(.*?)\n```", readme, re.S)
    assert block is not None
    commands = block.group(1).strip().splitlines()
    assert len(commands) == 1
    assert '-c constraints.txt -e ".[dev]"' in commands[0]
