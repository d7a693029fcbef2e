"""Timing and peak memory of single calls, and a description of the machine they ran on.

Peak resident memory is per call, not per process: on Linux a process may reset its own
high-water mark (``5`` written to ``/proc/self/clear_refs``), so each timed call reports the
largest RSS reached during that call (model weights already resident included). Elsewhere the
process's lifetime peak is the best available and the report says so.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
MIB = 1024 * 1024
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
PACKAGES = ("torch", "timm", "open_clip_torch", "segment-anything", "numpy", "fmbseg")


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Resident memory now and its peak since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.method = "vmhwm-reset" if self._reset() else "process-lifetime-peak"

    @staticmethod
    def _reset() -> bool:
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return _status_bytes("VmHWM") is not None

    def reset(self) -> None:
        if self.method == "vmhwm-reset":
            self._reset()

    def current(self) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def peak(self) -> int:
        if self.method == "vmhwm-reset":
            return _status_bytes("VmHWM") or 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass(frozen=True)
class Sample:
    """One timed call."""

    seconds: float  # wall clock
    cpu_seconds: float  # CPU time of the process, all threads: moved less by other load
    peak_rss_mib: float  # largest resident set during the call
    rss_before_mib: float  # resident set when the call started
    peak_device_mib: float | None  # CUDA memory allocated at peak, where the device is CUDA


class Recorder:
    """Times named calls over warm-up and measured rounds; warm-up calls are not recorded.

    Calls of different names alternate inside a round, so a comparison's two sides see the
    same machine load, which on shared machines moves more than any difference measured.
    With a time budget, measured rounds stop once it is spent (after at least one), so cheap
    cases get every repeat and expensive ones still finish.
    """

    def __init__(
        self, device: torch.device, warmup: int, repeats: int, budget_s: float | None = None
    ) -> None:
        self.device = device
        self.warmup = warmup
        self.repeats = repeats
        self.budget_s = budget_s
        self.memory = PeakMemory()
        self.samples: dict[str, list[Sample]] = {}
        self._recording = False

    def rounds(self, warmup: int | None = None) -> Iterator[int]:
        """Round numbers; the first ``warmup`` (default: the recorder's) are not recorded."""
        skipped = self.warmup if warmup is None else warmup
        measured_since: float | None = None
        for index in range(skipped + self.repeats):
            if index == skipped:
                measured_since = time.perf_counter()
            elif (
                measured_since is not None
                and self.budget_s is not None
                and time.perf_counter() - measured_since > self.budget_s
            ):
                break
            self._recording = index >= skipped
            yield index
        self._recording = False

    def time(self, name: str, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)``, timed and recorded under ``name`` (unless warming up)."""
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        before = self.memory.current()
        self.memory.reset()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = call(*args)
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if self._recording:
            device_peak = torch.cuda.max_memory_allocated(self.device) / MIB if cuda else None
            peak = self.memory.peak() / MIB
            sample = Sample(seconds, cpu_seconds, peak, before / MIB, device_peak)
            self.samples.setdefault(name, []).append(sample)
        return result

    def as_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {name: [asdict(s) for s in samples] for name, samples in self.samples.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (a container's share), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    import psutil

    return {
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": usable_cores(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def device_info(device: torch.device) -> dict[str, Any]:
    """What the measured cases ran on (reported by a worker, which owns the device)."""
    import torch

    info: dict[str, Any] = {"type": device.type, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info |= {"name": properties.name, "memory_gib": round(properties.total_memory / 1024**3, 1)}
    else:
        info["name"] = cpu_model()
    return info
