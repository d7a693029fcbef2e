"""Fixtures of the reliability tests (oracle scenes, the ``fmbseg`` command run in this
process) and the table of observed outcomes; plain helpers are in ``reliability_support.py``.

Each test reports what it tried and what it saw through the ``outcome`` fixture. When every
test of this folder has run and passed, the rows are rendered into ``docs/reliability.md``
(:mod:`reliability_table`), so the document shows what a real run observed, not what someone
remembered.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability_support import WORLD, CliResult
from reliability_table import Row, write_document

from fmbseg.masks import IGNORE_LABEL
from fmbseg.oracle.scenes import IGNORE_PNG, write_scene_folder
from fmbseg.pseudolabel.merge import label_map_path, write_label_map

HERE = Path(__file__).parent
DOCUMENT = HERE.parent.parent / "docs" / "reliability.md"


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., CliResult]:
    """``cli("pseudolabel --out pl", *more_args, cwd=folder)`` runs ``fmbseg -q COMMAND ARGS``
    in this process (the ``main`` of the console script, without the seconds of a new
    interpreter) in ``folder``, and leaves the environment as it was. ``COMMAND`` is split at
    spaces; the other arguments are passed as they are."""
    from fmbseg.cli import main

    def run(command: str, *args: str, cwd: Path) -> CliResult:
        monkeypatch.chdir(cwd)
        environment = dict(os.environ)
        capsys.readouterr()
        try:
            code = main(["-q", *command.split(), *args])
        finally:
            os.environ.clear()
            os.environ.update(environment)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 oracle scenes (``images/``, true ``labels/``) and their class-name file."""
    root = tmp_path_factory.mktemp("scenes")
    write_scene_folder(WORLD, 16, root, seed=7, sizes=((64, 80),))
    (root / "classes.txt").write_text("\n".join(WORLD.class_names), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def merged(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merge folder holding the scenes' true labels (what Stage 2 reads from Stage 1)."""
    folder = tmp_path_factory.mktemp("stage1") / "merged"
    for path in sorted((scenes / "labels").glob("*.png")):
        labels = np.asarray(Image.open(path)).astype(np.uint16)
        labels[labels == IGNORE_PNG] = IGNORE_LABEL
        write_label_map(label_map_path(folder, path.stem), labels)
    run = {"pseudolabel_run": {"vocabulary": list(WORLD.class_names)}}
    (folder / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return folder


# --- the table of outcomes ----------------------------------------------------------------------

_ROWS = pytest.StashKey[list[Row]]()
_EXPECTED = pytest.StashKey[set[str]]()
_passed: set[str] = set()  # node ids of this folder's tests that ended as expected


@pytest.fixture
def outcome(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., None]:
    """``outcome(area, case, run, code=..., message=..., left=...)`` adds one row to the table.

    Temporary folders and local ports are replaced by stable text, so the table only changes
    when an outcome does.
    """
    base = re.escape(str(tmp_path_factory.getbasetemp()))

    def clean(text: str) -> str:
        text = re.sub(base + r"/[^/\s'\"]+/", "", text)
        return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)

    def record(area: str, case: str, run: str, *, code: int | str, message: str, left: str) -> None:
        row = Row(area, case, clean(run), str(code), clean(message), clean(left))
        request.config.stash.setdefault(_ROWS, []).append(row)

    return record


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[_EXPECTED] = {item.nodeid for item in items if HERE in item.path.parents}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    as_expected = report.passed or (report.skipped and hasattr(report, "wasxfail"))
    if report.when == "call" and as_expected:
        _passed.add(report.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Rewrite the document only after a complete, green run of this folder."""
    expected = session.config.stash.get(_EXPECTED, set())
    if expected and expected <= _passed:
        write_document(DOCUMENT, session.config.stash.get(_ROWS, []))
