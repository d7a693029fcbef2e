"""A registered model at work: request images, load-time checks, and `mlflow models serve`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmbseg.config import ModelsConfig
from fmbseg.errors import InputError, WeightsError
from fmbseg.io.images import read_rgb
from fmbseg.methods import read_model_record
from fmbseg.models.base import WeightProvenance
from fmbseg.oracle.scenes import OracleWorld, write_scene_folder
from fmbseg.serving import (
    decode_request_image,
    load_registered,
    portable_models,
    write_serving_record,
)

WORLD = OracleWorld()
CLASSES = ["sky", "grass", "road", "person"]


def test_request_images_are_bytes_base64_text_or_rgb_arrays(tmp_path: Path) -> None:
    write_scene_folder(WORLD, 1, tmp_path, seed=2, sizes=((20, 30),))
    path = tmp_path / "images" / "0000.png"
    expected = read_rgb(path)
    data = path.read_bytes()
    np.testing.assert_array_equal(decode_request_image(data, 0), expected)
    np.testing.assert_array_equal(
        decode_request_image(base64.b64encode(data).decode(), 0), expected
    )
    np.testing.assert_array_equal(decode_request_image(expected.astype(np.int64), 0), expected)
    with pytest.raises(InputError, match=r"^image 3: array shaped \(20, 30\), expected"):
        decode_request_image(expected[..., 0], 3)
    with pytest.raises(InputError, match=r"^image 1: cannot decode image"):
        decode_request_image(data[: len(data) // 2], 1)
    with pytest.raises(InputError, match="expected uint8 RGB values"):
        decode_request_image(expected.astype(np.int64) * 2, 0)


def test_a_checkpoint_path_missing_here_is_left_to_the_weights_directories(tmp_path: Path) -> None:
    present = tmp_path / "sam.pth"
    present.write_bytes(b"x")
    models = ModelsConfig.model_validate(
        {"encoder": {"checkpoint": str(tmp_path / "gone.pth")}, "sam": {"checkpoint": str(present)}}
    )
    portable = portable_models(models)
    assert portable.encoder.checkpoint is None and portable.sam.checkpoint == str(present)
    assert portable.clip == models.clip


def registered_folder(oracle_run, folder: Path, provenance: dict[str, WeightProvenance]) -> Path:
    source = oracle_run.module.parent
    files = [*read_model_record(source).files, "model.json"]
    folder.mkdir()
    for name in files:
        shutil.copy2(source / name, folder / name)
    write_serving_record(folder, oracle_run.params, provenance, files)
    return folder


def test_loading_refuses_weights_other_than_the_registered_ones(oracle_run, tmp_path: Path) -> None:
    synthetic = WeightProvenance("encoder", "oracle", "synthetic")
    text = WeightProvenance("text", "oracle", "synthetic")
    good = registered_folder(oracle_run, tmp_path / "good", {"encoder": synthetic, "text": text})
    segmenter, params = load_registered(good)
    assert params.inference == oracle_run.params.inference
    assert segmenter.scorer.provenance["encoder"].tag == "synthetic"

    other = WeightProvenance("encoder", "oracle", "file", "/elsewhere/enc.pth", "a" * 64)
    bad = registered_folder(oracle_run, tmp_path / "bad", {"encoder": other, "text": text})
    with pytest.raises(WeightsError, match=rf"encoder weights of oracle resolved here are synthetic, but the model was registered with sha256:{'a' * 64}"):  # fmt: skip
        load_registered(bad)

    (good / "module.json").write_text((good / "module.json").read_text() + " ")
    with pytest.raises(WeightsError, match=r"module.json: missing or changed since registration"):
        load_registered(good)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(server: subprocess.Popen, url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {server.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError("mlflow models serve did not answer /ping in time")


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_mlflow_models_serve_segments_posted_images_like_fmbseg_predict(
    store: Path, oracle_run, tmp_path: Path
) -> None:
    """A registered version served over HTTP: two images (base64 PNG/JPEG) and four class
    names in, label maps out, equal to `fmbseg predict --model models:/...` on the same files."""
    from fmbseg.registry import register_module

    register_module(oracle_run.module.parent, params=oracle_run.params, name="served")
    write_scene_folder(WORLD, 2, tmp_path / "in", seed=9, sizes=((72, 96), (64, 64)))
    images = tmp_path / "in" / "images"
    Image.open(images / "0001.png").save(images / "0001.jpg", quality=95)
    (images / "0001.png").unlink()
    inputs = [images / "0000.png", images / "0001.jpg"]

    (tmp_path / "tmp").mkdir()
    predict_env = {
        **os.environ,
        "FMBSEG_CACHE_DIR": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path / "tmp"),
    }
    # as in an activated environment: mlflow starts `uvicorn` by name
    bin_dir = str(Path(sys.executable).parent)
    server_env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m",
         "models:/served@candidate", "--env-manager", "local", "-h", "127.0.0.1",
         "-p", url.rsplit(":", 1)[1], "-w", "1"],
        env=server_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        # `fmbseg predict` runs while the server starts (two cores: about halves the wait)
        predicted = subprocess.run(
            [sys.executable, "-m", "fmbseg.cli", "-q", "predict", *map(str, inputs),
             "--classes", ",".join(CLASSES), "--model", "models:/served@candidate",
             "--out", str(tmp_path / "out")],
            env=predict_env, capture_output=True, text=True, cwd=tmp_path,
        )  # fmt: skip
        assert predicted.returncode == 0, predicted.stderr
        wait_until_serving(server, url, time.monotonic() + 45)
        encoded = [[base64.b64encode(path.read_bytes()).decode()] for path in inputs]
        status, reply = post(
            url,
            {
                "dataframe_split": {"columns": ["image"], "data": encoded},
                "params": {"classes": CLASSES},
            },
        )
        assert status == 200, reply
        for path, row in zip(inputs, reply["predictions"]):
            expected = np.asarray(Image.open(tmp_path / "out" / f"{path.stem}.png"))
            np.testing.assert_array_equal(np.array(row["labels"]), expected)
        assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {
            str(index): name for index, name in enumerate(CLASSES)
        }
        # what the old model answered: 400 "... does not match expected shape (-1, -1, 384)"
        status, reply = post(url, {"dataframe_split": {"columns": ["image"], "data": encoded}})
        assert status == 400 and "params.classes: give the class names" in reply["message"]
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert list((tmp_path / "tmp").iterdir()) == []  # predict left no temporary model copy
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1
