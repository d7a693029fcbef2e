"""The light install: segmenting needs no MLOps stack, and a missing extra is named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from fmbseg.extras import OPTIONAL_MODULES

PIPELINE = sorted(name for name, extra in OPTIONAL_MODULES.items() if extra == "pipeline")
# Runs before fmbseg: importing a pipeline package fails as if it were not installed.
WITHOUT_PIPELINE = f"""
import importlib.abc, sys
BLOCKED = {PIPELINE!r}
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
"""


def run_without_pipeline(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PIPELINE + code],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def cli(*args: str) -> str:
    return f"from fmbseg.cli import main; sys.exit(main({list(args)!r}))"


def test_the_segmenter_and_predict_import_and_run_without_mlflow_prefect_dvc_or_gx(
    oracle_run, tmp_path: Path
) -> None:
    imported = run_without_pipeline(
        "import fmbseg.segmenter, fmbseg.predict, fmbseg.serving, fmbseg.registry\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {PIPELINE!r}))",
        tmp_path,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"
    helped = run_without_pipeline(cli("predict", "--help"), tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "--classes" in helped.stdout
    Image.new("RGB", (40, 30), (90, 160, 220)).save(tmp_path / "sky.png")
    overrides = ["-S", "models.clip.backend=oracle", "-S", "models.encoder.backend=oracle"]
    predicted = run_without_pipeline(
        cli("-q", "predict", "sky.png", "--classes", "sky,grass", "--model",
            str(oracle_run.module.parent), "--out", "out", *overrides),
        tmp_path,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["images"] == 1
    assert (tmp_path / "out" / "sky.png").is_file()


def test_a_command_that_needs_the_pipeline_extra_says_how_to_install_it(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = run_without_pipeline(
        cli("predict", "a.png", "--classes", "a,b", "--model", "models:/fmbseg@champion"),
        tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: fmbseg predict needs mlflow, which is not installed; install the pipeline "
        'extra: pip install "fmbseg[pipeline]"'
    ]
