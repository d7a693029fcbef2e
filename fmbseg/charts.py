"""PNG charts written beside the stages' DVC plot data (``loss.csv``, ``per_class.csv``).

``dvc plots show`` renders its vega charts with scripts from a CDN, so they are blank offline;
these images are declared as DVC image plots and logged to MLflow, so every chart can be seen
without network. matplotlib (Agg backend) is imported only when a chart is drawn.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fmbseg.io.atomic import atomic_write, write_text_atomic

LOSS_FILE = "loss.csv"  # step, epoch, loss: a DVC plot
LOSS_CHART = "loss.png"  # the same as an image, readable offline


@contextlib.contextmanager
def _figure(path: Path, width: float, height: float) -> Iterator[Any]:
    """A figure's axes; on exit the figure is saved to ``path`` atomically and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(width, height))
    try:
        yield axes
        figure.tight_layout()
        with atomic_write(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(figure)


def write_loss_curve(out: Path, losses: Sequence[float], steps_per_epoch: int) -> None:
    """A trainer's ``loss.csv`` and ``loss.png`` in ``out``; an "epoch" is ``steps_per_epoch``
    steps (a checkpoint interval for trainers that count steps)."""
    rows = ["step,epoch,loss"]
    rows += [f"{s + 1},{s // steps_per_epoch + 1},{loss!r}" for s, loss in enumerate(losses)]
    write_text_atomic(out / LOSS_FILE, "\n".join(rows) + "\n")
    write_loss_png(out / LOSS_CHART, losses, steps_per_epoch)


def write_loss_png(path: str | Path, losses: Sequence[float], steps_per_epoch: int) -> None:
    """The training loss per step, with each epoch's mean as a step line."""
    epochs = [
        losses[start : start + steps_per_epoch] for start in range(0, len(losses), steps_per_epoch)
    ]
    with _figure(Path(path), 6.4, 4.0) as axes:
        axes.plot(range(1, len(losses) + 1), losses, linewidth=0.8, alpha=0.6, label="step")
        for index, epoch in enumerate(epochs):
            first = index * steps_per_epoch + 1
            mean = sum(epoch) / len(epoch)
            axes.hlines(mean, first, first + len(epoch) - 1, colors="C1", linewidth=2)
        axes.plot([], [], color="C1", linewidth=2, label="epoch mean")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(f"training loss ({len(epochs)} epochs, {len(losses)} steps)")
        axes.legend(loc="upper right")
        axes.grid(alpha=0.3)


def write_iou_bars_png(
    path: str | Path, class_names: Sequence[str], iou: Sequence[float | None]
) -> None:
    """Per-class IoU as horizontal bars, in vocabulary order; classes absent from both the
    ground truth and the predictions are marked "absent" instead of a bar."""
    count = len(class_names)
    values = [math.nan if value is None else value for value in iou]
    present = [value for value in values if not math.isnan(value)]
    mean = sum(present) / len(present) if present else math.nan
    with _figure(Path(path), 6.4, min(2.0 + 0.22 * count, 40.0)) as axes:
        rows = range(count)
        axes.barh(rows, [0.0 if math.isnan(v) else v for v in values], color="C0")
        for row, value in zip(rows, values, strict=True):
            if math.isnan(value):
                axes.text(0.01, row, "absent", va="center", fontsize=7, color="grey")
        axes.set_yticks(rows, labels=list(class_names), fontsize=max(4.0, min(9.0, 300 / count)))
        axes.invert_yaxis()
        axes.set_xlim(0.0, 1.0)
        axes.set_xlabel("IoU")
        axes.set_title(f"per-class IoU (mIoU {mean:.3f} over {len(present)} classes)")
        axes.grid(axis="x", alpha=0.3)
