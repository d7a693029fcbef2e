"""The download stage: official archives -> the folder layout of :mod:`fmbseg.datasets.folder`.

Under ``root``::

    downloads/<archive>                kept: a rerun neither downloads nor verifies again
    raw/<archive name>/...             the members the conversion needs, extracted safely
    <name>/images/<split>/<id>.<ext>   hard links to (or copies of) the official images
    <name>/masks/<split>/<id>.png      class indices after the dataset's label transform
                                       (none for an unlabelled training split)
    <name>/classes.txt, dataset.json   dataset.json is written last and marks the stage done

Downloads resume and are checked against a published checksum where one exists; the converted
folder is built beside its final place and renamed into it, so it is complete or absent. A
rerun on a finished dataset does nothing; one that needs other parts of an archive that another
dataset extracted extracts just those, from the kept download. Cityscapes needs a login: the
stage says which files to fetch by hand and where to put them, then converts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from fmbseg.datasets.archives import archive_folder_name, extract_archive, missing_members
from fmbseg.datasets.folder import (
    CLASSES_FILE,
    HAS_MASKS_KEY,
    IMAGES_DIR,
    MASK_SUFFIX,
    MASKS_DIR,
    META_FILE,
    read_mask,
    write_mask,
)
from fmbseg.datasets.registry import Archive, DatasetSpec, RawLayout, get_dataset_spec
from fmbseg.errors import InputError
from fmbseg.io.atomic import write_text_atomic
from fmbseg.io.download import DownloadError, download_file

log = logging.getLogger(__name__)

DOWNLOADS_DIR = "downloads"
RAW_DIR = "raw"


def _unextracted(archive: Archive, root: Path) -> bool:
    """Whether ``archive`` has parts this dataset needs that are not in ``raw/`` yet."""
    target = root / RAW_DIR / archive_folder_name(archive.filename)
    return not target.is_dir() or bool(missing_members(target, archive.members))


def _check_manual_archives(spec: DatasetSpec, root: Path, base_url: str | None) -> None:
    """Archives behind a login must be in ``downloads/`` already (unless a mirror is given)."""
    if base_url is not None:
        return
    missing = [
        archive
        for archive in spec.archives
        if archive.url is None
        and _unextracted(archive, root)
        and not (root / DOWNLOADS_DIR / archive.filename).is_file()
    ]
    if missing:
        files = " and ".join(f"{a.filename} (from {a.manual_page})" for a in missing)
        raise InputError(
            f"{spec.name}: the official files need a (free) login, so they cannot be downloaded "
            f"for you. Log in at the dataset site, download {files}, put them unextracted "
            f"into {root / DOWNLOADS_DIR}/ and rerun; the conversion then runs on them"
        )


def _verify(file: Path, checksum: str) -> None:
    """Check a digest that download_file did not (md5, sha1, or a file put there by hand);
    a mismatch deletes the file."""
    algorithm, _, expected = checksum.partition(":")
    digest = hashlib.new(algorithm)
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        file.unlink()
        raise DownloadError(
            f"{file}: {algorithm} {digest.hexdigest()[:16]}..., expected {expected[:16]}...; "
            "the file was deleted, rerun to download it again"
        )


def _fetch(archive: Archive, root: Path, base_url: str | None) -> Path:
    file = root / DOWNLOADS_DIR / archive.filename
    algorithm, _, digest = (archive.checksum or "").partition(":")
    url = f"{base_url.rstrip('/')}/{archive.filename}" if base_url else archive.url
    if url is not None:
        if not file.is_file():
            log.info("downloading %s -> %s", url, file)
        try:
            download_file(url, file, sha256=digest if algorithm == "sha256" else None)
        except DownloadError as exc:
            raise DownloadError(
                f"{exc}; or put {archive.filename} into {file.parent}/ yourself and rerun"
            ) from None
    checked_by_download = url is not None and algorithm == "sha256"
    if archive.checksum and not checked_by_download:
        _verify(file, archive.checksum)
    return file


def _list_ids(layout: RawLayout, raw: Path) -> list[str]:
    if layout.id_list is not None:
        listing = raw / layout.id_list
        try:
            lines = listing.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(f"{listing}: split list missing from the archive") from None
        return [line.strip() for line in lines if line.strip()]
    folder = raw / layout.images
    if not folder.is_dir():
        raise InputError(f"{folder}: image folder missing from the archive")
    return sorted(
        path.relative_to(folder).as_posix()[: -len(layout.image_suffix)]
        for path in folder.rglob(f"*{layout.image_suffix}")
        if path.is_file()
    )


def _link_or_copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _convert(
    spec: DatasetSpec, layout: RawLayout, root: Path, show_progress: bool
) -> dict[str, Any]:
    from tqdm import tqdm

    raw = root / RAW_DIR
    partial = root / f".{spec.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    image_ext = Path(f"image{layout.image_suffix}").suffix  # "_leftImg8bit.png" -> ".png"
    missing: list[str] = []
    converted = 0
    try:
        for key in tqdm(
            _list_ids(layout, raw),
            desc=f"convert {spec.name}",
            unit="img",
            disable=not show_progress,
        ):
            image = raw / layout.images / f"{key}{layout.image_suffix}"
            if not image.is_file():
                raise InputError(f"{image}: image of {key!r} missing from the archive")
            if layout.masks is not None:
                mask = raw / layout.masks / f"{key}{layout.mask_suffix}"
                if not mask.is_file():
                    missing.append(key)
                    continue
                write_mask(
                    partial / MASKS_DIR / layout.split / f"{key}{MASK_SUFFIX}",
                    read_mask(mask, spec),
                )
            _link_or_copy(image, partial / IMAGES_DIR / layout.split / f"{key}{image_ext}")
            converted += 1
        if converted == 0:
            kind = "unlabelled" if layout.masks is None else "annotated"
            raise InputError(f"{raw / layout.images}: no {kind} {layout.split} images found")
        if missing:
            log.warning(
                "%s: %d images have no annotation and were left out (first: %s)",
                spec.name,
                len(missing),
                missing[0],
            )
        meta: dict[str, Any] = {
            "name": spec.name,
            "display_name": spec.display_name,
            "ignore_index": spec.ignore_index,
            "background_index": spec.background_index,
            "splits": {layout.split: converted},
            HAS_MASKS_KEY: layout.masks is not None,
            "archives": [archive.filename for archive in spec.archives],
        }
        if layout.masks is not None:
            meta |= {"label_transform": spec.label_transform.name, "missing_annotations": missing}
        write_text_atomic(partial / CLASSES_FILE, "\n".join(spec.class_names) + "\n")
        write_text_atomic(partial / META_FILE, json.dumps(meta, indent=2) + "\n")
        os.replace(partial, root / spec.name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return meta


def run_download(
    name: str, root: str | Path, *, base_url: str | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """Download, extract and convert benchmark ``name`` into ``root/name``; returns its summary
    (``dataset.json`` plus ``path`` and ``already_done``).

    ``base_url`` replaces every archive's URL by ``<base_url>/<archive file name>`` (a mirror,
    or a test server); login-only archives are then fetched from it too.
    """
    spec = get_dataset_spec(name)
    folder = Path(root).expanduser()
    out = folder / spec.name
    if (out / META_FILE).is_file():
        try:
            meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{out / META_FILE}: not valid JSON ({exc})") from None
        return {**meta, "path": str(out), "already_done": True}
    if out.exists():
        raise InputError(
            f"{out}: exists but is not a finished conversion (no {META_FILE}); "
            "move it away and rerun"
        )
    if spec.layout is None:
        raise InputError(f"{spec.name}: has no download recipe (a folder dataset)")
    _check_manual_archives(spec, folder, base_url)
    for archive in spec.archives:
        if not _unextracted(archive, folder):
            continue
        file = _fetch(archive, folder, base_url)
        target = folder / RAW_DIR / archive_folder_name(archive.filename)
        log.info("extracting %s -> %s", file, target)
        extract_archive(file, target, archive.members)
    meta = _convert(spec, spec.layout, folder, show_progress)
    return {**meta, "path": str(out), "already_done": False}
