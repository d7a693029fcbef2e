"""A shard run refuses at once, in one line naming the path, a project folder it cannot see or
that is not the dispatcher's commit (instead of computing shards nobody collects)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fmbseg.errors import ConfigError
from tasks.shard_runs import worker_project


def git(root: Path, *argv: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    git(root, "init", "-q")
    git(root, "add", "dvc.yaml")
    git(root, "commit", "-qm", "one")
    return root


def test_the_project_folder_comes_from_the_workers_environment(project, monkeypatch) -> None:
    monkeypatch.setenv("FMBSEG_PROJECT_DIR", str(project))
    commit = git(project, "rev-parse", "HEAD")
    assert worker_project(None, commit) == project.resolve()


def test_a_worker_without_the_project_folder_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FMBSEG_PROJECT_DIR", raising=False)
    with pytest.raises(ConfigError, match=r"^\$FMBSEG_PROJECT_DIR is not set on this worker"):
        worker_project(None, None)
    missing = tmp_path / "not-mounted"
    monkeypatch.setenv("FMBSEG_PROJECT_DIR", str(missing))
    with pytest.raises(ConfigError) as refused:
        worker_project(None, None)
    assert str(refused.value).startswith(f"{missing}: this worker cannot see the project folder")
    assert "\n" not in str(refused.value)


def test_a_worker_at_another_commit_says_which(project, monkeypatch) -> None:
    expected = git(project, "rev-parse", "HEAD")
    (project / "params.yaml").write_text("a: 1\n")
    git(project, "add", "params.yaml")
    git(project, "commit", "-qm", "two")
    seen = git(project, "rev-parse", "HEAD")
    monkeypatch.setenv("FMBSEG_PROJECT_DIR", str(project))
    with pytest.raises(ConfigError) as refused:
        worker_project(None, expected)
    message = str(refused.value)
    assert message.startswith(f"{project.resolve()}: this worker sees commit {seen}")
    assert expected in message and "\n" not in message
