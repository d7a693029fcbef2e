"""Safe extraction of tar and zip archives downloaded from the internet.

Every member is vetted before a single byte is written: an absolute path, a ``..`` component,
a symbolic or hard link, a device or a FIFO makes the whole archive refused. Extraction goes to
a hidden folder beside the target that is renamed into place at the end, so the target either
holds a complete extraction or does not exist, and a rerun that finds it does nothing.

When only some member prefixes are wanted, each is renamed into the target on its own, so one
that exists there is complete. Benchmarks that share an archive but need different parts of it
(ADE20K's validation and training images) thus add their part to the same extraction later,
from the same download. Prefixes of such benchmarks must not nest: a folder made as the parent
of one prefix would pass for the other, complete.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import IO

from fmbseg.errors import InputError

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_ZIP_SUFFIXES = (".zip",)


def archive_folder_name(filename: str) -> str:
    """``VOCtrainval_11-May-2012.tar`` -> ``VOCtrainval_11-May-2012``."""
    for suffix in _TAR_SUFFIXES + _ZIP_SUFFIXES:
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    raise InputError(f"{filename}: not a tar or zip archive name")


def _refuse(archive: Path, member: str, reason: str) -> InputError:
    return InputError(f"{archive}: refusing member {member!r} ({reason}); nothing was extracted")


def _member_path(archive: Path, name: str) -> PurePosixPath | None:
    """The member's relative path, None for the archive root itself ("./")."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise _refuse(archive, name, "absolute path")
    parts = [part for part in clean.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, name, "path escapes the target folder")
    return PurePosixPath(*parts) if parts else None


def _wanted(path: PurePosixPath, prefixes: Sequence[str]) -> bool:
    if not prefixes:
        return True
    text = path.as_posix()
    return any(text == p.rstrip("/") or text.startswith(p.rstrip("/") + "/") for p in prefixes)


def _write(source: IO[bytes], destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination, "wb") as handle:
        shutil.copyfileobj(source, handle, length=1 << 20)


def _extract_tar(archive: Path, into: Path, prefixes: Sequence[str]) -> None:
    with tarfile.open(archive, "r:*") as tar:
        plan: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
        for member in tar.getmembers():
            path = _member_path(archive, member.name)
            if member.issym() or member.islnk():
                raise _refuse(archive, member.name, f"link to {member.linkname!r}")
            if not (member.isfile() or member.isdir()):
                raise _refuse(archive, member.name, "device, FIFO or other special file")
            if path is not None and _wanted(path, prefixes):
                plan.append((member, path))
        for member, path in plan:
            if member.isdir():
                (into / path).mkdir(parents=True, exist_ok=True)
                continue
            source = tar.extractfile(member)
            if source is None:
                raise InputError(f"{archive}: cannot read member {member.name!r}")
            with source:
                _write(source, into / path)


def _extract_zip(archive: Path, into: Path, prefixes: Sequence[str]) -> None:
    with zipfile.ZipFile(archive) as zf:
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for info in zf.infolist():
            path = _member_path(archive, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _refuse(archive, info.filename, "symbolic link")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _refuse(archive, info.filename, "device, FIFO or other special file")
            if path is not None and _wanted(path, prefixes):
                plan.append((info, path))
        for info, path in plan:
            if info.is_dir():
                (into / path).mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as source:
                _write(source, into / path)


def missing_members(target: str | Path, members: Sequence[str]) -> list[str]:
    """The prefixes of ``members`` that are not extracted into ``target`` yet."""
    return [prefix for prefix in members if not (Path(target) / prefix.rstrip("/")).exists()]


def extract_archive(archive: str | Path, target: str | Path, members: Sequence[str] = ()) -> Path:
    """Extract ``archive`` (tar or zip) into ``target``, only the ``members`` path prefixes if
    given; returns ``target``. Only what ``target`` lacks is extracted: nothing when it holds
    the whole archive or every prefix."""
    source, destination = Path(archive), Path(target)
    wanted = missing_members(destination, members)
    if destination.is_dir() and not wanted:
        return destination
    name = source.name.lower()
    if name.endswith(_ZIP_SUFFIXES):
        extract = _extract_zip
    elif name.endswith(_TAR_SUFFIXES):
        extract = _extract_tar
    else:
        raise InputError(f"{source}: not a tar or zip archive")
    partial = destination.with_name(f".{destination.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        extract(source, partial, wanted)
        if not members:
            os.replace(partial, destination)
        for prefix in wanted:
            _move_into_place(partial / prefix.rstrip("/"), destination / prefix.rstrip("/"))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{source}: corrupt archive ({exc})") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return destination


def _move_into_place(extracted: Path, destination: Path) -> None:
    """One prefix, whole; a prefix that matched no member stays absent (the conversion says
    what is missing)."""
    if extracted.exists():
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(extracted, destination)
