"""Bad inputs, through the ``fmbseg`` command: each is refused with one line naming what was
wrong (exit status 2, no traceback) and leaves no partial output, or, for a bad image among
good ones, is skipped and recorded while the others are processed.

The command runs in this process (``fmbseg.cli.main``, what the console script calls); the
oracle models stand in for CLIP, SAM and DINOv2, and real timm/open_clip architectures are
built where a checkpoint must be checked against one.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_support import WORLD, CliResult, listing, params, read_json, settings
from safetensors.torch import save_file

from fmbseg.errors import InputError
from fmbseg.masks import IGNORE_LABEL
from fmbseg.oracle.scenes import IGNORE_PNG, make_scene
from fmbseg.pseudolabel.merge import label_map_path, write_label_map

Cli = Callable[..., CliResult]
Outcome = Callable[..., None]


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.fixture
def images(scenes: Path, tmp_path: Path) -> Path:
    """Two good scenes in ``images/``; a test adds the file under test."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((scenes / "images").glob("*.png"))[:2]:
        shutil.copy(path, folder)
    return folder


def merge_folder(images: Path, scenes: Path, folder: Path) -> Path:
    """A merge folder with a label map for every file in ``images``: the true labels of the
    scenes, an unlabelled 4x4 map for anything else."""
    for path in sorted(images.iterdir()):
        truth = scenes / "labels" / path.name
        labels = np.full((4, 4), IGNORE_LABEL, np.uint16)
        if truth.is_file():
            labels = np.asarray(Image.open(truth)).astype(np.uint16)
            labels[labels == IGNORE_PNG] = IGNORE_LABEL
        write_label_map(label_map_path(folder, path.stem), labels)
    run = {"pseudolabel_run": {"vocabulary": list(WORLD.class_names)}}
    (folder / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return folder


# --- image files -------------------------------------------------------------------------------

GOOD = Image.fromarray(make_scene(WORLD, 48, 64, seed=1).image)
WHOLE_JPEG = jpeg(GOOD)
UNREADABLE = {
    "truncated JPEG": ("cut.jpg", WHOLE_JPEG[: len(WHOLE_JPEG) // 2], "cannot decode image"),
    "zero-byte file": ("empty.jpg", b"", "cannot identify image file"),
    "text file named .png": ("notes.png", b"not an image\n", "cannot identify image file"),
    "PNG header declaring 12000x12000 px (limit 50 Mpx)": (
        "huge.png",
        header_only_png(12000, 12000),
        "12000x12000 pixels exceeds the limit of 50000000",
    ),
    "PNG header declaring 40000x40000 px (beyond PIL's own guard)": (
        "bomb.png",
        header_only_png(40000, 40000),
        "image too large (decompression bomb guard)",
    ),
}


@pytest.mark.parametrize("kind", UNREADABLE)
def test_an_unreadable_image_is_skipped_and_recorded_while_the_others_are_processed(
    kind: str, images: Path, scenes: Path, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    name, content, reason = UNREADABLE[kind]
    (images / name).write_bytes(content)
    tolerant = "pseudolabel.max_failed_fraction=0.5"
    result = cli(
        "pseudolabel --images images --vocabulary classes.txt --out pl",
        *settings(tolerant),
        cwd=_with_classes(tmp_path),
    )
    assert result.code == 0, result.stderr
    recorded = read_json(tmp_path / "pl" / "summary.json")["failed_images"]
    assert list(recorded) == [Path(name).stem] and reason in recorded[Path(name).stem]
    assert recorded[Path(name).stem].startswith(f"images/{name}: ")
    assert read_json(tmp_path / "pl" / "summary.json")["images"] == 2
    outcome(
        "image",
        kind,
        f"fmbseg pseudolabel -S {tolerant}",
        code=result.code,
        message=recorded[Path(name).stem],
        left="summary.json lists it under failed_images; the 2 good images labelled",
    )

    merge_folder(images, scenes, tmp_path / "merged")
    result = cli(
        "cache-features --images images --labels merged --out features",
        *settings("features.image_size=32"),
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    index = read_json(tmp_path / "features" / "index.json")
    assert list(index["failed_images"]) == [Path(name).stem] and index["source_images"] == 2
    outcome(
        "image",
        kind,
        "fmbseg cache-features",
        code=result.code,
        message=index["failed_images"][Path(name).stem],
        left="index.json lists it under failed_images; the 2 good images cached",
    )


def _with_classes(folder: Path) -> Path:
    (folder / "classes.txt").write_text("\n".join(WORLD.class_names), encoding="utf-8")
    return folder


def test_more_unreadable_images_than_allowed_fail_the_stage_after_recording_them(
    images: Path, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    (images / "cut.jpg").write_bytes(UNREADABLE["truncated JPEG"][1])
    result = cli(
        "pseudolabel --images images --vocabulary classes.txt --out pl",
        *settings(),
        cwd=_with_classes(tmp_path),
    )
    assert result.code == 2
    assert result.error == (
        "error: 1 of 3 images could not be read (more than pseudolabel.max_failed_fraction=0.05); "
        "see pl/summary.json"
    )
    # Complete and resumable: a rerun with a higher limit reads nothing again.
    assert read_json(tmp_path / "pl" / "summary.json")["shards_done"] == 1
    outcome(
        "image",
        "1 truncated JPEG among 3 images (default max_failed_fraction 0.05)",
        "fmbseg pseudolabel",
        code=result.code,
        message=result.error,
        left=f"pl/: {listing(tmp_path / 'pl')} (complete: the good images are labelled)",
    )


def _unusual_images(folder: Path) -> dict[str, tuple[str, tuple[int, int]]]:
    """Valid images in modes other than 8-bit RGB: file name and the upright (height, width)."""
    (folder / "cmyk.jpg").write_bytes(jpeg(GOOD.convert("CMYK")))
    grey16 = (np.asarray(GOOD.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode.startswith("I")
    GOOD.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    exif = GOOD.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    (folder / "rotated.jpg").write_bytes(jpeg(GOOD, exif=exif))
    return {
        "CMYK JPEG": ("cmyk", (48, 64)),
        "16-bit greyscale PNG": ("grey16", (48, 64)),
        "palette PNG": ("palette", (48, 64)),
        "EXIF-rotated JPEG (orientation 6, stored 64x48)": ("rotated", (64, 48)),
    }


def test_unusual_but_valid_images_are_read_upright_in_rgb(
    tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    (tmp_path / "images").mkdir()
    expected = _unusual_images(tmp_path / "images")
    result = cli(
        "pseudolabel --images images --vocabulary classes.txt --out pl",
        *settings(),
        cwd=_with_classes(tmp_path),
    )
    assert result.code == 0, result.stderr
    shard = read_json(tmp_path / "pl" / "shards" / "00000.json")
    assert shard["failed"] == {}
    sizes = {image["id"]: (image["height"], image["width"]) for image in shard["images"]}
    for kind, (key, size) in expected.items():
        assert sizes[key] == size, kind
        outcome(
            "image",
            kind,
            "fmbseg pseudolabel",
            code=result.code,
            message="",
            left=f"labelled as a {size[0]}x{size[1]} (HxW) RGB image",
        )


CHILD = """
import resource, sys
from fmbseg.errors import InputError
from fmbseg.io.images import read_rgb
import PIL.Image, PIL.ImageOps, PIL.PngImagePlugin
status = open("/proc/self/status").read()
size = int(next(l for l in status.splitlines() if l.startswith("VmSize:")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), resource.RLIM_INFINITY))
try:
    read_rgb(sys.argv[1], int(sys.argv[2]))
    print("read")
except InputError as exc:
    print("refused:", exc)
except MemoryError:
    print("allocated")
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_the_pixel_limit_refuses_a_huge_header_without_allocating_its_pixels(
    tmp_path: Path, outcome: Outcome
) -> None:
    """12000x12000 RGB needs 576 MB; the reader is given 256 MiB of address space."""
    (tmp_path / "huge.png").write_bytes(header_only_png(12000, 12000))

    def read(max_pixels: int) -> str:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, "huge.png", str(max_pixels)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert read(200_000_000) == "allocated"  # the control: without the limit it would allocate
    refused = read(50_000_000)
    assert refused == "refused: huge.png: 12000x12000 pixels exceeds the limit of 50000000"
    outcome(
        "image",
        "PNG header declaring 12000x12000 px, read with 256 MiB of address space",
        "read_rgb (every stage's image reader)",
        code="—",
        message=refused.removeprefix("refused: "),
        left="nothing allocated (with the limit raised, the same read fails with MemoryError)",
    )


# --- class names --------------------------------------------------------------------------------

NFC = unicodedata.normalize("NFC", "crème brûlée")
NFD = unicodedata.normalize("NFD", "crème brûlée")
BAD_VOCABULARIES = {
    "empty class-name file": (b"", "error: classes.txt: vocabulary: no class names given"),
    "blank line between names": (
        b"cat\n\ndog\n",
        "error: classes.txt: line 2 is blank (every line is a class)",
    ),
    "duplicate names (case-insensitive)": (
        b"cat\nCat\n",
        "error: classes.txt: vocabulary entry 1: duplicate class name 'Cat' (same as 'cat')",
    ),
    "file not in UTF-8 (Latin-1)": (
        "crème\n".encode("latin-1"),
        "error: classes.txt: not UTF-8 text (invalid continuation byte at byte 2)",
    ),
}


@pytest.mark.parametrize("case", BAD_VOCABULARIES)
def test_a_bad_class_name_file_is_refused_before_any_output(
    case: str, images: Path, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    content, message = BAD_VOCABULARIES[case]
    (tmp_path / "classes.txt").write_bytes(content)
    result = cli(
        "pseudolabel --images images --vocabulary classes.txt --out pl", *settings(), cwd=tmp_path
    )
    assert (result.code, result.error) == (2, message)
    assert not (tmp_path / "pl").exists()
    outcome(
        "vocabulary",
        case,
        "fmbseg pseudolabel --vocabulary classes.txt",
        code=result.code,
        message=result.error,
        left=listing(tmp_path / "pl"),
    )


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ("cat,,dog", "error: vocabulary entry 1: blank class name ''"),
        ("cat, Cat", "error: vocabulary entry 1: duplicate class name 'Cat' (same as 'cat')"),
        ("", "error: vocabulary entry 0: blank class name ''"),
    ],
)
def test_bad_class_names_on_the_command_line_are_refused_before_the_model_loads(
    classes: str, message: str, images: Path, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    result = cli(
        "predict images --model absent.safetensors --out predictions",
        "--classes",
        classes,
        cwd=tmp_path,
    )
    assert (result.code, result.error) == (2, message)
    assert not (tmp_path / "predictions").exists()
    outcome(
        "vocabulary",
        f"--classes {classes!r}",
        f"fmbseg predict --classes {classes!r}",
        code=result.code,
        message=result.error,
        left=listing(tmp_path / "predictions"),
    )


def test_non_ascii_class_names_are_kept_exactly(
    images: Path, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    names = ["cat", NFC, "交通灯", "Straße"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    result = cli(
        "pseudolabel --images images --vocabulary classes.txt --out pl", *settings(), cwd=tmp_path
    )
    assert result.code == 0, result.stderr
    assert read_json(tmp_path / "pl" / "run.json")["vocabulary"] == names
    assert NFC in (tmp_path / "pl" / "run.json").read_text(encoding="utf-8")  # not \\u-escaped
    outcome(
        "vocabulary",
        "non-ASCII names (crème brûlée, 交通灯, Straße)",
        "fmbseg pseudolabel",
        code=result.code,
        message="",
        left="run.json holds the names as written (UTF-8, NFC)",
    )


def test_names_that_differ_only_in_unicode_normalisation_are_duplicates(
    images: Path, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    (tmp_path / "classes.txt").write_text(f"{NFC}\n{NFD}\n", encoding="utf-8")
    result = cli(
        "pseudolabel --images images --vocabulary classes.txt --out pl", *settings(), cwd=tmp_path
    )
    outcome(
        "vocabulary",
        "'crème brûlée' twice, NFC and NFD (one spelling after NFC)",
        "fmbseg pseudolabel",
        code=result.code,
        message=result.error if result.code else "",
        left=listing(tmp_path / "pl"),
    )
    assert result.code == 2 and "duplicate class name" in result.error
    assert not (tmp_path / "pl").exists()


# --- checkpoints and weights --------------------------------------------------------------------

TINY_TIMM = (
    "models.encoder.backend=timm",
    "models.encoder.overrides={depth: 1, embed_dim: 48, num_heads: 2}",
    "features.image_size=56",
)


class _RunsCode:
    """Unpickling this runs ``touch pwned``: what a hostile checkpoint could do."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def _checkpoint(kind: str, folder: Path) -> Path:
    linear = torch.nn.Linear(3, 2).state_dict()
    if kind == "missing file":
        return folder / "missing.safetensors"
    if kind == "checkpoint of another architecture":
        save_file(linear, folder / "linear.safetensors")
        return folder / "linear.safetensors"
    if kind == "truncated checkpoint":
        save_file(linear, folder / "whole.safetensors")
        (folder / "cut.safetensors").write_bytes((folder / "whole.safetensors").read_bytes()[:40])
        return folder / "cut.safetensors"
    torch.save({"weight": _RunsCode()}, folder / "hostile.pt")
    return folder / "hostile.pt"


ENCODER_CHECKPOINTS = {
    "missing file": "error: models.encoder.checkpoint: missing.safetensors does not exist",
    "checkpoint of another architecture": (
        "error: linear.safetensors: not a checkpoint of timm vit_small_patch14_dinov2.lvd142m "
        "with {'depth': 1, 'embed_dim': 48, 'num_heads': 2} (20 missing, 2 unexpected, "
        "0 wrong-shape keys; first: cls_token)"
    ),
    "truncated checkpoint": (
        "error: cut.safetensors: not readable as a weights-only checkpoint (SafetensorError: "
        "Error while deserializing header: invalid header length)"
    ),
    "pickled checkpoint whose loading would run code": (
        "error: hostile.pt: not readable as a weights-only checkpoint (UnpicklingError: Weights "
        "only load failed."
    ),
}


@pytest.mark.parametrize("kind", ENCODER_CHECKPOINTS)
def test_an_unusable_encoder_checkpoint_is_refused_before_any_output(
    kind: str, images: Path, scenes: Path, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    merge_folder(images, scenes, tmp_path / "merged")
    checkpoint = _checkpoint(kind, tmp_path)
    result = cli(
        "cache-features --images images --labels merged --out features",
        *settings(*TINY_TIMM, f"models.encoder.checkpoint={checkpoint.name}"),
        cwd=tmp_path,
    )
    assert result.code == 2 and result.error.startswith(ENCODER_CHECKPOINTS[kind])
    assert not (tmp_path / "features").exists()
    assert not (tmp_path / "pwned").exists()
    area = "unpickling" if kind.startswith("pickled") else "weights"
    outcome(
        area,
        f"models.encoder.checkpoint: {kind}",
        "fmbseg cache-features",
        code=result.code,
        message=result.error,
        left=listing(tmp_path / "features"),
    )


@pytest.fixture
def features(scenes: Path, merged: Path, tmp_path: Path) -> Path:
    from fmbseg.align.features import run_cache_features

    folder = tmp_path / "features"
    run_cache_features(
        params("features.image_size=32"), scenes / "images", merged, folder, show_progress=False
    )
    return folder


def test_a_module_of_another_architecture_names_the_file_and_the_expected_one(
    features: Path, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    from fmbseg.align.train import run_train

    run_train(params("train.epochs=1"), features, tmp_path / "first", show_progress=False)
    result = cli(
        "train --features features --out tuned",
        *settings("train.heads=4", "train.init_from=first/module.safetensors"),
        cwd=tmp_path,
    )
    assert result.code == 2
    assert result.error.startswith("error: first/module.safetensors: alignment module has ")
    assert "expected (in_dim=32, text_dim=64, depth=1, heads=4, mlp_ratio=4.0)" in result.error
    assert not (tmp_path / "tuned").exists()
    outcome(
        "weights",
        "train.init_from: a module with 2 heads where 4 are configured",
        "fmbseg train",
        code=result.code,
        message=result.error,
        left=listing(tmp_path / "tuned"),
    )


def test_a_feature_shard_replaced_by_a_pickle_is_never_loaded(
    features: Path, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    import pickle

    shard = features / "shards" / "00000.safetensors"
    shard.write_bytes(pickle.dumps(_RunsCode()))
    result = cli("train --features features --out model", *settings(), cwd=tmp_path)
    assert result.code == 2
    assert result.error.startswith("error: features/shards/00000.safetensors: sha256 ")
    assert "does not match index.json" in result.error
    assert not (tmp_path / "pwned").exists()
    outcome(
        "unpickling",
        "a feature shard replaced by a pickle that would run code",
        "fmbseg train",
        code=result.code,
        message=result.error,
        left=f"model/: {listing(tmp_path / 'model')} (written before the first shard is "
        "read; whole files, and a rerun resumes)",
    )


def test_pseudolabel_with_a_missing_checkpoint_leaves_nothing(
    images: Path, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    result = cli(
        "pseudolabel --images images --vocabulary classes.txt --out pl",
        *settings(
            "models.clip.backend=open_clip",
            "models.clip.model=ViT-B-32",
            "models.clip.checkpoint=missing.pt",
        ),
        cwd=_with_classes(tmp_path),
    )
    assert (result.code, result.error) == (
        2,
        "error: models.clip.checkpoint: missing.pt does not exist",
    )
    outcome(
        "weights",
        "models.clip.checkpoint: missing file",
        "fmbseg pseudolabel",
        code=result.code,
        message=result.error,
        left=f"pl/: {listing(tmp_path / 'pl')}",
    )
    assert not (tmp_path / "pl").exists()


# --- downloads and archives ---------------------------------------------------------------------


class _Mirror(http.server.BaseHTTPRequestHandler):
    """Serves ``files[name] = (body, declared length)``; a longer declared length is a
    transfer that the server cuts short."""

    files: ClassVar[dict[str, tuple[bytes, int]]] = {}

    def do_GET(self) -> None:
        body, length = self.files[self.path.lstrip("/")]
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, tuple[bytes, int]]]:
    """A dataset mirror on 127.0.0.1 (``--base-url``); the test fills in its files."""
    monkeypatch.delenv("FMBSEG_OFFLINE", raising=False)
    _Mirror.files = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("MIRROR_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield _Mirror.files
    server.shutdown()
    thread.join()


def zip_bytes(members: dict[str, bytes], link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


RANDOM_BYTES = np.random.default_rng(1).bytes(200_000)


def test_a_corrupt_download_of_a_verified_archive_is_deleted_and_named(
    mirror: dict, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    mirror["ADEChallengeData2016.zip"] = (RANDOM_BYTES, len(RANDOM_BYTES))
    result = cli(
        "download ade20k --root data", "--base-url", os.environ["MIRROR_URL"], cwd=tmp_path
    )
    assert result.code == 2
    assert result.error.startswith("error: data/downloads/ADEChallengeData2016.zip: sha1 ")
    assert result.error.endswith(
        "expected 219e1696abb36c8b...; the file was deleted, rerun to download it again"
    )
    assert files_below(tmp_path / "data") == []
    outcome(
        "download",
        "corrupt download of a verified archive (sha1)",
        "fmbseg download ade20k --base-url MIRROR",
        code=result.code,
        message=result.error,
        left=f"data/: {listing(tmp_path / 'data')}",
    )


def test_a_verified_download_cut_short_is_kept_only_to_resume(
    mirror: dict, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    mirror["ADEChallengeData2016.zip"] = (RANDOM_BYTES, 2 * len(RANDOM_BYTES))
    result = cli(
        "download ade20k --root data", "--base-url", os.environ["MIRROR_URL"], cwd=tmp_path
    )
    assert result.code == 2
    assert "ADEChallengeData2016.zip: connection closed 200000 bytes early; rerun to resume" in (
        result.error
    )
    assert files_below(tmp_path / "data") == ["downloads/ADEChallengeData2016.zip.part"]
    outcome(
        "download",
        "transfer cut short, verified archive (sha1)",
        "fmbseg download ade20k --base-url MIRROR",
        code=result.code,
        message=result.error,
        left=f"data/: {listing(tmp_path / 'data')}",
    )


def files_below(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_transfer_cut_short_is_never_taken_for_the_whole_file(
    mirror: dict, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    whole = zip_bytes({"gtFine/val/a.png": RANDOM_BYTES})
    mirror["gtFine_trainvaltest.zip"] = (whole[: len(whole) // 2], len(whole))
    mirror["leftImg8bit_trainvaltest.zip"] = (whole, len(whole))
    result = cli(
        "download cityscapes --root data", "--base-url", os.environ["MIRROR_URL"], cwd=tmp_path
    )
    outcome(
        "download",
        "transfer cut short, archive without a published checksum",
        "fmbseg download cityscapes --base-url MIRROR",
        code=result.code,
        message=result.error,
        left=f"data/: {listing(tmp_path / 'data')}",
    )
    assert result.code == 2
    assert "gtFine_trainvaltest.zip" not in files_below(tmp_path / "data" / "downloads")


HOSTILE_ARCHIVES = {
    "zip member '../escaped.txt'": (
        {"../escaped.txt": b"outside"},
        None,
        "refusing member '../escaped.txt' (path escapes the target folder)",
    ),
    "zip member that is a symbolic link": (
        {"gtFine/val/a.png": b"fine"},
        "gtFine/val/passwd",
        "refusing member 'gtFine/val/passwd' (symbolic link)",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_ARCHIVES)
def test_a_hostile_archive_is_refused_before_anything_is_extracted(
    case: str, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    members, link, reason = HOSTILE_ARCHIVES[case]
    downloads = tmp_path / "data" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "gtFine_trainvaltest.zip").write_bytes(zip_bytes(members, link))
    (downloads / "leftImg8bit_trainvaltest.zip").write_bytes(zip_bytes({"leftImg8bit/x": b""}))
    result = cli("download cityscapes --root data", cwd=tmp_path)
    assert (result.code, result.error) == (
        2,
        f"error: data/downloads/gtFine_trainvaltest.zip: {reason}; nothing was extracted",
    )
    assert files_below(tmp_path) == [
        "data/downloads/gtFine_trainvaltest.zip",
        "data/downloads/leftImg8bit_trainvaltest.zip",
    ]
    outcome(
        "download",
        f"{case} (Cityscapes archive placed in downloads/)",
        "fmbseg download cityscapes",
        code=result.code,
        message=result.error,
        left=f"data/: {listing(tmp_path / 'data')}",
    )


@pytest.mark.parametrize(
    ("case", "member", "reason"),
    [
        ("tar member that is a symbolic link", tarfile.SYMTYPE, "link to '/etc/passwd'"),
        ("tar member that is a hard link", tarfile.LNKTYPE, "link to '/etc/passwd'"),
        ("tar member '../escaped.txt'", tarfile.REGTYPE, "path escapes the target folder"),
    ],
)
def test_a_hostile_tar_is_refused_by_the_extractor(
    case: str, member: bytes, reason: str, tmp_path: Path, outcome: Outcome
) -> None:
    from fmbseg.datasets.archives import extract_archive

    info = tarfile.TarInfo("../escaped.txt" if member == tarfile.REGTYPE else "data/passwd")
    info.type, info.linkname = member, "/etc/passwd"
    with tarfile.open(tmp_path / "hostile.tar", "w") as tar:
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(InputError) as refused:
        extract_archive(tmp_path / "hostile.tar", tmp_path / "extracted")
    assert reason in str(refused.value) and "nothing was extracted" in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.tar"]
    outcome(
        "download",
        case,
        "extract_archive (the download stage's extractor)",
        code="—",
        message=str(refused.value),
        left="nothing beside the archive",
    )


# --- params files -------------------------------------------------------------------------------

BAD_PARAMS = {
    "unknown key in params.yaml": (
        ["train:\n  epoch: 3\n"],
        "error: params.yaml: train.epoch: unknown key",
    ),
    "wrong type in params.yaml": (
        ["train:\n  epochs: three\n"],
        "error: params.yaml: train.epochs: Input should be a valid integer (got 'three')",
    ),
    "invalid YAML in params.yaml": (
        ["train: [1, 2\n"],
        "error: params.yaml: line 2 not valid YAML",
    ),
    "a section that is not a mapping": (
        ["train: 3\n"],
        "error: params.yaml: train: Input should be an object (got 3)",
    ),
    "wrong type in -S override": (
        ["", "-S", "train.lr=fast"],
        "error: params.yaml + overrides: train.lr: Input should be a valid number (got 'fast')",
    ),
}


@pytest.mark.parametrize("case", BAD_PARAMS)
def test_bad_params_are_refused_before_any_output(
    case: str, tmp_path: Path, cli: Cli, outcome: Outcome
) -> None:
    (content, *extra), message = BAD_PARAMS[case]
    (tmp_path / "params.yaml").write_text(content, encoding="utf-8")
    result = cli("train --features features --out model", *extra, cwd=tmp_path)
    assert (result.code, result.error) == (2, message)
    assert not (tmp_path / "model").exists()
    outcome(
        "params",
        case,
        f"fmbseg train {' '.join(extra)}".strip(),
        code=result.code,
        message=result.error,
        left=listing(tmp_path / "model"),
    )
