"""One real Prefect server for the flow tests that need one (started once per session: startup
takes up to a minute on a loaded 2-core box), with the `gpu` and `cpu` process pools of
prefect.yaml."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
POOLS = ("gpu", "cpu")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prefect(*argv: str, env: dict[str, str], cwd: Path) -> str:
    """``prefect <argv>``; its stdout and stderr together, asserted to have succeeded."""
    done = subprocess.run(
        [str(BIN / "prefect"), *argv], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A `prefect server` on 127.0.0.1 with the `gpu` and `cpu` process pools; yields the
    environment that clients, deployers and workers of the tests use (no project, tracking or
    worker settings of the caller's)."""
    home = tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_CLI_PROMPT": "false",
    }
    for name in ("FMBSEG_PROJECT_DIR", "FMBSEG_PIPELINE_RUN_ID", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    host, port = url.removeprefix("http://").removesuffix("/api").split(":")
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", host, "--port", port, "--no-ui"],
        env=env,
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "no prefect server"
            time.sleep(0.5)
        for pool in POOLS:
            prefect("work-pool", "create", pool, "--type", "process", env=env, cwd=home)
        yield env
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
