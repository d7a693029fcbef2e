"""Fusioner's evaluation protocols: fold classes, 1-way episode metrics, Mosaic-4 builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmbseg.datasets.folder import FolderDataset
from fmbseg.errors import ConfigError, InputError
from fmbseg.evaluation.episodes import EpisodeMetrics, build_mosaics
from fmbseg.evaluation.folds import matching, novel_classes


def test_pascal_folds_hold_out_five_consecutive_voc_classes() -> None:
    assert novel_classes("pascal5i", 0) == ("aeroplane", "bicycle", "bird", "boat", "bottle")
    assert novel_classes("pascal5i", 1) == ("bus", "car", "cat", "chair", "cow")
    assert novel_classes("pascal5i", 3)[-1] == "tvmonitor"
    every = [name for fold in range(4) for name in novel_classes("pascal5i", fold)]
    assert len(set(every)) == 20


def test_coco_folds_interleave_the_80_classes() -> None:
    fold0 = novel_classes("coco20i", 0)
    assert fold0[:5] == ("person", "airplane", "boat", "parking meter", "dog")
    every = [name for fold in range(4) for name in novel_classes("coco20i", fold)]
    assert len(every) == len(set(every)) == 80
    with pytest.raises(ConfigError, match="fold 4"):
        novel_classes("coco20i", 4)


def test_class_names_match_whatever_the_spelling() -> None:
    assert matching(["Potted Plant", "TV monitor", "sofa"], ["pottedplant", "tvmonitor"]) == {0, 1}


def test_episode_metrics_sum_intersections_and_unions_per_class() -> None:
    metrics = EpisodeMetrics()
    valid = np.ones(4, bool)
    metrics.update("cat", np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool), valid)
    metrics.update("cat", np.array([1, 0, 0, 0], bool), np.array([1, 1, 0, 0], bool), valid)
    metrics.update("dog", np.array([0, 0, 0, 0], bool), np.array([0, 0, 1, 1], bool), valid)
    summary = metrics.summary()
    assert summary["per_class"] == {"cat": 0.5, "dog": 0.0}  # cat: I 2 / U 4
    assert summary["mIoU"] == 0.25
    # background: I 2+2+2=6, U 3+3+4=10; foreground: I 2, U 4+2=6
    assert summary["FB-IoU"] == pytest.approx((6 / 10 + 2 / 6) / 2)


def fss_folder(root: Path, classes: int = 5, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        for n in range(per_class):
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
                folder / f"{n + 1}.jpg"
            )
            mask = np.zeros((30, 40), np.uint8)
            mask[5:25, 10:30] = 255
            Image.fromarray(mask).save(folder / f"{n + 1}.png")
    return root


def test_mosaics_are_seeded_2x2_grids_of_four_distinct_classes(tmp_path: Path) -> None:
    source = fss_folder(tmp_path / "fss")
    first = build_mosaics(source, tmp_path / "a", count=6, seed=0)
    again = build_mosaics(source, tmp_path / "b", count=6, seed=0)
    other = build_mosaics(source, tmp_path / "c", count=6, seed=1)
    dataset = FolderDataset(first, "val")
    assert dataset.spec.class_names == (
        "background",
        "class0",
        "class1",
        "class2",
        "class3",
        "class4",
    )
    for sample in dataset:
        image, mask = dataset.read(sample)
        assert image.shape == (448, 448, 3)
        tiles = [mask[r : r + 224, c : c + 224] for r in (0, 224) for c in (0, 224)]
        present = [set(np.unique(tile)) - {0} for tile in tiles]
        assert all(len(p) == 1 for p in present)
        assert len(set().union(*present)) == 4
        assert (tiles[0] == 0).any()

    def masks(folder: Path) -> list[bytes]:
        return [p.read_bytes() for p in sorted((folder / "masks" / "val").iterdir())]

    assert masks(first) == masks(again) and masks(first) != masks(other)


def test_mosaics_need_four_classes(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="need 4 classes"):
        build_mosaics(fss_folder(tmp_path / "fss", classes=3), tmp_path / "out", count=1)


# --- through the fmbseg command, on oracle scenes --------------------------------------------

ORACLE = [
    *("models.clip.backend=oracle", "models.encoder.backend=oracle", "inference.short_side=96"),
    *("inference.window=48", "inference.stride=24"),
]


@pytest.fixture(scope="module")
def fusioner_model(oracle_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Fusioner trained on the oracle run's Stage 1 label maps."""
    import torch

    from fmbseg.align.features import run_cache_features
    from fmbseg.config import Params
    from fmbseg.fusioner.train import run_train
    from fmbseg.oracle.fakes import FakeClip, FakeEncoder
    from fmbseg.oracle.scenes import OracleWorld

    world, root = OracleWorld(), tmp_path_factory.mktemp("fusioner")
    tiny = {"width": 32, "depth": 2, "heads": 4, "decoder_upsamples": 1, "warmup_epochs": 1}
    fusioner = tiny | {"epochs": 20, "batch_size": 8, "episode": "image"}
    params = Params.model_validate(
        {
            "features": {"image_size": 96, "label_map_size": 24},
            "train": {"method": "fusioner", "fusioner": fusioner},
        }
    )
    run_cache_features(
        params,
        oracle_run.scenes / "images",
        oracle_run.merged,
        root / "features",
        encoder=FakeEncoder(world),
        show_progress=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train(
            params, root / "features", root / "model", text=FakeClip(world), show_progress=False
        )
    finally:
        torch.set_num_threads(threads)
    return root / "model"


@pytest.fixture(scope="module")
def voc_named_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out oracle scenes as a dataset folder; of the world's classes, "dog" and "person"
    are PASCAL-5i fold 2's novel classes (none is fold 0's)."""
    from fmbseg.oracle.scenes import OracleWorld, write_scene_folder

    world, root = OracleWorld(), tmp_path_factory.mktemp("voc-named")
    write_scene_folder(world, 6, root / "scenes", seed=41, sizes=((96, 96), (80, 112)))
    for kind, source in (("images", "images"), ("masks", "labels")):
        (root / "dataset" / kind).mkdir(parents=True)
        (root / "scenes" / source).rename(root / "dataset" / kind / "val")
    (root / "dataset" / "classes.txt").write_text("\n".join(world.class_names) + "\n")
    (root / "dataset" / "dataset.json").write_text('{"ignore_index": 255}')
    return root / "dataset"


def present_pairs(dataset: Path, names: tuple[str, ...]) -> int:
    """(image, class) pairs of the dataset whose mask holds one of ``names``."""
    data = FolderDataset(dataset, "val")
    wanted = {data.spec.class_names.index(name) for name in names}
    return sum(len(wanted & set(np.unique(data.read(s)[1]).tolist())) for s in data)


def evaluate_command(
    overrides: list[str], *args: str, out: Path, monkeypatch: pytest.MonkeyPatch
) -> dict:
    """``fmbseg evaluate`` run in an empty folder (no params.yaml), its metrics.json."""
    import json

    from fmbseg.cli import main

    monkeypatch.chdir(out.parent)
    settings = [item for key in overrides for item in ("-S", key)]
    assert main(["-q", "evaluate", *settings, *args, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("method", ["fusioner", "fmbseg"])
def test_pascal5i_fold_through_the_command_queries_only_the_folds_novel_classes(
    method: str,
    oracle_run,
    fusioner_model: Path,
    voc_named_scenes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Either method, from its trained folder: the command scores what the library does."""
    from fmbseg.config import load_params
    from fmbseg.evaluation.episodes import run_episodes

    model = fusioner_model if method == "fusioner" else oracle_run.module.parent
    args = ("--dataset", str(voc_named_scenes), "--model", str(model))
    metrics = evaluate_command(
        ORACLE, *args, "--protocol", "pascal5i", "--fold", "2", out=tmp_path / "cli",
        monkeypatch=monkeypatch,
    )  # fmt: skip
    assert (metrics["protocol"], metrics["fold"]) == ("pascal5i", 2)
    assert set(metrics["per_class"]) == {"dog", "person"}
    assert metrics["episodes"] == present_pairs(voc_named_scenes, ("dog", "person")) > 0
    library = run_episodes(
        load_params(None, ORACLE),
        voc_named_scenes,
        tmp_path / "library",
        protocol="pascal5i",
        fold=2,
        model=model,
        show_progress=False,
    )
    assert metrics == library
    assert 0.0 < metrics["mIoU"] <= 1.0


