"""PNG charts beside the DVC plot data: real images that can be read without network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fmbseg.charts import write_iou_bars_png, write_loss_png


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_the_loss_chart_draws_one_falling_epoch_mean_per_epoch(tmp_path: Path) -> None:
    losses = [2.0 - 0.1 * step for step in range(12)]
    write_loss_png(tmp_path / "loss.png", losses, steps_per_epoch=4)
    image = pixels(tmp_path / "loss.png")
    assert image.shape[:2] == (400, 640)
    # Epoch means are long orange (C1) segments: three of them, lower (larger row) to the right.
    orange = (image[..., 0] > 200) & (image[..., 1] > 90) & (image[..., 1] < 170)
    orange &= image[..., 2] < 90
    rows = np.flatnonzero(orange.sum(axis=1) > 50)
    groups = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    centres = [np.argwhere(orange[group])[:, 1].mean() for group in groups]
    assert len(groups) == 3 and centres == sorted(centres)


def test_iou_bars_are_as_long_as_the_iou_and_absent_classes_have_none(tmp_path: Path) -> None:
    write_iou_bars_png(tmp_path / "bars.png", ["sky", "road", "cat"], [1.0, 0.25, None])
    image = pixels(tmp_path / "bars.png")
    blue = (image[..., 2] > 150) & (image[..., 0] < 120) & (image[..., 1] < 170)
    rows = np.flatnonzero(blue.sum(axis=1) > 0)
    bars = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    sky, road = (int(np.median(blue[bar].sum(axis=1))) for bar in bars)
    # Two bars (vocabulary order, top down); IoU 1.0 is four times as long as IoU 0.25.
    assert len(bars) == 2 and abs(sky / road - 4) < 0.05


def test_charts_are_the_same_bytes_for_the_same_data(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        write_loss_png(tmp_path / name, [1.0, 0.5, 0.25], steps_per_epoch=1)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_importing_the_module_does_not_import_matplotlib() -> None:
    code = "import sys, fmbseg.charts; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
