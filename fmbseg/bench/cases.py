"""The benchmark cases. Each runs in its own worker process and times ours beside a reference.

A case builds what it needs (not timed), then alternates its timed calls round by round and
returns facts about the work (crops, masks, images) and the unit of each measurement's rate.
Where ours and a reference are compared, both get identical inputs and produce the same kind
of output, so the ratio is the price (or the gain) of our code path alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmbseg.bench.measure import Recorder
from fmbseg.bench.presets import (
    Preset,
    build_clip,
    build_encoder,
    build_sam,
    clip_facts,
    encoder_facts,
)

if TYPE_CHECKING:
    import torch

    from fmbseg.config import AutoMaskConfig, PseudoLabelConfig
    from fmbseg.models.runtime import Runtime

CLIP_BATCH = 16  # ClipConfig's default
TEMPERATURE = 0.1
TRAIN_BATCH = 5  # the paper's batch of images
IGNORED_PATCH_FRACTION = 0.25  # patches without a clear pseudo-label
AUTOMATIC_MASKS = 64  # route 1.2 masks per image for naming and merging
SCALE_IMAGE = 64  # side of the scaling cases' images
SCALE_FEATURE_SIZE = 56
SCALE_SHARD = 64  # images per shard, so 100 and 1000 images both span several shards
# Scaling cases run tiny models: waking a second thread costs more than each op's work, and
# under other load those wake-ups dominate and distort the growth that the cases measure.
SCALE_THREADS = 1


@dataclass(frozen=True)
class CaseContext:
    preset: Preset
    runtime: Runtime
    quick: bool
    workdir: Path  # scratch space of this case
    images: int | None = None  # scaling cases: how many images
    data: Path | None = None  # scaling cases: folder of prepared image sets

    @property
    def device(self) -> torch.device:
        return self.runtime.torch_device()

    def image(self) -> np.ndarray:
        from fmbseg.oracle.scenes import OracleWorld, make_scene

        return make_scene(OracleWorld(), *self.preset.image_size, seed=0).image

    def pseudolabel_config(self) -> PseudoLabelConfig:
        from fmbseg.config import PseudoLabelConfig

        return PseudoLabelConfig(
            short_side=self.preset.clip_short_side,
            crop_stride=self.preset.clip_stride,
            automask=self.automask(),
        )

    def automask(self) -> AutoMaskConfig:
        """SAM's default filters except predicted IoU: random weights predict IoUs near 0.05,
        so with SAM's 0.88 our pipeline would skip upsampling every candidate while the
        reference upsamples them all; with the IoU filter off both upsample every candidate."""
        from fmbseg.config import AutoMaskConfig

        grid = self.preset.quick_points_per_side if self.quick else self.preset.points_per_side
        return AutoMaskConfig(points_per_side=grid, pred_iou_thresh=0.0)

    def text_embeddings(self, dim: int) -> torch.Tensor:
        """(K, D) unit vectors standing in for class prompts: any K vectors cost the same."""
        import torch

        generator = torch.Generator().manual_seed(0)
        text = torch.randn(self.preset.classes, dim, generator=generator)
        return torch.nn.functional.normalize(text, dim=-1)


CaseFn = Callable[[CaseContext, Recorder], dict[str, Any]]


def clip_dense(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """Route 1.1's dense CLIP features, batched vs one crop per forward pass."""
    from fmbseg.pseudolabel.dense import dense_clip_features

    clip = build_clip(ctx.preset, ctx.runtime)
    config = ctx.pseudolabel_config()
    image = ctx.image()
    for _ in rec.rounds():
        features = rec.time("ours.batched", dense_clip_features, image, clip, config, CLIP_BATCH)
        rec.time("reference.one_crop_at_a_time", dense_clip_features, image, clip, config, 1)
    crops = len(features.windows.offsets)
    return {
        "crops": crops,
        "batch_size": CLIP_BATCH,
        "resized": list(features.windows.resized_size),
        "units": {name: [crops, "crop"] for name in rec.samples},
    }


