"""The class-agnostic mask stage on oracle scenes: SAM's automatic masks on every image (route
1.2's reused), DINO k-means masks, the marker for methods that need none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.config import Params, load_params
from fmbseg.errors import InputError
from fmbseg.oracle.fakes import FakeClip, FakeEncoder, FakeSam
from fmbseg.oracle.scenes import OracleWorld, write_scene_folder
from fmbseg.pseudolabel.agnostic import MaskSources, MaskTable, kmeans, run_masks
from fmbseg.pseudolabel.stage import Backends, run_pseudolabel

OVERRIDES = [
    "train.method=pixelclip", "models.sam.backend=oracle", "models.clip.backend=oracle",
    "models.encoder.backend=oracle", "pseudolabel.automask.points_per_side=8",
    "pseudolabel.short_side=64", "pseudolabel.crop_stride=32", "masks.images_per_shard=3",
    "masks.kmeans_image_size=64", "masks.kmeans_clusters=6",
]  # fmt: skip


def params_with(*overrides: str) -> Params:
    return load_params(None, [*OVERRIDES, *overrides])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("agnostic-scenes")
    write_scene_folder(OracleWorld(), 7, root, seed=11, sizes=((64, 64), (48, 80)))
    return root


def _masks_by_image(folder: Path) -> dict[str, list[bytes]]:
    table = MaskTable(folder)
    return {key: sorted(m.tobytes() for m in table.masks(key)) for key in table.image_ids()}


def test_sam_masks_cover_every_image_as_class_agnostic_rows(scenes: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    world = OracleWorld()
    sam = FakeSam(world)
    summary = run_masks(
        params_with(),
        scenes / "images",
        tmp_path,
        sources=MaskSources(sam=sam),
        show_progress=False,
    )
    assert summary["images"] == 7 and summary["shards_done"] == 3 and summary["source"] == "sam"
    shards = sorted((tmp_path / "shards").glob("*.parquet"))
    rows = {
        column: [value for shard in shards for value in pq.read_table(shard)[column].to_pylist()]
        for column in ("class_id", "route", "rle")
    }
    assert set(rows["class_id"]) == {-1} and set(rows["route"]) == {"sam"}
    table = MaskTable(tmp_path)
    from fmbseg.io.images import read_rgb

    for key in table.image_ids():
        image = read_rgb(scenes / "images" / f"{key}.png")
        direct = sam.generate_masks(sam.embed_image(image), params_with().pseudolabel.automask)
        expected = sorted(p.mask.tobytes() for p in direct if p.mask.any())
        assert sorted(m.tobytes() for m in table.masks(key)) == expected
    assert summary["masks"] == len(rows["rle"]) > 7


def test_route_12_masks_are_reused_and_sam_runs_only_where_stage_1_did_not(
    scenes: Path, tmp_path: Path
) -> None:
    world = OracleWorld()
    params = params_with()
    labels = {f"{i:04d}": [world.class_names[0]] for i in range(7)}
    labels |= {"0001": [], "0004": []}  # no class given: Stage 1 makes no mask there
    run_pseudolabel(
        params, scenes / "images", list(world.class_names), tmp_path / "pl", image_labels=labels,
        backends=Backends(FakeClip(world), FakeSam(world)), show_progress=False,
    )  # fmt: skip
    sam = FakeSam(world)
    run_masks(
        params, scenes / "images", tmp_path / "reused", pseudolabels=tmp_path / "pl",
        sources=MaskSources(sam=sam), show_progress=False,
    )  # fmt: skip
    assert sam.embed_calls == 2
    run_masks(
        params, scenes / "images", tmp_path / "fresh", sources=MaskSources(sam=FakeSam(world)),
        show_progress=False,
    )  # fmt: skip
    assert _masks_by_image(tmp_path / "reused") == _masks_by_image(tmp_path / "fresh")
    other = params_with("pseudolabel.automask.points_per_side=4")  # other SAM settings: no reuse
    sam = FakeSam(world)
    run_masks(
        other, scenes / "images", tmp_path / "other", pseudolabels=tmp_path / "pl",
        sources=MaskSources(sam=sam), show_progress=False,
    )  # fmt: skip
    assert sam.embed_calls == 7


def test_the_stages_own_sam_filters_replace_pseudolabels_and_stop_reuse(
    scenes: Path, tmp_path: Path
) -> None:
    world = OracleWorld()  # oversegmented halves: predicted IoU 0.90, stability 0.96

    def mask_count(folder: str, *overrides: str, pseudolabels: Path | None = None) -> int:
        sam = FakeSam(world, oversegment=True)
        summary = run_masks(
            params_with(*overrides), scenes / "images", tmp_path / folder,
            pseudolabels=pseudolabels, sources=MaskSources(sam=sam), show_progress=False,
        )  # fmt: skip
        assert sam.embed_calls == 7  # never reused: Stage 1 filtered with other thresholds
        return summary["masks"]

    assert mask_count("strict", "masks.stability_score_thresh=0.97") == 0
    opened = ("pseudolabel.automask.stability_score_thresh=0.97", "masks.stability_score_thresh=0")
    assert mask_count("opened", *opened) == mask_count("shared") > 0
    labels = {f"{i:04d}": [world.class_names[0]] for i in range(7)}
    run_pseudolabel(
        params_with(), scenes / "images", list(world.class_names), tmp_path / "pl",
        image_labels=labels, backends=Backends(FakeClip(world), FakeSam(world, oversegment=True)),
        show_progress=False,
    )  # fmt: skip
    assert mask_count("own", "masks.pred_iou_thresh=0.5", pseudolabels=tmp_path / "pl") > 0


def test_dino_kmeans_masks_partition_each_image(scenes: Path, tmp_path: Path) -> None:
    params = params_with("masks.source=dino")
    sources = MaskSources(encoder=FakeEncoder(OracleWorld()))
    summary = run_masks(params, scenes / "images", tmp_path, sources=sources, show_progress=False)
    table = MaskTable(tmp_path)
    assert table.source == "dino" and summary["images"] == 7
    for key in table.image_ids():
        masks = table.masks(key)
        assert 1 <= len(masks) <= 6
        assert (masks.sum(axis=0) == 1).all()  # disjoint and covering every pixel


def test_a_rerun_resumes_and_other_params_are_refused(scenes: Path, tmp_path: Path) -> None:
    sam = FakeSam(OracleWorld())
    run_masks(
        params_with(),
        scenes / "images",
        tmp_path,
        sources=MaskSources(sam=sam),
        show_progress=False,
    )
    (tmp_path / "shards" / "00002.json").unlink()  # as if killed during the last shard
    sam.embed_calls = 0
    run_masks(
        params_with(),
        scenes / "images",
        tmp_path,
        sources=MaskSources(sam=sam),
        show_progress=False,
    )
    assert sam.embed_calls == 1  # the last shard holds one image
    with pytest.raises(InputError, match="masks made with other"):
        run_masks(
            params_with("masks.source=dino"), scenes / "images", tmp_path, show_progress=False
        )


def test_methods_that_train_on_no_masks_get_a_marker(scenes: Path, tmp_path: Path) -> None:
    summary = run_masks(params_with("train.method=fmbseg"), scenes / "images", tmp_path)
    assert "skipped" in summary and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    with pytest.raises(InputError, match="holds no masks"):
        MaskTable(tmp_path)


def test_kmeans_separates_well_separated_blobs() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.5 * torch.randn(30, 2, generator=generator) for c in centres])
    labels = kmeans(points, 3, 100, 1e-4, seed=0)
    groups = [set(labels[i * 30 : (i + 1) * 30].tolist()) for i in range(3)]
    assert all(len(group) == 1 for group in groups)
    assert len(set().union(*groups)) == 3
    assert np.array_equal(labels, kmeans(points, 3, 100, 1e-4, seed=0))  # seeded