def test_a_fold_without_its_novel_classes_is_a_one_line_error(
    fusioner_model: Path,
    voc_named_scenes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fmbseg.cli import main

    monkeypatch.chdir(tmp_path)
    base = ["-q", "evaluate", "--dataset", str(voc_named_scenes), "--model", str(fusioner_model)]
    base += ["--out", "eval", "--protocol", "pascal5i"]
    assert main([*base, "--fold", "0"]) == 2
    assert "the dataset has none of pascal5i fold 0's novel classes" in capsys.readouterr().err
    assert main(base) == 2
    assert "--protocol pascal5i needs --fold 0..3" in capsys.readouterr().err


def test_mosaic4_through_the_command_queries_the_four_classes_of_every_mosaic(
    fusioner_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An FSS-1000-layout folder of oracle scenes (each image with one class's mask)."""
    from fmbseg.oracle.scenes import OracleWorld, make_scene

    world = OracleWorld()
    for k, name in enumerate(world.class_names[:5]):
        folder = tmp_path / "fss" / name
        folder.mkdir(parents=True)
        scene = make_scene(world, 64, 64, seed=k, background=k)
        Image.fromarray(scene.image).save(folder / "1.jpg", quality=100)
        Image.fromarray(((scene.labels == k) * 255).astype(np.uint8)).save(folder / "1.png")
    metrics = evaluate_command(
        ORACLE, "--dataset", "fss", "--model", str(fusioner_model), "--protocol", "mosaic4",
        "--mosaics", "3", out=tmp_path / "eval", monkeypatch=monkeypatch,
    )  # fmt: skip
    assert (metrics["protocol"], metrics["episodes"]) == ("mosaic4", 12)
    mosaics = FolderDataset(tmp_path / "eval" / "mosaics", "val")
    assert len(list(mosaics)) == 3
    queried = {mosaics.spec.class_names[k] for s in mosaics for k in np.unique(mosaics.read(s)[1])}
    assert set(metrics["per_class"]) == queried - {"background"}


def test_a_registry_model_brings_its_models_and_takes_the_evaluations_inference(
    store: Path,
    fusioner_model: Path,
    voc_named_scenes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No ``models`` params given (the defaults would need real CLIP weights): the registered
    oracle backends are used, with the command's inference settings; episodes and the standard
    protocol score the registered Fusioner as they score its folder."""
    from fmbseg.config import load_params
    from fmbseg.registry import register_module

    monkeypatch.setenv("FMBSEG_CACHE_DIR", str(tmp_path / "cache"))
    register_module(fusioner_model, params=load_params(None, ORACLE), name="fusioned")
    monkeypatch.setenv("FMBSEG_TRACKING", "0")  # the registry is read; the runs need no record
    inference = [key for key in ORACLE if key.startswith("inference.")]
    for protocol in (["--protocol", "pascal5i", "--fold", "2"], ["--protocol", "tcl"]):
        args = ["--dataset", str(voc_named_scenes), *protocol]
        folder = evaluate_command(
            ORACLE, *args, "--model", str(fusioner_model), out=tmp_path / "folder",
            monkeypatch=monkeypatch,
        )  # fmt: skip
        registered = evaluate_command(
            inference, *args, "--model", "models:/fusioned@candidate", out=tmp_path / "registry",
            monkeypatch=monkeypatch,
        )  # fmt: skip
        assert registered["mIoU"] == folder["mIoU"] > 0
