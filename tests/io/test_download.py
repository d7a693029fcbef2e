"""Downloads against a server the test starts on 127.0.0.1: resume, hash check, offline switch."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from fmbseg.io.download import DownloadError, download_file, unreachable_reason

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture()
def server(file_server):
    """/file.bin is PAYLOAD; /broken.bin is cut to its first 1000 bytes."""
    file_server.files.update({"file.bin": PAYLOAD, "broken.bin": PAYLOAD[:1000]})
    return file_server


def test_downloads_and_verifies_full_hash(server, tmp_path: Path) -> None:
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert download_file(f"{server.url}/file.bin", tmp_path / "f.bin", sha256=digest) == digest
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert not (tmp_path / "f.bin.part").exists()


def test_resumes_from_partial_file(server, tmp_path: Path) -> None:
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:300_000])
    digest = download_file(
        f"{server.url}/file.bin", tmp_path / "f.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest()[:8]
    )
    assert server.requests == [("file.bin", "bytes=300000-")]
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert digest == hashlib.sha256(PAYLOAD).hexdigest()


def test_hash_mismatch_leaves_nothing_behind(server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="expected"):
        download_file(
            f"{server.url}/broken.bin",
            tmp_path / "f.bin",
            sha256=hashlib.sha256(PAYLOAD).hexdigest(),
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
