"""The ``fmbseg`` command: fast help, one-line errors, tracebacks only with --debug."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmbseg.cli import main


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fmbseg.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code = (
        "import sys, fmbseg.cli\n"
        "try:\n    fmbseg.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'torch', 'torchvision', 'timm', 'open_clip', 'mlflow', 'prefect', 'dvc'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert result.stdout.strip().endswith("[]"), result.stdout
    assert elapsed < 2.0


def test_config_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("models:\n  devise: cpu\n")
    result = run("config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: params.yaml: models.devise: unknown key"]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("models:\n  devise: cpu\n")
    result = run("--debug", "config", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_config_prints_overridden_values(tmp_path: Path) -> None:
    result = run("config", "-S", "models.sam.variant=vit_h", cwd=tmp_path)
    assert result.returncode == 0
    assert "variant: vit_h" in result.stdout


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: fmbseg" in capsys.readouterr().out
