"""Safe extraction: hostile members refuse the whole archive before anything is written."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from fmbseg.datasets.archives import archive_folder_name, extract_archive
from fmbseg.errors import InputError


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return path


def make_zip(path: Path, members: list[zipfile.ZipInfo | tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for member in members:
            if isinstance(member, zipfile.ZipInfo):
                zf.writestr(member, b"target.txt")
            else:
                zf.writestr(*member)
    return path


def link(name: str, kind: bytes, target: str = "ok/a.txt") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def assert_nothing_extracted(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive"]


@pytest.fixture()
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "archive").mkdir()
    return tmp_path


GOOD = ("ok/a.txt", b"fine")


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (("../escape.txt", b"x"), "path escapes the target folder"),
        (("ok/../../escape.txt", b"x"), "path escapes the target folder"),
        (("/etc/evil", b"x"), "absolute path"),
        (link("ok/link", tarfile.SYMTYPE, "/etc/passwd"), "link to '/etc/passwd'"),
        (link("ok/hard", tarfile.LNKTYPE), "link to 'ok/a.txt'"),
        (link("ok/dev", tarfile.CHRTYPE), "device, FIFO or other special file"),
        (link("ok/fifo", tarfile.FIFOTYPE), "device, FIFO or other special file"),
    ],
)
def test_hostile_tar_members_refuse_the_whole_archive(tmp: Path, member, reason: str) -> None:
    archive = make_tar(tmp / "archive" / "data.tar", [GOOD, member])
    name = member[0] if isinstance(member, tuple) else member.name
    with pytest.raises(InputError, match=rf"data\.tar: refusing member '{name}' \({reason}"):
        extract_archive(archive, tmp / "data")
    assert_nothing_extracted(tmp)


def test_zip_with_dot_dot_path_is_refused(tmp: Path) -> None:
    archive = make_zip(tmp / "archive" / "data.zip", [GOOD, ("a/../../escape.txt", b"x")])
    with pytest.raises(InputError, match="'a/../../escape.txt' .path escapes"):
        extract_archive(archive, tmp / "data")
    assert_nothing_extracted(tmp)


def test_zip_with_backslash_dot_dot_path_is_refused(tmp: Path) -> None:
    archive = make_zip(tmp / "archive" / "data.zip", [("..\\escape.txt", b"x")])
    with pytest.raises(InputError, match="path escapes"):
        extract_archive(archive, tmp / "data")
    assert_nothing_extracted(tmp)


def test_zip_with_symlink_is_refused(tmp: Path) -> None:
    info = zipfile.ZipInfo("ok/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = make_zip(tmp / "archive" / "data.zip", [GOOD, info])
    with pytest.raises(InputError, match=r"refusing member 'ok/link' \(symbolic link\)"):
        extract_archive(archive, tmp / "data")
    assert_nothing_extracted(tmp)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".zip"])
def test_only_the_wanted_members_are_extracted(tmp: Path, suffix: str) -> None:
    members = [("top/keep/a.txt", b"a"), ("top/keep/sub/b.txt", b"b"), ("top/skip/c.txt", b"c"),
               ("top/list.txt", b"l"), ("top/list.txt.bak", b"x")]  # fmt: skip
    make = make_zip if suffix == ".zip" else make_tar
    archive = make(tmp / "archive" / f"data{suffix}", members)
    target = extract_archive(archive, tmp / "data", ["top/keep/", "top/list.txt"])
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert files == ["top/keep/a.txt", "top/keep/sub/b.txt", "top/list.txt"]
    assert (target / "top/keep/sub/b.txt").read_bytes() == b"b"


def test_rerun_finds_the_extraction_and_does_nothing(tmp: Path) -> None:
    archive = make_tar(tmp / "archive" / "data.tar", [GOOD])
    target = extract_archive(archive, tmp / "data")
    archive.unlink()  # would fail if it were opened again
    assert extract_archive(archive, tmp / "data") == target
    assert (target / "ok" / "a.txt").read_bytes() == b"fine"


def test_truncated_archive_is_an_input_error_and_leaves_nothing(tmp: Path) -> None:
    archive = make_tar(tmp / "archive" / "data.tar.gz", [("a.txt", bytes(range(256)) * 400)])
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(InputError, match=r"data\.tar\.gz: corrupt archive"):
        extract_archive(archive, tmp / "data")
    assert_nothing_extracted(tmp)


def test_archive_folder_names_drop_the_extension() -> None:
    assert archive_folder_name("VOCtrainval_11-May-2012.tar") == "VOCtrainval_11-May-2012"
    assert archive_folder_name("trainval.tar.gz") == "trainval"
    assert archive_folder_name("val2017.zip") == "val2017"
    with pytest.raises(InputError, match="not a tar or zip"):
        archive_folder_name("labels.txt")


@pytest.mark.parametrize("suffix", [".tar", ".zip"])
def test_other_member_prefixes_are_added_to_an_existing_extraction(tmp: Path, suffix: str) -> None:
    members = [("top/val/a.txt", b"a"), ("top/train/b.txt", b"b"), ("top/train/sub/c.txt", b"c")]
    make = make_zip if suffix == ".zip" else make_tar
    archive = make(tmp / "archive" / f"data{suffix}", members)
    target = extract_archive(archive, tmp / "data", ["top/val/"])
    assert not (target / "top/train").exists()
    extract_archive(archive, tmp / "data", ["top/train/"])
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert files == ["top/train/b.txt", "top/train/sub/c.txt", "top/val/a.txt"]
    assert sorted(p.name for p in tmp.iterdir()) == ["archive", "data"]  # no partial left
    archive.unlink()  # both parts are there: the archive is not opened again
    assert extract_archive(archive, tmp / "data", ["top/val/", "top/train/"]) == target
