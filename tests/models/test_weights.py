"""The weight resolver's order, provenance and messages, with a stand-in download."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from fmbseg.errors import WeightsError
from fmbseg.models.weights import WeightsRequest, resolve_weights


def request(download=None, url: str | None = "https://example.invalid/w.pth") -> WeightsRequest:
    return WeightsRequest("sam", "vit_t", ("w.pth",), source_url=url, download=download)


def resolve(req: WeightsRequest, **kwargs):
    options = {"checkpoint": None, "weights_dir": None, "allow_random_init": False} | kwargs
    return resolve_weights(req, **options)


def test_explicit_file_wins_and_is_hashed(tmp_path: Path) -> None:
    file = tmp_path / "mine.pth"
    file.write_bytes(b"weights")
    (tmp_path / "sam").mkdir()
    (tmp_path / "sam" / "w.pth").write_bytes(b"other")
    resolved = resolve(request(), checkpoint=str(file), weights_dir=str(tmp_path))
    assert resolved.path == file
    assert resolved.provenance.source == "file"
    assert resolved.provenance.tag == "sha256:" + hashlib.sha256(b"weights").hexdigest()


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="models.sam.checkpoint: .*absent.pth does not exist"):
        resolve(request(), checkpoint=str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("layout", ["sam/w.pth", "w.pth"])
def test_weights_dir_param_and_environment(tmp_path: Path, monkeypatch, layout: str) -> None:
    (tmp_path / layout).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / layout).write_bytes(b"w")
    assert resolve(request(), weights_dir=str(tmp_path)).path == tmp_path / layout
    monkeypatch.setenv("FMBSEG_WEIGHTS_DIR", str(tmp_path))
    resolved = resolve(request(), weights_dir=str(tmp_path / "elsewhere"))
    assert resolved.path == tmp_path / layout
    assert resolved.provenance.source == "weights_dir"


def test_download_is_used_when_reachable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FMBSEG_OFFLINE", raising=False)
    target = tmp_path / "dl.pth"

    def fake_download() -> Path:
        target.write_bytes(b"downloaded")
        return target

    resolved = resolve(request(fake_download, url=None))
    assert resolved.path == target and resolved.provenance.source == "download"


def test_offline_fails_fast_with_placement_message(tmp_path: Path) -> None:
    calls: list[int] = []
    with pytest.raises(WeightsError) as error:
        resolve(request(lambda: calls.append(1)), weights_dir=str(tmp_path))  # type: ignore[arg-type,return-value]
    message = str(error.value)
    assert calls == []  # FMBSEG_OFFLINE (set for tests) skips the attempt
    assert (
        f"place w.pth (the file published at https://example.invalid/w.pth) in {tmp_path / 'sam'}/"
        in message
    )
    assert "FMBSEG_OFFLINE" in message and "allow_random_init" in message


def test_random_init_only_when_allowed_and_loud(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        resolved = resolve(request(), allow_random_init=True)
    assert resolved.path is None
    assert resolved.provenance.is_random and resolved.provenance.tag == "random-init"
    assert "RANDOM-INIT WEIGHTS for sam vit_t" in caplog.text
