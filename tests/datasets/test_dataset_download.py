"""The download stage end to end against a 127.0.0.1 server serving tiny archives that these
tests build with the real folder structure of each official release: the benchmarks and the
unlabelled training splits."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from fmbseg.datasets import FolderDataset, get_dataset_spec, list_datasets, register_dataset
from fmbseg.datasets.download import run_download
from fmbseg.errors import InputError
from fmbseg.io.download import DownloadError

I = 255  # the ignore index


def png(labels: list[list[int]], mode: str = "L") -> bytes:
    image = Image.new(mode, (len(labels[0]), len(labels)))
    image.putdata([v for row in labels for v in row])
    if mode == "P":  # a full palette, as VOC's PNGs have (a short one lets PNG pack the indices)
        image.putpalette([c for k in range(256) for c in (k, 255 - k, (7 * k) % 256)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def mat(label_map: list[list[int]]) -> bytes:
    buffer = io.BytesIO()
    savemat(buffer, {"LabelMap": np.array(label_map, dtype=np.uint16)})
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes], gz: bool = False, symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


VOC_MASKS = {"2007_000032": [[0, 1, 15], [15, 255, 0]], "2007_000033": [[20, 20, 0], [0, 0, 0]]}
VOC = "VOCdevkit/VOC2012/"
VOC_TAR = tar_bytes(
    {f"{VOC}JPEGImages/{k}.jpg": jpg(3, 2) for k in [*VOC_MASKS, "2007_000039"]}
    | {f"{VOC}SegmentationClass/{k}.png": png(m, "P") for k, m in VOC_MASKS.items()}
    | {f"{VOC}SegmentationClass/2007_000039.png": png([[1, 1, 1], [1, 1, 1]], "P")}
    | {f"{VOC}ImageSets/Segmentation/val.txt": b"2007_000032\n2007_000033\n"}
    | {f"{VOC}ImageSets/Segmentation/train.txt": b"2007_000039\n"}
    | {f"{VOC}Annotations/2007_000032.xml": b"<annotation/>"}
)
ADE = "ADEChallengeData2016/"
ADE_ZIP = zip_bytes(
    {f"{ADE}images/validation/ADE_val_00000001.jpg": jpg(3, 2)}
    | {f"{ADE}annotations/validation/ADE_val_00000001.png": png([[0, 1, 150], [12, 0, 3]])}
    | {f"{ADE}images/training/ADE_train_00000001.jpg": jpg(3, 2)}
    | {f"{ADE}annotations/training/ADE_train_00000001.png": png([[1, 1, 1], [1, 1, 1]])}
)
CONTEXT_VOC_TAR = tar_bytes(
    {f"VOCdevkit/VOC2010/JPEGImages/{k}.jpg": jpg(3, 2) for k in ["2008_000002", "2008_000003"]}
    | {"VOCdevkit/VOC2010/JPEGImages/2008_000008.jpg": jpg(3, 2)}
    | {"VOCdevkit/VOC2010/ImageSets/Main/val.txt": b"2008_000002\n2008_000003\n"}
    | {"VOCdevkit/VOC2010/ImageSets/Main/train.txt": b"2008_000008\n"}
    | {"VOCdevkit/VOC2010/ImageSets/Main/aeroplane_train.txt": b"2008_000008 -1\n"}
)
CONTEXT_MATS = tar_bytes(
    {"trainval/2008_000002.mat": mat([[0, 427, 454], [2, 1, 458]])}, gz=True
)  # 2008_000003 has no annotation
COCO_IMAGES = zip_bytes({f"val2017/{k}.jpg": jpg(3, 2) for k in ["000000000139", "000000000285"]})
COCO_TRAIN_IMAGES = zip_bytes(
    {f"train2017/{k}.jpg": jpg(3, 2) for k in ["000000000009", "000000000025"]}
)
COCO_MAPS = zip_bytes(
    {"val2017/000000000139.png": png([[0, 80, 91], [181, 255, 11]])}
    | {"val2017/000000000285.png": png([[21, 21, 21], [118, 118, 255]])}
    | {"train2017/000000000009.png": png([[0]])}
)
CITY = "frankfurt/frankfurt_000000_000294"
CITY_IMAGES = zip_bytes(
    {f"leftImg8bit/val/{CITY}_leftImg8bit.png": png([[0, 0, 0], [0, 0, 0]], "L")}
    | {"leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png": png([[0]])}
    | {"README": b"readme"}
)
CITY_LABELS = zip_bytes(
    {f"gtFine/val/{CITY}_gtFine_labelIds.png": png([[7, 26, 0], [24, 33, 9]])}
    | {f"gtFine/val/{CITY}_gtFine_color.png": png([[0, 0, 0], [0, 0, 0]])}
)

ARCHIVES = {
    "VOCtrainval_11-May-2012.tar": VOC_TAR,
    "ADEChallengeData2016.zip": ADE_ZIP,
    "VOCtrainval_03-May-2010.tar": CONTEXT_VOC_TAR,
    "trainval.tar.gz": CONTEXT_MATS,
    "val2017.zip": COCO_IMAGES,
    "train2017.zip": COCO_TRAIN_IMAGES,
    "stuffthingmaps_trainval2017.zip": COCO_MAPS,
    "gtFine_trainvaltest.zip": CITY_LABELS,
    "leftImg8bit_trainvaltest.zip": CITY_IMAGES,
}


@pytest.fixture()
def mirror(file_server):
    """The test server, serving every archive these tests build."""
    file_server.files.update(ARCHIVES)
    return file_server


@pytest.fixture()
def checksums_of_test_archives() -> Iterator[Callable[..., None]]:
    """Point the specs' checksums at the test archives' bytes (same algorithm as the real one,
    or sha256 where none is published); restores the real specs afterwards."""
    originals = {name: get_dataset_spec(name) for name in list_datasets()}

    def use(content: dict[str, bytes] | None = None) -> None:
        content = {**ARCHIVES, **(content or {})}
        for spec in originals.values():
            archives = []
            for archive in spec.archives:
                algorithm = (archive.checksum or "sha256:").partition(":")[0]
                digest = hashlib.new(algorithm, content[archive.filename]).hexdigest()
                archives.append(dataclasses.replace(archive, checksum=f"{algorithm}:{digest}"))
            register_dataset(dataclasses.replace(spec, archives=tuple(archives)), replace=True)

    use()
    yield use
    for spec in originals.values():
        register_dataset(spec, replace=True)


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def labels_of(path: Path) -> list[list[int]]:
    return np.asarray(Image.open(path)).tolist()


@pytest.mark.usefixtures("checksums_of_test_archives")
def test_voc_is_downloaded_extracted_and_converted_for_pv20(mirror, tmp_path: Path) -> None:
    summary = run_download("voc20", tmp_path, base_url=mirror.url, show_progress=False)
    out = tmp_path / "voc20"
    assert summary["path"] == str(out) and not summary["already_done"]
    assert summary["splits"] == {"val": 2}
    assert tree(out) == [
        "classes.txt", "dataset.json",
        "images/val/2007_000032.jpg", "images/val/2007_000033.jpg",
        "masks/val/2007_000032.png", "masks/val/2007_000033.png",
    ]  # fmt: skip
    assert labels_of(out / "masks/val/2007_000032.png") == [[I, 0, 14], [14, I, I]]
    assert (out / "images/val/2007_000032.jpg").read_bytes() == jpg(3, 2)
    assert not (tmp_path / "raw/VOCtrainval_11-May-2012/VOCdevkit/VOC2012/Annotations").exists()
    dataset = FolderDataset(out, split="val")
    assert dataset.spec.class_names == get_dataset_spec("voc20").class_names
    _, labels = dataset.read(dataset.samples[1])
    assert labels.tolist() == [[19, 19, I], [I, I, I]]


@pytest.mark.usefixtures("checksums_of_test_archives")
def test_pv21_reuses_the_extracted_voc_and_a_rerun_is_a_no_op(mirror, tmp_path: Path) -> None:
    run_download("voc20", tmp_path, base_url=mirror.url, show_progress=False)
    requests = len(mirror.requests)
    shutil.rmtree(tmp_path / "downloads")  # the extraction is all a second benchmark needs
    summary = run_download("voc21", tmp_path, base_url=mirror.url, show_progress=False)
    assert len(mirror.requests) == requests
    assert labels_of(tmp_path / "voc21/masks/val/2007_000032.png") == [[0, 1, 15], [15, I, 0]]
    assert json.loads((tmp_path / "voc21/dataset.json").read_text())["background_index"] == 0
    again = run_download("voc21", tmp_path, base_url=mirror.url, show_progress=False)
    assert again["already_done"] and again["splits"] == summary["splits"]
    assert len(mirror.requests) == requests


@pytest.mark.usefixtures("checksums_of_test_archives")
def test_ade20k_reduces_zero_label_and_skips_the_training_split(mirror, tmp_path: Path) -> None:
    run_download("ade20k", tmp_path, base_url=mirror.url, show_progress=False)
    assert labels_of(tmp_path / "ade20k/masks/val/ADE_val_00000001.png") == [
        [I, 0, 149],
        [11, I, 2],
    ]
    assert not (tmp_path / "raw/ADEChallengeData2016/ADEChallengeData2016/images/training").exists()


@pytest.mark.usefixtures("checksums_of_test_archives")
def test_pascal_context_mat_files_become_59_class_pngs(mirror, tmp_path: Path) -> None:
    summary = run_download("context59", tmp_path, base_url=mirror.url, show_progress=False)
    assert labels_of(tmp_path / "context59/masks/val/2008_000002.png") == [[I, 54, 57], [0, I, 58]]
    assert summary["missing_annotations"] == ["2008_000003"]
    assert tree(tmp_path / "context59/images") == ["val/2008_000002.jpg"]


@pytest.mark.usefixtures("checksums_of_test_archives")
def test_coco_stuff_and_coco_object_share_the_coco_archives(mirror, tmp_path: Path) -> None:
    run_download("coco_stuff", tmp_path, base_url=mirror.url, show_progress=False)
    run_download("coco_object", tmp_path, base_url=mirror.url, show_progress=False)
    assert sorted(name for name, _ in mirror.requests) == [
        "stuffthingmaps_trainval2017.zip",
        "val2017.zip",
    ]
    stuff, objects = tmp_path / "coco_stuff/masks/val", tmp_path / "coco_object/masks/val"
    assert labels_of(stuff / "000000000139.png") == [[0, 71, 80], [170, I, I]]
    assert labels_of(objects / "000000000139.png") == [[1, 72, 0], [0, 0, I]]
    assert labels_of(objects / "000000000285.png") == [[21, 21, 21], [0, 0, 0]]


def test_cityscapes_says_what_to_download_by_hand_then_converts_it(tmp_path: Path) -> None:
    with pytest.raises(InputError) as error:
        run_download("cityscapes", tmp_path, show_progress=False)
    message = str(error.value)
    for part in [
        "gtFine_trainvaltest.zip (from https://www.cityscapes-dataset.com/file-handling/?packageID=1)",
        "leftImg8bit_trainvaltest.zip (from https://www.cityscapes-dataset.com/file-handling/?packageID=3)",
        f"into {tmp_path / 'downloads'}/",
        "login",
    ]:
        assert part in message
    assert not (tmp_path / "cityscapes").exists()

    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads/gtFine_trainvaltest.zip").write_bytes(CITY_LABELS)
    (tmp_path / "downloads/leftImg8bit_trainvaltest.zip").write_bytes(CITY_IMAGES)
    summary = run_download("cityscapes", tmp_path, show_progress=False)
    assert summary["splits"] == {"val": 1}
    assert labels_of(tmp_path / f"cityscapes/masks/val/{CITY}.png") == [[0, 13, I], [11, 18, I]]
    assert (tmp_path / f"cityscapes/images/val/{CITY}.png").is_file()
    assert not (tmp_path / "raw/leftImg8bit_trainvaltest/leftImg8bit/train").exists()


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_corrupted_download_fails_and_leaves_nothing(
    mirror, tmp_path: Path, checksums_of_test_archives: Callable[..., None], algorithm: str
) -> None:
    checksums_of_test_archives()
    spec = get_dataset_spec("ade20k")
    digest = hashlib.new(algorithm, ADE_ZIP).hexdigest()
    archive = dataclasses.replace(spec.archives[0], checksum=f"{algorithm}:{digest}")
    register_dataset(dataclasses.replace(spec, archives=(archive,)), replace=True)
    mirror.files["ADEChallengeData2016.zip"] = ADE_ZIP[:-10] + b"corrupted!"
    with pytest.raises(DownloadError, match=f"expected {digest[:16]}"):
        run_download("ade20k", tmp_path, base_url=mirror.url, show_progress=False)
    assert tree(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "filename", "hostile", "member"),
    [
        ("ade20k", "ADEChallengeData2016.zip",
         zip_bytes({f"{ADE}images/validation/a.jpg": b"x", "../../escape.jpg": b"x"}), "../../escape.jpg"),
        ("voc20", "VOCtrainval_11-May-2012.tar",
         tar_bytes({f"{VOC}JPEGImages/a.jpg": b"x"}, symlink=f"{VOC}JPEGImages/b.jpg"), f"{VOC}JPEGImages/b.jpg"),
    ],
)  # fmt: skip
def test_hostile_archives_are_refused_and_nothing_is_extracted(
    mirror, tmp_path: Path, checksums_of_test_archives: Callable[..., None],
    name: str, filename: str, hostile: bytes, member: str,
) -> None:  # fmt: skip
    mirror.files[filename] = hostile
    checksums_of_test_archives({filename: hostile})
    with pytest.raises(InputError, match=f"{filename}: refusing member '{member}'"):
        run_download(name, tmp_path, base_url=mirror.url, show_progress=False)
    assert tree(tmp_path) == [f"downloads/{filename}"]  # verified download kept, nothing else


@pytest.mark.usefixtures("checksums_of_test_archives")
def test_a_partial_download_is_resumed(mirror, tmp_path: Path) -> None:
    half = len(ADE_ZIP) // 2
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads/ADEChallengeData2016.zip.part").write_bytes(ADE_ZIP[:half])
    run_download("ade20k", tmp_path, base_url=mirror.url, show_progress=False)
    assert mirror.requests == [("ADEChallengeData2016.zip", f"bytes={half}-")]
    assert (tmp_path / "downloads/ADEChallengeData2016.zip").read_bytes() == ADE_ZIP
    assert (tmp_path / "ade20k/dataset.json").is_file()


def test_offline_failure_says_where_to_put_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FMBSEG_OFFLINE", "1")
    with pytest.raises(
        DownloadError, match=r"FMBSEG_OFFLINE.*put ADEChallengeData2016\.zip into .*downloads/"
    ):
        run_download("ade20k", tmp_path, show_progress=False)


def test_unknown_dataset_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown dataset 'pascal' .known: ade20k, ade20k_train, "):
        run_download("pascal", tmp_path)


def test_an_unfinished_output_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "ade20k").mkdir()
    with pytest.raises(InputError, match="ade20k: exists but is not a finished conversion"):
        run_download("ade20k", tmp_path, show_progress=False)


TRAINING_SPLITS = {
    "coco_train2017": ("coco_stuff", ["000000000009.jpg", "000000000025.jpg"]),
    "voc_train": ("voc20", ["2007_000039.jpg"]),
    "context_train": ("context59", ["2008_000008.jpg"]),
    "ade20k_train": ("ade20k", ["ADE_train_00000001.jpg"]),
}


@pytest.mark.parametrize("name", sorted(TRAINING_SPLITS))
@pytest.mark.usefixtures("checksums_of_test_archives")
def test_a_training_split_is_images_and_the_vocabulary_without_masks(
    mirror, tmp_path: Path, name: str
) -> None:
    vocabulary, images = TRAINING_SPLITS[name]
    summary = run_download(name, tmp_path, base_url=mirror.url, show_progress=False)
    out = tmp_path / name
    assert tree(out) == ["classes.txt", "dataset.json", *(f"images/train/{i}" for i in images)]
    assert (out / f"images/train/{images[0]}").read_bytes() == jpg(3, 2)
    classes = (out / "classes.txt").read_text(encoding="utf-8").splitlines()
    assert tuple(classes) == get_dataset_spec(vocabulary).class_names
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["splits"] == summary["splits"] == {"train": len(images)}
    assert meta["has_masks"] is False and "label_transform" not in meta
    with pytest.raises(InputError, match="has no masks: an unlabelled training set"):
        FolderDataset(out, split="train")


@pytest.mark.parametrize("order", [("ade20k", "ade20k_train"), ("ade20k_train", "ade20k")])
@pytest.mark.usefixtures("checksums_of_test_archives")
def test_ade20k_and_its_training_split_share_one_download(
    mirror, tmp_path: Path, order: tuple[str, str]
) -> None:
    raw = tmp_path / "raw/ADEChallengeData2016/ADEChallengeData2016"
    run_download(order[0], tmp_path, base_url=mirror.url, show_progress=False)
    assert (raw / "images/training").exists() == (order[0] == "ade20k_train")
    run_download(order[1], tmp_path, base_url=mirror.url, show_progress=False)
    assert mirror.requests == [("ADEChallengeData2016.zip", None)]
    assert tree(tmp_path / "ade20k") == [
        "classes.txt", "dataset.json",
        "images/val/ADE_val_00000001.jpg", "masks/val/ADE_val_00000001.png",
    ]  # fmt: skip
    assert tree(tmp_path / "ade20k_train/images") == ["train/ADE_train_00000001.jpg"]
    assert tree(raw) == [
        "annotations/validation/ADE_val_00000001.png",
        "images/training/ADE_train_00000001.jpg",
        "images/validation/ADE_val_00000001.jpg",
    ]


@pytest.mark.parametrize(("benchmark", "training"), [("voc20", "voc_train"),
                                                      ("context59", "context_train")])  # fmt: skip
@pytest.mark.usefixtures("checksums_of_test_archives")
def test_voc_training_splits_need_nothing_beyond_the_benchmarks_extraction(
    mirror, tmp_path: Path, benchmark: str, training: str
) -> None:
    run_download(benchmark, tmp_path, base_url=mirror.url, show_progress=False)
    requests = len(mirror.requests)
    shutil.rmtree(tmp_path / "downloads")
    run_download(training, tmp_path, base_url=mirror.url, show_progress=False)
    assert len(mirror.requests) == requests
    assert (tmp_path / training / "dataset.json").is_file()


def test_cityscapes_training_images_come_from_the_same_manual_download(tmp_path: Path) -> None:
    with pytest.raises(InputError) as error:
        run_download("cityscapes_train", tmp_path, show_progress=False)
    message = str(error.value)
    assert "download leftImg8bit_trainvaltest.zip (from " in message
    assert "gtFine" not in message  # the labels are not needed

    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads/gtFine_trainvaltest.zip").write_bytes(CITY_LABELS)
    (tmp_path / "downloads/leftImg8bit_trainvaltest.zip").write_bytes(CITY_IMAGES)
    run_download("cityscapes", tmp_path, show_progress=False)
    summary = run_download("cityscapes_train", tmp_path, show_progress=False)
    assert summary["splits"] == {"train": 1}
    assert tree(tmp_path / "cityscapes_train/images") == ["train/aachen/aachen_000000_000019.png"]

    shutil.rmtree(tmp_path / "cityscapes_train")
    shutil.rmtree(tmp_path / "raw/leftImg8bit_trainvaltest/leftImg8bit/train")
    (tmp_path / "downloads/leftImg8bit_trainvaltest.zip").unlink()
    with pytest.raises(InputError, match="download leftImg8bit_trainvaltest.zip"):
        run_download("cityscapes_train", tmp_path, show_progress=False)
