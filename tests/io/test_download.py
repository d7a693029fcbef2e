"""Downloads against a server the test starts on 127.0.0.1: resume, hash check, offline switch."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmbseg.io.download import DownloadError, download_file, unreachable_reason

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves PAYLOAD at /file.bin with Range support; /broken.bin is cut short."""

    ranges_seen: list[str] = []

    def do_GET(self) -> None:
        body = PAYLOAD if self.path == "/file.bin" else PAYLOAD[:1000]
        start = 0
        if (header := self.headers.get("Range")) is not None:
            _Handler.ranges_seen.append(header)
            start = int(header.split("=")[1].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("FMBSEG_OFFLINE", raising=False)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_downloads_and_verifies_full_hash(server: str, tmp_path: Path) -> None:
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert download_file(f"{server}/file.bin", tmp_path / "f.bin", sha256=digest) == digest
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert not (tmp_path / "f.bin.part").exists()


def test_resumes_from_partial_file(server: str, tmp_path: Path) -> None:
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:300_000])
    _Handler.ranges_seen.clear()
    digest = download_file(
        f"{server}/file.bin", tmp_path / "f.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest()[:8]
    )
    assert _Handler.ranges_seen == ["bytes=300000-"]
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert digest == hashlib.sha256(PAYLOAD).hexdigest()


def test_hash_mismatch_leaves_nothing_behind(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="expected"):
        download_file(
            f"{server}/broken.bin", tmp_path / "f.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest()
        )
    assert list(tmp_path.iterdir()) == []


def test_offline_switch_fails_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FMBSEG_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="FMBSEG_OFFLINE"):
        download_file("https://example.invalid/x.bin", tmp_path / "x.bin")
    assert time.perf_counter() - start < 1.0


def test_closed_port_is_reported_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FMBSEG_OFFLINE", raising=False)
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reason = unreachable_reason(f"http://127.0.0.1:{port}/x", timeout=2.0)
    assert reason is not None and f"127.0.0.1:{port}" in reason
