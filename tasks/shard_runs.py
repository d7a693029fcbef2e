"""Shard runs on a work pool: dispatched, watched for liveness, re-dispatched when they crash.

A worker killed together with its flow-run process leaves its run ``Running`` forever: nobody is
left to report the crash. So every shard run sends a heartbeat event while it works, and the
dispatching flow treats a run whose heartbeat (or any other event about it) has not advanced
for ``stale_seconds`` as crashed: it marks it ``Crashed`` and dispatches the shard again, to
whichever worker of the pool is free, at most ``retries`` times. All waiting is bounded.

Worker side: the shard run first checks that it sees the project folder the flow dispatched it
for (``$FMBSEG_PROJECT_DIR`` on shared storage, at the dispatcher's git commit); otherwise it
fails at once instead of computing shards nobody collects.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from fmbseg.errors import ConfigError

PROJECT_DIR_ENV = "FMBSEG_PROJECT_DIR"
HEARTBEAT_EVENT = "fmbseg.shard.heartbeat"


def worker_project(project_dir: str | None, expected_commit: str | None) -> Path:
    """The project folder as this worker sees it (``project_dir``, else ``$FMBSEG_PROJECT_DIR``),
    checked to be the one the dispatching flow works on."""
    folder = project_dir or os.environ.get(PROJECT_DIR_ENV)
    if not folder:
        raise ConfigError(
            f"${PROJECT_DIR_ENV} is not set on this worker: set it to the project folder "
            "on storage shared with the machine that runs the flow"
        )
    root = Path(folder).resolve()
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(
            f"{root}: this worker cannot see the project folder (no dvc.yaml there); "
            f"${PROJECT_DIR_ENV} must name the project folder on shared storage"
        )
    if expected_commit:
        from fmbseg.tracking import git_tags

        found = git_tags(root).get("git.commit")
        if found != expected_commit:
            raise ConfigError(
                f"{root}: this worker sees commit {found or 'none (not a git work tree)'}, the "
                f"flow that dispatched it is at {expected_commit}; point ${PROJECT_DIR_ENV} at "
                "the shared project folder"
            )
    return root


@contextlib.contextmanager
def heartbeat(flow_run_id: str, every_seconds: float) -> Iterator[None]:
    """Emit a heartbeat event about ``flow_run_id`` every ``every_seconds`` until the block ends."""
    from prefect.events import emit_event

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_seconds):
            emit_event(HEARTBEAT_EVENT, resource={"prefect.resource.id": _resource(flow_run_id)})

    thread = threading.Thread(target=beat, name="fmbseg-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _resource(flow_run_id: object) -> str:
    return f"prefect.flow-run.{flow_run_id}"


class ShardRunsFailed(RuntimeError):
    """A shard could not be completed; the message names it and why, on one line."""


@dataclass
class ShardRun:
    """The latest flow run of one shard (worker ``index`` of ``count``) and its liveness."""

    index: int
    count: int
    run_id: Any
    dispatches: int
    started: float  # monotonic time of the latest dispatch
    last_sign: object = None  # the latest event about the run seen so far
    last_change: float = field(default=0.0)  # monotonic time when last_sign last changed

    @property
    def name(self) -> str:
        return f"shard {self.index}/{self.count}"


@dataclass(frozen=True)
class Limits:
    stale_seconds: float  # a started run with no new event for this long has crashed
    retries: int  # re-dispatches per shard after crashes
    start_timeout_seconds: float  # a run no worker has started by then fails the flow
    poll_seconds: float


def supervise(dispatch: Callable[[int], Any], count: int, limits: Limits) -> None:
    """Dispatch shards ``0..count-1`` with ``dispatch(index) -> flow run id`` and wait until all
    are completed; crashed or silent runs are dispatched again, up to ``limits.retries`` times.
    Raises :class:`ShardRunsFailed` naming the first shard that cannot be completed."""
    from prefect.client.orchestration import get_client

    now = time.monotonic()
    runs = [ShardRun(i, count, dispatch(i), 1, now, last_change=now) for i in range(count)]
    with get_client(sync_client=True) as client:
        while runs:
            for run in list(runs):
                verdict = _check(client, run, limits, time.monotonic())
                if verdict == "completed":
                    runs.remove(run)
                elif verdict is not None:  # crashed: why
                    if run.dispatches > limits.retries:
                        raise ShardRunsFailed(
                            f"pseudo-label {run.name} crashed {run.dispatches} times, last "
                            f"{verdict} (flow run {run.run_id}); gave up after "
                            f"shard_retries={limits.retries}"
                        )
                    run.run_id = dispatch(run.index)
                    run.dispatches += 1
                    run.started = run.last_change = time.monotonic()
                    run.last_sign = None
            if runs:
                time.sleep(limits.poll_seconds)


def _check(client: Any, run: ShardRun, limits: Limits, now: float) -> str | None:
    """'completed', None (still fine), or why the run counts as crashed; raises on failure."""
    from prefect.states import Crashed

    state = client.read_flow_run(run.run_id).state
    if state is None or state.is_scheduled():
        if now - run.started > limits.start_timeout_seconds:
            raise ShardRunsFailed(
                f"pseudo-label {run.name}: no worker started flow run {run.run_id} within "
                f"{limits.start_timeout_seconds:g} s; is a worker of the pool running?"
            )
        return None
    if state.is_completed():
        return "completed"
    if state.is_crashed():
        return f"crashed: {_one_line(state.message)}"
    if state.is_final() or state.is_paused():  # failed, cancelled: retrying the same will not help
        raise ShardRunsFailed(
            f"pseudo-label {run.name} {state.name.lower()} (flow run {run.run_id}): "
            f"{_one_line(state.message)}"
        )
    sign = _latest_event(client, run.run_id)
    if sign != run.last_sign:
        run.last_sign, run.last_change = sign, now
        return None
    if now - run.last_change <= limits.stale_seconds:
        return None
    why = f"silent: no heartbeat for {limits.stale_seconds:g} s (worker or its machine died)"
    client.set_flow_run_state(run.run_id, Crashed(message=f"fmbseg: {why}"), force=True)
    return why


def _latest_event(client: Any, run_id: Any) -> object:
    """The id of the newest event about the run (state changes, heartbeats), or None."""
    from prefect.events.filters import EventFilter, EventOccurredFilter, EventResourceFilter
    from prefect.types._datetime import now as utc_now

    current = utc_now("UTC")
    window = EventOccurredFilter(
        since=current - timedelta(days=7), until=current + timedelta(days=1)
    )
    page = client.read_events(
        EventFilter(occurred=window, resource=EventResourceFilter(id=[_resource(run_id)])), limit=1
    )
    return page.events[0].id if page.events else None


def _one_line(message: str | None) -> str:
    return " ".join((message or "no message").split())
