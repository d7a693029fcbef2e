"""ONNX export of a trained model's image side, checked against torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.align.module import AlignmentModule, save_module
from fmbseg.config import Params, load_params
from fmbseg.errors import InputError
from fmbseg.export import EXPORT_FILE, IMAGE_FILE, TEXT_FILE, export_onnx
from fmbseg.io.atomic import sha256_file
from fmbseg.methods import write_model_record
from fmbseg.segmenter import load_segmenter

ENCODER = "vit_small_patch14_dinov2.lvd142m"
NAMES = ("cat", "dog", "grass", "sky")


def tiny_params() -> Params:
    """A random-init DINOv2 of the real architecture, shrunk; the oracle's fake text model."""
    return load_params(
        None,
        [
            "models.encoder.allow_random_init=true",
            'models.encoder.overrides={"depth": 2, "embed_dim": 48, "num_heads": 2}',
            "models.clip.backend=oracle",
            "inference.short_side=56",
            "inference.window=42",
            "inference.stride=28",
        ],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init alignment module saved as a trained fmbseg model folder."""
    from fmbseg.models.registry import build_text_encoder

    folder = tmp_path_factory.mktemp("model")
    text_dim = build_text_encoder(tiny_params().models).embed_dim
    torch.manual_seed(0)
    save_module(
        AlignmentModule(48, text_dim, heads=2), folder / "module.safetensors", encoder=ENCODER
    )
    write_model_record(folder, "fmbseg", ("module.safetensors", "module.json"), encoder=ENCODER)
    return folder


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(tiny_params(), trained, NAMES, out)
    return out


def test_the_image_graph_equals_torch_at_sizes_it_was_not_traced_at(
    trained: Path, exported: Path
) -> None:
    import onnxruntime

    embedder = load_segmenter(tiny_params(), trained).scorer.image_embedder().eval()
    session = onnxruntime.InferenceSession(str(exported / IMAGE_FILE))
    generator = torch.Generator().manual_seed(7)
    for batch, rows, cols in [(1, 3, 3), (4, 2, 6), (2, 16, 16)]:
        windows = torch.rand(batch, 3, 14 * rows, 14 * cols, generator=generator)
        with torch.no_grad():
            expected = embedder(windows).numpy()
        got = session.run(None, {"windows": windows.numpy()})[0]
        assert got.shape == (batch, rows, cols, expected.shape[-1])
        assert np.abs(got - expected).max() <= 1e-4


def test_the_record_names_the_vocabulary_protocol_and_files(exported: Path) -> None:
    from safetensors.numpy import load_file

    record = json.loads((exported / EXPORT_FILE).read_text())
    assert record["method"] == "fmbseg"
    assert record["vocabulary"] == list(NAMES)
    assert record["patch_size"] == 14
    assert record["inference"]["window"] == 42
    assert record["provenance"]["encoder"] == "random-init"
    assert record["max_abs_difference_vs_torch"] <= 1e-4
    for name in (IMAGE_FILE, TEXT_FILE):
        assert record["files"][name] == sha256_file(exported / name)
    text = load_file(exported / TEXT_FILE)["text_embeddings"]
    assert text.shape == (len(NAMES), record["embed_dim"])
    assert np.allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)


def test_a_method_without_an_image_side_is_refused_in_one_line(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmbseg.methods.fmbseg import AlignmentScorer

    monkeypatch.delattr(AlignmentScorer, "image_embedder")
    with pytest.raises(InputError, match="ONNX export supports methods whose scorer has"):
        export_onnx(tiny_params(), trained, NAMES, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("size", "out"), [((7, 9), (20, 13)), ((30, 41), (30, 41)), ((50, 60), (9, 31))]
)
def test_numpy_resampling_equals_torch_bilinear_without_antialias(
    size: tuple[int, int], out: tuple[int, int]
) -> None:
    import torch.nn.functional as F

    from fmbseg.resample import resample_bilinear

    array = np.random.default_rng(0).random((3, *size), dtype=np.float32) * 255
    expected = F.interpolate(torch.from_numpy(array)[None], size=out, mode="bilinear")[0]
    assert np.abs(resample_bilinear(array, out) - expected.numpy()).max() <= 1e-3


@pytest.mark.parametrize("aggregate", ["pixels", "patches"])
def test_the_onnx_runtime_segments_as_the_torch_segmenter_does(
    trained: Path, exported: Path, aggregate: str
) -> None:
    from fmbseg.onnx_runtime import OnnxSegmenter
    from fmbseg.oracle.scenes import OracleWorld, make_scene

    params = tiny_params()
    params = params.model_copy(
        update={"inference": params.inference.model_copy(update={"aggregate": aggregate})}
    )
    runtime = OnnxSegmenter(exported)
    runtime.config = params.inference
    segmenter = load_segmenter(params, trained)
    names = ["sky", "cat", "grass"]
    for height, width in [(61, 90), (40, 40)]:
        image = make_scene(OracleWorld(), height, width, seed=height).image
        expected = segmenter.score(image, segmenter.scorer.prepare(tuple(names))).numpy()
        got = runtime.score(image, runtime.text[runtime.rows(names)])
        assert got.shape == expected.shape == (3, height, width)
        assert np.abs(got - expected).max() <= 1e-4
        assert (runtime.segment(image, names) == expected.argmax(0)).mean() >= 0.999


def test_the_onnx_runtime_needs_no_torch(exported: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from fmbseg.onnx_runtime import OnnxSegmenter
labels = OnnxSegmenter({str(exported)!r}).segment(np.zeros((30, 40, 3), np.uint8), ["dog", "cat"])
assert labels.shape == (30, 40), labels.shape
assert "torch" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_onnx_runtime_refuses_altered_files_and_unknown_classes(
    exported: Path, tmp_path: Path
) -> None:
    import shutil

    from fmbseg.errors import WeightsError
    from fmbseg.onnx_runtime import OnnxSegmenter

    with pytest.raises(InputError, match="'horse' is not in the exported vocabulary"):
        OnnxSegmenter(exported).rows(["cat", "horse"])
    altered = tmp_path / "altered"
    shutil.copytree(exported, altered)
    with (altered / TEXT_FILE).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(WeightsError, match="sha256 differs"):
        OnnxSegmenter(altered)


def test_fmbseg_predict_runs_an_export_folder_without_torch(exported: Path, tmp_path: Path) -> None:
    """The CLI path end to end in a process where torch cannot be imported."""
    import subprocess
    import sys

    from PIL import Image

    from fmbseg.oracle.scenes import OracleWorld, make_scene

    image = make_scene(OracleWorld(), 50, 70, seed=1).image
    Image.fromarray(image).save(tmp_path / "scene.png")
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, NoTorch())
from fmbseg.cli import main
code = main(["-q", "predict", {str(tmp_path / "scene.png")!r}, "--classes", "grass,cat",
             "--model", {str(exported)!r}, "--out", {str(tmp_path / "out")!r}])
assert "torch" not in sys.modules
sys.exit(code)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    labels = np.asarray(Image.open(tmp_path / "out" / "scene.png"))
    assert labels.shape == (50, 70) and set(np.unique(labels)) <= {0, 1}
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"0": "grass", "1": "cat"}
