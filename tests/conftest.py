"""Test-wide settings: offline, quiet, and state kept out of the user's home."""

from __future__ import annotations

import os

os.environ.setdefault("FMBSEG_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("FMBSEG_TRACKING", "0")  # tests that track set up their own MLflow store
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
if "PREFECT_HOME" not in os.environ:  # never the user's ~/.prefect
    import tempfile

    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="fmbseg-prefect-")

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

import fmbseg  # noqa: F401  (installs the torchvision repair before any test imports it)


@dataclasses.dataclass(frozen=True)
class OracleRun:
    """Stage 1 and Stage 2 run on oracle scenes; no true label was used to train ``module``."""

    params: object  # fmbseg.config.Params with oracle backends
    scenes: Path  # images/, labels/ (true labels), classes.json
    merged: Path  # Stage 1 label maps
    module: Path  # the trained module.safetensors


@pytest.fixture(scope="session")
def oracle_run(tmp_path_factory: pytest.TempPathFactory) -> OracleRun:
    import torch

    from fmbseg.align.features import run_cache_features
    from fmbseg.align.train import run_train
    from fmbseg.config import load_params
    from fmbseg.oracle.fakes import FakeClip, FakeEncoder, FakeSam
    from fmbseg.oracle.scenes import OracleWorld, write_scene_folder
    from fmbseg.pseudolabel.merge import run_merge
    from fmbseg.pseudolabel.stage import Backends, run_pseudolabel

    params = load_params(
        None,
        [
            "models.clip.backend=oracle", "models.sam.backend=oracle", "models.encoder.backend=oracle",
            "pseudolabel.short_side=256", "pseudolabel.crop_stride=32",
            "pseudolabel.automask.points_per_side=16", "features.image_size=96",
            "train.epochs=6", "train.heads=2", "train.lr=0.05",
            "inference.short_side=96", "inference.window=48", "inference.stride=24",
        ],
    )  # fmt: skip
    world = OracleWorld()
    root = tmp_path_factory.mktemp("oracle-run")
    write_scene_folder(world, 16, root / "scenes", seed=5, sizes=((96, 96), (80, 112)))
    images = root / "scenes" / "images"
    backends = Backends(FakeClip(world), FakeSam(world))
    run_pseudolabel(
        params, images, list(world.class_names), root / "pl", backends=backends, show_progress=False
    )
    run_merge(params.merge, root / "pl", root / "merged")
    encoder = FakeEncoder(world)
    run_cache_features(
        params, images, root / "merged", root / "features", encoder=encoder, show_progress=False
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and bit-reproducible
    try:
        run_train(
            params, root / "features", root / "model", text=FakeClip(world), show_progress=False
        )
    finally:
        torch.set_num_threads(threads)
    return OracleRun(
        params, root / "scenes", root / "merged", root / "model" / "module.safetensors"
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tracking on, into one SQLite MLflow store per test module (creating one costs seconds),
    with none of the caller's pipeline, DVC or Prefect context leaking in."""
    folder = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        patch.setenv("FMBSEG_TRACKING", "1")
        patch.setenv("DO_NOT_TRACK", "true")
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for name in (
            "FMBSEG_PIPELINE_RUN_ID",
            "FMBSEG_EXPERIMENT",
            "FMBSEG_ARTIFACT_ROOT",
            "DVC_STAGE",
            "DVC_ROOT",
            "PREFECT__FLOW_RUN_ID",
            "MLFLOW_RUN_ID",
        ):
            patch.delenv(name, raising=False)
        yield folder


class FileServer:
    """Files served by name from 127.0.0.1 with Range support, and the requests seen."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.url = ""


@pytest.fixture()
def file_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """A local HTTP server for download tests (downloads are switched back on)."""
    import http.server
    import threading

    monkeypatch.delenv("FMBSEG_OFFLINE", raising=False)
    state = FileServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            state.requests.append((name, self.headers.get("Range")))
            body = state.files.get(name)
            if body is None:
                self.send_error(404)
                return
            start = (
                int(self.headers["Range"].split("=")[1].split("-")[0])
                if "Range" in self.headers
                else 0
            )
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()