def sam_routes(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """Both routes on one SAM embedding vs segment-anything's own tools, each embedding anew:
    ``SamPredictor`` for the point prompts of 1.1, ``SamAutomaticMaskGenerator`` for 1.2."""
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    from fmbseg.pseudolabel.dense import dense_clip_features, top_patch_points
    from fmbseg.pseudolabel.routes import name_masks, route_points

    clip = build_clip(ctx.preset, ctx.runtime)
    sam = build_sam(ctx.preset, ctx.runtime)
    image = ctx.image()
    config = ctx.pseudolabel_config()
    features = dense_clip_features(image, clip, config, CLIP_BATCH)
    text = ctx.text_embeddings(clip.embed_dim)
    present = list(range(ctx.preset.present))
    auto = config.automask
    predictor = SamPredictor(sam.sam)
    generator = SamAutomaticMaskGenerator(
        sam.sam,
        points_per_side=auto.points_per_side,
        points_per_batch=sam.points_per_batch,
        pred_iou_thresh=auto.pred_iou_thresh,
        stability_score_thresh=auto.stability_score_thresh,
        stability_score_offset=auto.stability_score_offset,
        box_nms_thresh=auto.box_nms_thresh,
    )

    def ours_route_12(embedding: object) -> list[int]:
        proposals = [p for p in sam.generate_masks(embedding, auto) if p.mask.any()]
        return name_masks(features, text, present, [p.mask for p in proposals])

    def reference_route_11() -> list[np.ndarray]:
        best = []
        for class_id in present:
            points = top_patch_points(features, text[class_id], config.points_per_class)
            masks, scores, _ = predictor.predict(
                points, np.ones(len(points), dtype=np.int64), multimask_output=True
            )
            best.append(masks[int(np.argmax(scores))])
        return best

    def reference_route_12() -> list[int]:
        records = generator.generate(image)
        return name_masks(features, text, present, [r["segmentation"] for r in records])

    for _ in rec.rounds():
        embedding = rec.time("ours.sam_encoder", sam.embed_image, image)
        rec.time(
            "ours.route_1_1",
            route_points,
            *(features, text, present, sam, embedding, config.points_per_class),
        )
        ours = rec.time("ours.route_1_2", ours_route_12, embedding)
        rec.time("reference.predictor_encoder", predictor.set_image, image)
        rec.time("reference.route_1_1", reference_route_11)
        reference = rec.time("reference.automatic_mask_generator", reference_route_12)
    return {
        "grid": auto.points_per_side,
        "candidates": 3 * auto.points_per_side**2,
        "present": len(present),
        "masks_ours": len(ours),
        "masks_reference": len(reference),
        "sam_input": ctx.preset.sam.image_size,
        "units": {name: [1, "image"] for name in rec.samples},
    }


def _ellipses(rng: np.random.Generator, count: int, height: int, width: int) -> list[np.ndarray]:
    """Masks of 0.8-28 % of the image, overlapping like SAM's proposals do."""
    ys, xs = np.ogrid[:height, :width]
    masks = []
    for _ in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
        masks.append(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0)
    return masks


def masks(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """Naming route 1.2's masks and merging both routes into a label map, on synthetic masks:
    random-init SAM proposes almost none that pass its own filters."""
    import torch

    from fmbseg.config import MergeConfig
    from fmbseg.pseudolabel.dense import DenseClipFeatures, plan_windows
    from fmbseg.pseudolabel.merge import merge_image
    from fmbseg.pseudolabel.routes import ROUTE_AUTOMATIC, ROUTE_POINTS, name_masks

    height, width = ctx.preset.image_size
    crop, patch, dim = clip_facts(ctx.preset)
    windows = plan_windows(
        height,
        width,
        short_side=ctx.preset.clip_short_side,
        crop=crop,
        stride=ctx.preset.clip_stride,
        patch=patch,
    )
    patch_map = torch.nn.functional.normalize(
        torch.randn(*windows.grid_size, dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    features = DenseClipFeatures(patch_map, torch.empty(0, dim), windows)  # no crops needed
    text = ctx.text_embeddings(dim)
    present = list(range(ctx.preset.present))
    rng = np.random.default_rng(0)
    automatic = _ellipses(rng, AUTOMATIC_MASKS, height, width)
    points = _ellipses(rng, len(present), height, width)
    routes = [ROUTE_AUTOMATIC] * len(automatic) + [ROUTE_POINTS] * len(points)
    all_masks = automatic + points
    areas = [int(m.sum()) for m in all_masks]
    config = MergeConfig()
    for _ in rec.rounds():
        labels = rec.time("ours.naming", name_masks, features, text, present, automatic)
        rec.time(
            "ours.merge",
            merge_image,
            *(height, width, routes, areas, labels + present, all_masks, config, "bench"),
        )
    return {
        "masks_route_1_2": len(automatic),
        "masks_route_1_1": len(points),
        "units": {name: [1, "image"] for name in rec.samples},
    }


def write_labelled_scenes(folder: Path, count: int, size: tuple[int, int], seed: int) -> None:
    """``folder/images`` of oracle scenes and ``folder/merged``, their true labels laid out as a
    finished merge (what feature caching reads), so no Stage 1 has to run first."""
    from fmbseg.masks import IGNORE_LABEL
    from fmbseg.oracle.scenes import UNKNOWN, OracleWorld, read_labels, write_scene_folder
    from fmbseg.pseudolabel.merge import label_map_path, write_label_map

    world = OracleWorld()
    write_scene_folder(world, count, folder, seed, sizes=(size,))
    merged = folder / "merged"
    for path in sorted((folder / "labels").glob("*.png")):
        labels = read_labels(path)
        label_map = np.where(labels == UNKNOWN, IGNORE_LABEL, labels).astype(np.uint16)
        write_label_map(label_map_path(merged, path.stem), label_map)
    run = {"pseudolabel_run": {"vocabulary": list(world.class_names)}}
    (merged / "run.json").write_text(json.dumps(run))


def _bare_forward(network: torch.nn.Module, runtime: Runtime, batches: list[torch.Tensor]) -> None:
    """The timm network alone on ready-made device tensors: no reading, resizing or copying."""
    import torch

    with torch.no_grad(), runtime.autocast():
        for batch in batches:
            network.forward_features(batch)


def _random_batches(
    count: int, batch_size: int, size: tuple[int, int], device: torch.device
) -> list[torch.Tensor]:
    import torch

    generator = torch.Generator().manual_seed(0)
    sizes = [min(batch_size, count - start) for start in range(0, count, batch_size)]
    return [torch.rand(n, 3, *size, generator=generator).to(device) for n in sizes]


def cache_features(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """The feature-cache stage end to end (read, resize, encode, fp16, shard files) vs the
    bare encoder forward over as many images in the same batches."""
    from fmbseg.align.features import run_cache_features
    from fmbseg.config import load_params

    preset = ctx.preset
    count = preset.quick_cache_images if ctx.quick else preset.cache_images
    data = ctx.workdir / "scenes"
    write_labelled_scenes(data, count, preset.image_size, seed=1)
    encoder = build_encoder(preset.encoder_model, preset.encoder_overrides, ctx.runtime)
    params = load_params(
        None,
        [
            f"features.image_size={preset.feature_size}",
            f"models.encoder.batch_size={preset.encoder_batch}",
        ],
    )
    size = (preset.feature_size, preset.feature_size)
    batches = _random_batches(count, preset.encoder_batch, size, ctx.device)

    def run(out: Path) -> None:
        run_cache_features(
            params, data / "images", data / "merged", out, encoder=encoder, show_progress=False
        )

    for index in rec.rounds():
        rec.time("ours.cache_features", run, ctx.workdir / f"cache-{index}")
        rec.time("reference.bare_forward", _bare_forward, encoder.model, ctx.runtime, batches)
    return {
        "images": count,
        "batch_size": preset.encoder_batch,
        "feature_size": preset.feature_size,
        "units": {name: [count, "image"] for name in rec.samples},
    }


def train_step(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """One SGD step of the alignment module on 5 images' cached features, split so the loss's
    own forward and backward are timed apart from the module's."""
    import torch

    from fmbseg.align.loss import fmbseg_loss
    from fmbseg.align.module import AlignmentModule
    from fmbseg.align.train import deterministic

    preset = ctx.preset
    patch, in_dim = encoder_facts(preset)
    _, _, text_dim = clip_facts(preset)
    grid = preset.feature_size // patch
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(TRAIN_BATCH, grid, grid, in_dim, generator=generator)
    features = features.half().float().to(ctx.device)  # the cache stores float16
    labels = torch.randint(0, preset.classes, (TRAIN_BATCH * grid * grid,), generator=generator)
    ignored = torch.rand(labels.shape, generator=generator) < IGNORED_PATCH_FRACTION
    labels = labels.masked_fill(ignored, -1).to(ctx.device)
    text = ctx.text_embeddings(text_dim).to(ctx.device)
    torch.manual_seed(0)
    module = AlignmentModule(in_dim, text_dim).to(ctx.device).train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def loss_of(embeddings: torch.Tensor) -> torch.Tensor:
        return fmbseg_loss(embeddings.reshape(-1, text_dim), labels, text, TEMPERATURE)

    def whole_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(module(features)).backward()
        optimizer.step()

    with deterministic():
        for _ in rec.rounds():
            optimizer.zero_grad(set_to_none=True)
            embeddings = rec.time("ours.module_forward", module, features)
            detached = embeddings.detach().requires_grad_(True)
            loss = rec.time("ours.loss_forward", loss_of, detached)
            rec.time("ours.loss_backward", loss.backward)
            rec.time("ours.module_backward", embeddings.backward, detached.grad)
            rec.time("ours.optimizer_step", optimizer.step)
            rec.time("ours.whole_step", whole_step)
    return {
        "images": TRAIN_BATCH,
        "patches": TRAIN_BATCH * grid * grid,
        "in_dim": in_dim,
        "text_dim": text_dim,
        "classes": preset.classes,
        "units": {name: [TRAIN_BATCH, "image"] for name in rec.samples},
    }


def inference(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """Open-vocabulary segmentation of one image (TCL's sliding windows) vs the bare encoder
    forward over the same windows."""
    import torch

    from fmbseg.align.module import AlignmentModule
    from fmbseg.config import InferenceConfig
    from fmbseg.geometry import plan_inference
    from fmbseg.methods.fmbseg import AlignmentScorer
    from fmbseg.models.vocabulary import VocabularyEncoder
    from fmbseg.segmenter import OpenVocabularySegmenter, resize_bilinear

    preset = ctx.preset
    encoder = build_encoder(preset.encoder_model, preset.encoder_overrides, ctx.runtime)
    clip = build_clip(preset, ctx.runtime)
    names = [f"class {k}" for k in range(preset.classes)]
    vocabulary = VocabularyEncoder(clip)
    vocabulary.embed(names)  # encoded once per vocabulary, as in predict and evaluate
    torch.manual_seed(0)
    module = AlignmentModule(encoder.embed_dim, clip.embed_dim)
    window = preset.feature_size
    config = InferenceConfig(short_side=window, window=window, stride=window // 2)
    segmenter = OpenVocabularySegmenter(
        AlignmentScorer(encoder, module.to(ctx.device), vocabulary),
        config,
        ctx.device,
        batch_size=preset.encoder_batch,
    )
    image = ctx.image()
    plan = plan_inference(*image.shape[:2], config, encoder.patch_size)
    resized = resize_bilinear(image, plan.resized_size)
    crops = torch.cat([resized[:, :, t:b, le:r] for t, le, b, r in plan.windows])
    batches = [chunk.to(ctx.device) for chunk in crops.split(preset.encoder_batch)]
    for _ in rec.rounds():
        rec.time("ours.segment", segmenter.segment, image, names)
        rec.time("reference.bare_encoder", _bare_forward, encoder.model, ctx.runtime, batches)
    return {
        "windows": len(plan.windows),
        "window": window,
        "classes": preset.classes,
        "units": {name: [1, "image"] for name in rec.samples},
    }


def onnx_image_side(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """The exported image side (encoder + alignment module) on onnxruntime vs the same network
    in torch, on the same batches of windows (CPU: onnxruntime's CPU provider)."""
    import onnxruntime
    import torch

    from fmbseg.align.module import AlignmentModule
    from fmbseg.export import export_image_graph
    from fmbseg.methods.fmbseg import AlignmentScorer

    preset = ctx.preset
    encoder = build_encoder(preset.encoder_model, preset.encoder_overrides, ctx.runtime)
    torch.manual_seed(0)
    module = AlignmentModule(encoder.embed_dim, 512).eval().to(ctx.device)
    embedder = AlignmentScorer.image_side(encoder, module).eval()
    window = preset.feature_size
    path = ctx.workdir / "image_embedder.onnx"
    export_image_graph(embedder, encoder.patch_size, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.rand(preset.encoder_batch, 3, window, window, generator=generator) for _ in range(2)
    ]

    def run_torch() -> None:
        with torch.no_grad():
            for batch in batches:
                embedder(batch.to(ctx.device))

    def run_onnx() -> None:
        for batch in batches:
            session.run(None, {"windows": batch.numpy()})

    for _ in rec.rounds():
        rec.time("ours.onnxruntime", run_onnx)
        rec.time("reference.torch", run_torch)
    windows = preset.encoder_batch * len(batches)
    return {
        "windows": windows,
        "window": window,
        "units": {name: [windows, "window"] for name in rec.samples},
    }


def scale_pseudolabel(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """Stage 1 over a folder of N small oracle scenes with the fake CLIP and SAM: the stage's
    own costs (reading, shards, bookkeeping) at growing N."""
    import torch

    from fmbseg.config import load_params
    from fmbseg.oracle.fakes import FakeClip, FakeSam
    from fmbseg.oracle.scenes import OracleWorld
    from fmbseg.pseudolabel.stage import Backends, run_pseudolabel

    assert ctx.images is not None and ctx.data is not None
    torch.set_num_threads(SCALE_THREADS)
    world = OracleWorld()
    backends = Backends(FakeClip(world), FakeSam(world))
    params = load_params(
        None,
        [
            f"pseudolabel.short_side={SCALE_IMAGE}",
            "pseudolabel.crop_stride=32",
            "pseudolabel.automask.points_per_side=8",
            f"pseudolabel.images_per_shard={SCALE_SHARD}",
        ],
    )

    def run(images: Path, out: Path) -> None:
        run_pseudolabel(
            params, images, list(world.class_names), out, backends=backends, show_progress=False
        )

    run(_smallest_set(ctx.data) / "images", ctx.workdir / "warm")  # lazy imports, first calls
    images = ctx.data / str(ctx.images) / "images"
    for index in rec.rounds(warmup=0):
        rec.time("ours.pseudolabel", run, images, ctx.workdir / f"run-{index}")
    return {"images": ctx.images, "units": {name: [ctx.images, "image"] for name in rec.samples}}


def scale_features(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """Feature caching of N small images with the tiny size's two-layer DINOv2 at growing N."""
    import torch

    from fmbseg.align.features import run_cache_features
    from fmbseg.bench.presets import get_preset
    from fmbseg.config import load_params

    assert ctx.images is not None and ctx.data is not None
    torch.set_num_threads(SCALE_THREADS)
    tiny = get_preset("tiny")
    encoder = build_encoder(tiny.encoder_model, tiny.encoder_overrides, ctx.runtime)
    params = load_params(
        None,
        [
            f"features.image_size={SCALE_FEATURE_SIZE}",
            f"features.images_per_shard={SCALE_SHARD}",
        ],
    )

    def run(folder: Path, out: Path) -> None:
        run_cache_features(
            params, folder / "images", folder / "merged", out, encoder=encoder, show_progress=False
        )

    run(_smallest_set(ctx.data), ctx.workdir / "warm")
    for index in rec.rounds(warmup=0):
        rec.time(
            "ours.cache_features", run, ctx.data / str(ctx.images), ctx.workdir / f"run-{index}"
        )
    return {"images": ctx.images, "units": {name: [ctx.images, "image"] for name in rec.samples}}


def _smallest_set(data: Path) -> Path:
    return min((p for p in data.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def prepare_scaling_sets(folder: Path, sizes: list[int]) -> None:
    """One folder per N (``folder/<N>``), since listing a folder costs as much as its size."""
    for count in sizes:
        write_labelled_scenes(folder / str(count), count, (SCALE_IMAGE, SCALE_IMAGE), seed=2)
