"""``fmbseg demo``: the HTTP API, and the page driven in a real headless Chromium.

The browser test starts the real command on a free 127.0.0.1 port with the oracle world's
trained module, uploads an image, types the classes, and checks the overlay, the legend, the
areas and the downloaded label PNG against the library's segmenter on the same image.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fmbseg.errors import ConfigError
from fmbseg.oracle.scenes import OracleWorld, write_scene_folder
from fmbseg.segmenter import load_segmenter
from fmbseg.web.app import bind, create_app
from fmbseg.web.service import DemoService

WORLD = OracleWorld()
CLASSES = list(WORLD.class_names)
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scene")
    write_scene_folder(WORLD, 1, folder, seed=21, sizes=((88, 120),))
    return folder / "images" / "0000.png"


@pytest.fixture()
def client(oracle_run, tmp_path: Path):
    service = DemoService(oracle_run.params, str(oracle_run.module), tmp_path)
    with TestClient(create_app(service)) as test_client:
        yield test_client
    service.close()


def test_api_segments_an_upload_and_serves_its_files(client: TestClient, scene: Path) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="classes"' in page.text
    assert client.get("/static/app.js").status_code == 200
    config = client.get("/api/config").json()
    assert config["model"].endswith("module.safetensors")
    assert "chelsea" in [sample["name"] for sample in config["samples"]]
    assert client.get("/api/samples/chelsea").headers["content-type"] == "image/png"

    submitted = client.post(
        "/api/jobs",
        params={"classes": CLASSES, "model": config["model"], "filename": "scene.png"},
        content=scene.read_bytes(),
    )
    assert submitted.status_code == 202
    job = submitted.json()
    deadline = time.monotonic() + TIMEOUT_S
    while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["state"] == "done", job["error"]
    result = job["result"]
    assert [area["name"] for area in result["classes"]] == CLASSES
    labels = Image.open(io.BytesIO(client.get(result["labels_url"]).content))
    overlay = Image.open(io.BytesIO(client.get(result["overlay_url"]).content))
    assert labels.size == overlay.size == (120, 88)


def test_api_answers_bad_requests_with_the_reason(
    client: TestClient, oracle_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = str(oracle_run.module)
    broken = client.post(
        "/api/jobs",
        params={"classes": ["cat"], "model": model, "filename": "x.jpg"},
        content=b"oops",
    )
    assert broken.status_code == 400
    assert broken.json()["detail"].startswith("x.jpg: cannot decode image")
    no_classes = client.post("/api/jobs", params={"model": model}, content=b"oops")
    assert no_classes.status_code == 422
    monkeypatch.setattr("fmbseg.web.app.MAX_UPLOAD_BYTES", 3)
    too_large = client.post(
        "/api/jobs", params={"classes": ["cat"], "model": model}, content=b"oops"
    )
    assert too_large.status_code == 413
    assert client.get("/api/jobs/nope").status_code == 404
    assert client.get("/api/samples/nope").status_code == 404


def test_a_busy_port_is_a_one_line_error() -> None:
    with bind(0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"--port {port}: cannot listen on 127\.0\.0\.1"):
            bind(port)


def _oracle_overrides(params) -> list[str]:
    """The ``-S`` options that give the command the oracle run's backends and inference sizes."""
    settings = [f"models.{name}.backend=oracle" for name in ("clip", "sam", "encoder")] + [
        f"inference.{key}={getattr(params.inference, key)}"
        for key in ("short_side", "window", "stride")
    ]
    return [token for setting in settings for token in ("-S", setting)]


@pytest.fixture()
def demo_command(oracle_run, tmp_path: Path):
    """``fmbseg demo --port 0`` running; yields its URL and stops it with Ctrl-C (SIGINT)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "fmbseg.cli", "-q", "demo", "--port", "0",
            "--model", str(oracle_run.module), *_oracle_overrides(oracle_run.params),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(temp)},
    )  # fmt: skip
    try:
        first_line = process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+/", first_line)
        assert found, first_line + process.stdout.read()
        yield found.group(0)
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode in (0, 130), output
    assert list(temp.iterdir()) == [], "the demo left files behind"


@pytest.fixture()
def browser(tmp_path: Path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver packages (apt-get install)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(tmp_path / "downloads"),
            "download.prompt_for_download": False,
        },
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT_S)
    yield driver
    driver.quit()


def test_page_uploads_an_image_and_shows_overlay_legend_areas_and_download(
    demo_command: str, browser, oracle_run, scene: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, TIMEOUT_S)
    browser.get(demo_command)
    wait.until(lambda d: d.find_element(By.ID, "sample").get_attribute("data-loaded") == "true")
    assert browser.find_element(By.ID, "model").get_attribute("value") == str(oracle_run.module)
    browser.find_element(By.ID, "file").send_keys(str(scene))
    browser.find_element(By.ID, "classes").send_keys(", ".join(CLASSES))
    browser.find_element(By.ID, "submit").click()

    overlay = wait.until(lambda d: _loaded_image(d, "overlay"))
    size = browser.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay
    )
    assert size == [120, 88]
    assert browser.find_element(By.ID, "status").text.startswith("done in")
    assert browser.find_element(By.ID, "error").is_displayed() is False
    names = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#legend td.name")]
    assert names == CLASSES
    percents = [
        float(cell.get_attribute("data-percent"))
        for cell in browser.find_elements(By.CSS_SELECTOR, "#legend td.area")
    ]
    assert sum(percents) == pytest.approx(100, abs=1e-6)
    browser.save_screenshot(str(tmp_path / "page.png"))

    browser.find_element(By.ID, "download").click()
    downloaded = tmp_path / "downloads" / "0000_labels.png"
    WebDriverWait(browser, TIMEOUT_S).until(lambda _: downloaded.is_file())
    labels = np.asarray(Image.open(downloaded))
    image = np.asarray(Image.open(scene).convert("RGB"))
    expected = load_segmenter(oracle_run.params, oracle_run.module).segment(image, CLASSES)
    np.testing.assert_array_equal(labels, expected.labels)
    counts = np.bincount(expected.labels.ravel(), minlength=len(CLASSES))
    assert percents == pytest.approx((100 * counts / counts.sum()).tolist(), abs=0.001)

    model = browser.find_element(By.ID, "model")
    model.clear()
    model.send_keys(str(tmp_path / "missing"))
    browser.find_element(By.ID, "submit").click()
    error = wait.until(
        lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error")
    )
    assert error.text.startswith(f"{tmp_path / 'missing'}: ") and "not found" in error.text
    assert browser.find_element(By.ID, "status").text.startswith("failed after")


def _loaded_image(driver, element_id: str):
    from selenium.webdriver.common.by import By

    image = driver.find_element(By.ID, element_id)
    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text
    loaded = driver.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0 && arguments[0].offsetParent !== null",
        image,
    )
    return image if loaded else False
