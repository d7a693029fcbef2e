"""Flows started as documented keep their state in the project and send nothing out."""

from __future__ import annotations

import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
QUIET = (
    "DO_NOT_TRACK",
    "MLFLOW_DISABLE_TELEMETRY",
    "MLFLOW_TRACKING_URI",
    "GX_ANALYTICS_ENABLED",
    "HF_HUB_DISABLE_TELEMETRY",
    "FMBSEG_PROJECT_DIR",
)


class RecordingProxy(socketserver.ThreadingTCPServer):
    """An HTTP(S) proxy on 127.0.0.1 that records the first line of every request (``CONNECT
    host:443 ...``) and answers none: whatever tries to reach the internet shows up here."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[str] = []
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy.requests.append(self.rfile.readline().decode(errors="replace").strip())

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    server = RecordingProxy()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_pipeline_flow_keeps_prefect_in_the_project_and_sends_no_telemetry(
    tmp_path: Path, proxy: RecordingProxy
) -> None:
    """``python -m flows.pipeline`` as a user runs it: no quiet settings in the environment."""
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"evaluate": ["demo_voc"]}}))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in QUIET and not key.startswith(("PREFECT_", "DVC_"))
    }
    address = f"http://127.0.0.1:{proxy.server_address[1]}"
    env |= {
        "HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "FMBSEG_TRACKING": "1",
        "HTTP_PROXY": address,
        "HTTPS_PROXY": address,
        "ALL_PROXY": address,
        "NO_PROXY": "127.0.0.1,localhost",
    }
    dvc = str(Path(bin_dir) / "dvc")
    setup = env | {"DVC_NO_ANALYTICS": "1"}
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=project, env=setup, check=True)
    # as committed in this repository's .dvc/config
    subprocess.run([dvc, "config", "core.analytics", "false"], cwd=project, env=setup, check=True)
    done = subprocess.run(
        [sys.executable, "-m", "flows.pipeline"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    # the flow ran dvc, then found nothing to promote in this empty project
    assert "dvc repro" in output, output[-3000:]
    assert "has no version with alias 'candidate'" in output, output[-3000:]
    assert not (home / ".prefect").exists()
    assert (project / ".prefect" / "prefect.db").is_file()
    assert (project / "mlflow.db").is_file()
    assert proxy.requests == []
