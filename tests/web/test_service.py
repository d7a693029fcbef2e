"""The demo's work without HTTP: jobs segment like the library, bad input is refused at once,
segmenters are loaded once per model (a registry model is not left on disk)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmbseg.errors import InputError
from fmbseg.oracle.scenes import OracleWorld, write_scene_folder
from fmbseg.predict import label_palette
from fmbseg.segmenter import load_segmenter
from fmbseg.web.service import DONE, FAILED, DemoService, Job, SegmenterCache

WORLD = OracleWorld()
CLASSES = list(WORLD.class_names)


def wait(job: Job, timeout_s: float = 30.0) -> Job:
    deadline = time.monotonic() + timeout_s
    while job.state not in (DONE, FAILED):
        assert time.monotonic() < deadline, f"job still {job.state!r} after {timeout_s} s"
        time.sleep(0.05)
    return job


@pytest.fixture()
def service(oracle_run, tmp_path: Path):
    demo = DemoService(oracle_run.params, str(oracle_run.module), tmp_path / "work")
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scene")
    write_scene_folder(WORLD, 1, folder, seed=11, sizes=((72, 104),))
    return folder / "images" / "0000.png"


def test_an_uploaded_image_gets_the_segmenters_labels_and_areas(
    service: DemoService, oracle_run, scene: Path
) -> None:
    job = wait(
        service.submit(
            CLASSES, str(oracle_run.module), upload=scene.read_bytes(), filename="a b.png"
        )
    )
    assert job.state == DONE, job.error
    expected = load_segmenter(oracle_run.params, oracle_run.module).segment(
        np.asarray(Image.open(scene).convert("RGB")), CLASSES
    )
    labels = np.asarray(Image.open(service.job_file(job.id, "labels.png")))
    np.testing.assert_array_equal(labels, expected.labels)
    assert Image.open(service.job_file(job.id, "overlay.png")).size == (104, 72)
    result = job.result
    assert (result.width, result.height, result.download_name) == (104, 72, "a_b_labels.png")
    assert [area.name for area in result.areas] == CLASSES
    counts = np.bincount(expected.labels.ravel(), minlength=len(CLASSES))
    for area, count in zip(result.areas, counts, strict=True):
        assert area.percent == pytest.approx(100 * count / expected.labels.size)
        assert area.color == "#" + bytes(label_palette(len(CLASSES))[area.index].tolist()).hex()
    assert sum(area.percent for area in result.areas) == pytest.approx(100)
    snapshot = job.snapshot()
    assert snapshot["state"] == "done" and snapshot["result"]["classes"][0]["name"] == CLASSES[0]


def test_samples_are_the_quickstart_photos_with_their_vocabularies(
    service: DemoService, oracle_run
) -> None:
    samples = service.samples()
    assert {"astronaut", "chelsea", "coffee", "rocket", "camera", "voc_0000"} <= set(samples)
    assert samples["voc_0000"].classes[:2] == ("background", "aeroplane")
    assert "cat" in samples["chelsea"].classes
    job = wait(service.submit(["cat", "grass"], str(oracle_run.module), sample="chelsea"))
    assert job.state == DONE, job.error
    assert (job.result.width, job.result.height) == (451, 300)
    assert job.result.download_name == "chelsea_labels.png"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"upload": b"not an image", "filename": "holiday.jpg"}, "holiday.jpg: cannot decode"),
        ({"upload": b"", "filename": "empty.png"}, "empty.png: empty upload"),
        ({"sample": "nope"}, "sample 'nope': not one of"),
        ({}, "either an uploaded image or a sample"),
        ({"classes": []}, "vocabulary"),
        ({"classes": ["cat", "Cat"]}, "duplicate class name"),
        ({"model": " "}, "model: expected"),
    ],
)
def test_bad_requests_are_refused_at_once_in_one_line(
    service: DemoService, oracle_run, request_: dict, message: str
) -> None:
    arguments = {"classes": ["cat", "dog"], "model": str(oracle_run.module)} | request_
    classes, model = arguments.pop("classes"), arguments.pop("model")
    with pytest.raises(InputError, match=message) as caught:
        service.submit(classes, model, **arguments)
    assert "\n" not in str(caught.value) and str(service.workdir) not in str(caught.value)
    assert not any((service.workdir / "jobs").glob("*"))


def test_a_missing_model_fails_the_job_with_the_reason(
    service: DemoService, scene: Path, tmp_path: Path
) -> None:
    job = wait(service.submit(CLASSES, str(tmp_path / "nowhere"), upload=scene.read_bytes()))
    assert job.state == FAILED
    assert job.error.startswith(f"{tmp_path / 'nowhere'}: ") and "not found" in job.error
    assert job.snapshot()["step"] == 1  # "loading model", where it failed
    with pytest.raises(InputError, match="no labels.png"):
        service.job_file(job.id, "labels.png")


def test_a_segmenter_is_opened_once_per_model_and_again_when_its_folder_changes(
    oracle_run,
) -> None:
    cache = SegmenterCache(oracle_run.params)
    first = cache.get(str(oracle_run.module))
    assert cache.get(str(oracle_run.module.parent)) is first  # the same model, by its folder
    folder = oracle_run.module.parent
    stat = folder.stat()  # a retraining replaces files in the folder, which changes its mtime
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        assert cache.get(str(oracle_run.module)) is not first
    finally:
        os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_registry_model_is_opened_once_like_its_local_folder(
    store, oracle_run, tmp_path: Path, scene: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmbseg.registry import register_module

    monkeypatch.setenv("FMBSEG_CACHE_DIR", str(tmp_path / "cache"))
    register_module(oracle_run.module.parent, params=oracle_run.params, name="demo-model")
    cache = SegmenterCache(oracle_run.params)
    segmenter = cache.get("models:/demo-model@candidate")
    assert cache.get("models:/demo-model@candidate") is segmenter
    image = np.asarray(Image.open(scene).convert("RGB"))
    local = load_segmenter(oracle_run.params, oracle_run.module)
    np.testing.assert_array_equal(
        segmenter.segment(image, CLASSES).labels, local.segment(image, CLASSES).labels
    )


def test_old_finished_jobs_and_their_files_are_forgotten(
    service: DemoService, oracle_run, scene: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fmbseg.web.service.KEPT_JOBS", 2)
    jobs = [
        wait(service.submit(CLASSES, str(oracle_run.module), upload=scene.read_bytes()))
        for _ in range(4)
    ]
    with pytest.raises(InputError, match="unknown or expired"):
        service.job(jobs[0].id)
    assert not jobs[0].folder.exists()
    assert service.job(jobs[-1].id) is jobs[-1] and jobs[-1].folder.is_dir()


def test_upload_bytes_round_trip_any_format(service: DemoService, oracle_run, scene: Path) -> None:
    buffer = io.BytesIO()
    Image.open(scene).convert("RGB").save(buffer, format="JPEG", quality=95)
    job = wait(
        service.submit(CLASSES, str(oracle_run.module), upload=buffer.getvalue(), filename="x.jpg")
    )
    assert job.state == DONE and (job.result.width, job.result.height) == (104, 72)
