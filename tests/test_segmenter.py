"""The open-vocabulary segmenter on a module trained in the oracle world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmbseg.align.module import load_module
from fmbseg.config import InferenceConfig
from fmbseg.errors import ConfigError, WeightsError
from fmbseg.geometry import plan_inference, rescale_size
from fmbseg.methods.fmbseg import AlignmentScorer
from fmbseg.models.vocabulary import VocabularyEncoder
from fmbseg.oracle.fakes import FakeClip, FakeEncoder
from fmbseg.oracle.scenes import OracleWorld, make_scene
from fmbseg.segmenter import Background, OpenVocabularySegmenter, resize_bilinear

WORLD = OracleWorld()
SLIDING = InferenceConfig(short_side=96, window=48, stride=24)


def segmenter(module_path: Path, config: InferenceConfig = SLIDING) -> OpenVocabularySegmenter:
    module, _ = load_module(module_path)
    scorer = AlignmentScorer(FakeEncoder(WORLD), module, VocabularyEncoder(FakeClip(WORLD)))
    return OpenVocabularySegmenter(scorer, config, torch.device("cpu"))


@pytest.fixture(scope="module")
def module_path(oracle_run) -> Path:
    return oracle_run.module


@pytest.mark.parametrize(
    "config", [SLIDING, InferenceConfig(mode="whole", short_side=96)], ids=["sliding", "whole"]
)
def test_held_out_scenes_are_segmented_at_their_own_size(
    module_path: Path, config: InferenceConfig
) -> None:
    model = segmenter(module_path, config)
    accuracies = []
    for seed in range(100, 104):
        scene = make_scene(WORLD, 90, 130, seed=seed)
        result = model.segment(scene.image, WORLD.class_names)
        assert result.labels.shape == scene.labels.shape
        assert result.scores.shape == (WORLD.num_classes, 90, 130)
        accuracies.append((result.labels == scene.labels).mean())
    assert np.mean(accuracies) >= 0.85


def test_any_vocabulary_order_and_subset(module_path: Path) -> None:
    model = segmenter(module_path)
    scene = make_scene(WORLD, 96, 96, seed=7)
    reordered = list(reversed(WORLD.class_names))
    labels = model.segment(scene.image, reordered).labels
    as_world = np.array([WORLD.class_names.index(n) for n in reordered])[labels]
    assert (as_world == scene.labels).mean() >= 0.85


def test_stuff_names_count_as_background(module_path: Path) -> None:
    model = segmenter(module_path)
    scene = make_scene(WORLD, 96, 96, seed=8)
    things = ["background", "cat", "dog", "person", "traffic light", "crème brûlée"]
    stuff = ("grass", "sky", "road")
    labels = model.segment(scene.image, things, Background(0, stuff_names=stuff)).labels
    truth = np.array([things.index(n) if n in things else 0 for n in WORLD.class_names])[
        scene.labels
    ]
    assert (labels == truth).mean() >= 0.85
    assert set(np.unique(labels)) <= set(range(len(things)))


def test_threshold_background_takes_low_scores(module_path: Path) -> None:
    model = segmenter(module_path)
    scene = make_scene(WORLD, 64, 64, seed=9)
    names = ["background", *WORLD.class_names]
    everything = model.segment(scene.image, names, Background(0, threshold=1.01)).labels
    assert (everything == 0).all()
    nothing = model.segment(scene.image, names, Background(0, threshold=-1.01)).labels
    assert (nothing != 0).all()


# --- mmseg's geometry, as TCL (mmseg 0.x) and SCLIP (mmseg 1.x) evaluate -------------------


def mmcv_rescale_size(width: int, height: int, img_scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.rescale_size((w, h), img_scale) for a tuple scale, written from its definition:
    factor min(max_long / long, max_short / short), each side int(side * factor + 0.5)."""
    factor = min(max(img_scale) / max(height, width), min(img_scale) / min(height, width))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def mmseg_slide_windows(h_img: int, w_img: int, crop: int, stride: int) -> list[tuple]:
    """The (y1, x1, y2, x2) that mmseg's EncoderDecoder.slide_inference visits, in its order."""
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            windows.append((y1, x1, y2, x2))
    return windows


@pytest.mark.parametrize(
    ("original", "resized", "windows"),
    [((375, 500), (448, 597), 2), ((512, 683), (448, 598), 2), ((500, 333), (673, 448), 3)],
)
def test_tcl_rescale_examples(original, resized, windows) -> None:
    assert rescale_size(*original, short_side=448, long_side=2048) == resized
    plan = plan_inference(*original, InferenceConfig(), patch=14)
    assert plan.resized_size == resized
    assert len(plan.windows) == windows


def test_rescale_and_windows_equal_mmcv_and_mmseg_slide_inference() -> None:
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 3000, size=(300, 2))]
    sizes += [(10, 3000), (3000, 10), (448, 448), (1, 1)]
    for (short, window, stride), (height, width) in zip(
        [(448, 448, 224), (336, 224, 112), (560, 224, 112)] * len(sizes), sizes * 3, strict=True
    ):
        config = InferenceConfig(short_side=short, window=window, stride=stride)
        plan = plan_inference(height, width, config, patch=16)
        new_w, new_h = mmcv_rescale_size(width, height, (2048, short))
        assert plan.resized_size == (new_h, new_w)
        expected = [
            (y1, x1, y2, x2) for y1, x1, y2, x2 in mmseg_slide_windows(new_h, new_w, window, stride)
        ]
        assert list(plan.windows) == expected


def test_resize_is_opencv_bilinear_fixed_point_without_antialias() -> None:
    """mmcv's imresize is cv2.resize(INTER_LINEAR) on uint8: half-pixel bilinear, no antialias,
    11-bit fixed-point weights, uint8 result. Ours redoes that arithmetic: equal when shrinking,
    and when enlarging at most one grey level off on under 0.5 % of values (OpenCV's build
    rounds its coefficients in ways we do not reproduce bit for bit)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    cases = [((1024, 2048), (448, 896), 0.0), ((375, 500), (448, 597), 0.005)]
    cases += [((37, 23), (448, 278), 0.005), ((500, 333), (673, 448), 0.005)]
    for (height, width), (new_h, new_w), tolerated in cases:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        reference = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        ours = (resize_bilinear(image, (new_h, new_w))[0].permute(1, 2, 0) * 255).round()
        difference = np.abs(ours.numpy() - reference.astype(np.float32))
        assert difference.max() <= 1.0
        assert (difference > 0).mean() <= tolerated
    image = rng.integers(0, 256, (1024, 2048, 3), dtype=np.uint8)
    reference = cv2.resize(image, (896, 448), interpolation=cv2.INTER_LINEAR)
    antialiased = F.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), (448, 896),
        mode="bilinear", antialias=True,
    )[0].permute(1, 2, 0)  # fmt: skip
    assert np.abs(antialiased.numpy() - reference).max() > 10  # what the test tells apart


def test_resize_does_not_depend_on_the_thread_count() -> None:
    image = np.random.default_rng(4).integers(0, 256, (75, 100, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = resize_bilinear(image, (96, 128))
        torch.set_num_threads(2)
        assert torch.equal(one, resize_bilinear(image, (96, 128)))
    finally:
        torch.set_num_threads(threads)


class PatchMeanScorer:
    """A window scorer with known output: per patch of 8, the mean of each colour channel."""

    patch_size = 8
    provenance: dict = {}

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def prepare(self, class_names: tuple[str, ...]) -> tuple[str, ...]:
        return class_names

    def score_windows(self, windows: torch.Tensor, vocabulary: tuple[str, ...]) -> torch.Tensor:
        self.shapes.append(tuple(windows.shape))
        assert windows.shape[-2] % 8 == 0 and windows.shape[-1] % 8 == 0
        means = F.avg_pool2d(windows, 8)
        return torch.cat([means[:, [k % 3]] * (k + 1) for k in range(len(vocabulary))], dim=1)


def test_scores_equal_mmseg_slide_inference_transcribed() -> None:
    """Windows scored, each upsampled to its window, summed with F.pad as mmseg does, divided
    by the count, resized to the original: the segmenter gives the same scores."""
    scorer = PatchMeanScorer()
    config = InferenceConfig(short_side=40, long_side=2048, window=32, stride=16)
    image = np.random.default_rng(2).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    ours = OpenVocabularySegmenter(scorer, config, torch.device("cpu"), 3).score(image, ("a", "b"))
    img = resize_bilinear(image, rescale_size(45, 70, 40, 2048))
    h_img, w_img = img.shape[-2:]
    preds = img.new_zeros((1, 2, h_img, w_img))
    count_mat = img.new_zeros((1, 1, h_img, w_img))
    for y1, x1, y2, x2 in mmseg_slide_windows(h_img, w_img, 32, 16):
        logit = F.interpolate(
            scorer.score_windows(img[:, :, y1:y2, x1:x2], ("a", "b")), (y2 - y1, x2 - x1),
            mode="bilinear",
        )  # fmt: skip
        preds += F.pad(logit, (x1, w_img - x2, y1, h_img - y2))
        count_mat[:, :, y1:y2, x1:x2] += 1
    expected = F.interpolate(preds / count_mat, size=(45, 70), mode="bilinear")[0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("mode", "scored"), [("whole", (48, 80)), ("sliding", (48, 64))])
def test_regions_off_the_patch_grid_are_zero_padded_and_cropped_back(mode, scored) -> None:
    """Whole mode scores the rescaled image (45 x 75 here) at once, and an image shorter than a
    window gets windows as short as itself: the scorer sees them zero-padded at the bottom and
    right to whole patches (of 8), and the scores are cropped back to the real pixels."""
    scorer = PatchMeanScorer()
    config = InferenceConfig(mode=mode, short_side=45, window=64, stride=32)
    image = np.full((60, 100, 3), 200, dtype=np.uint8)
    scores = OpenVocabularySegmenter(scorer, config, torch.device("cpu")).score(image, ("a",))
    assert plan_inference(60, 100, config, 8).resized_size == (45, 75)
    assert {shape[-2:] for shape in scorer.shapes} == {scored}
    assert scores.shape == (1, 60, 100)
    # away from the last patch row and column, which mix real pixels with padding
    torch.testing.assert_close(scores[0, :45, :85], torch.full((45, 85), 200 / 255))
    assert scores[0, -1, -1] < 200 / 255


def test_patch_aggregation_rounds_to_patches_and_needs_a_patch_stride() -> None:
    config = InferenceConfig(short_side=45, window=32, stride=16, aggregate="patches")
    plan = plan_inference(60, 100, config, 8)
    assert plan.resized_size == (48, 72)  # 45 x 75 rounded to whole patches of 8
    assert all(v % 8 == 0 for window in plan.windows for v in window)
    with pytest.raises(ConfigError, match="inference.stride: 12 must be a multiple of the patch"):
        plan_inference(60, 100, config.model_copy(update={"stride": 12}), 8)
    with pytest.raises(ConfigError, match="inference.window: 36 must be a multiple"):
        plan_inference(60, 100, InferenceConfig(window=36), 8)


@pytest.mark.parametrize("aggregate", ["pixels", "patches"])
def test_both_aggregations_segment_held_out_scenes(module_path: Path, aggregate: str) -> None:
    model = segmenter(module_path, SLIDING.model_copy(update={"aggregate": aggregate}))
    accuracies = [
        (model.segment(s.image, WORLD.class_names).labels == s.labels).mean()
        for s in (make_scene(WORLD, 90, 130, seed=seed) for seed in range(100, 103))
    ]
    assert np.mean(accuracies) >= 0.85


def sclip_postprocess(
    seg_logits: torch.Tensor, query_idx: list[int], logit_scale: float, prob_thd: float, area_thd
) -> torch.Tensor:
    """SCLIP's CLIPForSegmentation.postprocess_result for one image, written from its code's
    description: softmax over queries, max over each class's queries, small classes zeroed,
    argmax, low probability to class 0."""
    seg_logits = (seg_logits * logit_scale).softmax(0)
    num_cls = max(query_idx) + 1
    if num_cls != len(query_idx):
        cls_index = F.one_hot(torch.tensor(query_idx)).T.view(num_cls, len(query_idx), 1, 1)
        seg_logits = (seg_logits[None] * cls_index).max(1)[0]
    if area_thd is not None:
        predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
        area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area_pred = (area_pred > area_thd * area_pred.sum()).to(seg_logits.dtype)
        seg_logits[1:] *= area_pred.transpose(0, -1)
    seg_pred = seg_logits.argmax(0)
    seg_pred[seg_logits.max(0)[0] < prob_thd] = 0
    return seg_pred


class FixedScorer:
    """Scores given per queried name, whatever the window (checks the decision rule alone)."""

    patch_size = 8
    provenance: dict = {}

    def __init__(self, maps: dict[str, torch.Tensor]) -> None:
        self.maps = maps

    def prepare(self, class_names: tuple[str, ...]) -> tuple[str, ...]:
        return class_names

    def score_windows(self, windows: torch.Tensor, vocabulary: tuple[str, ...]) -> torch.Tensor:
        return torch.stack([self.maps[name] for name in vocabulary])[None]


@pytest.mark.parametrize(
    ("logit_scale", "prob_thd", "area_thd"), [(65, 0.1, 0.1), (50, 0.1, None), (40, 0.3, 0.25)]
)
def test_probability_background_equals_sclip_postprocess(logit_scale, prob_thd, area_thd) -> None:
    rng = torch.Generator().manual_seed(3)
    things, words = ["cat", "dog", "car"], ["sky", "wall"]
    maps = {name: torch.rand(4, 4, generator=rng) * 0.3 for name in things + words}
    maps["dog"][:1, :1] += 0.2  # a small class for the area rule
    config = InferenceConfig(mode="whole", short_side=32, long_side=32)
    model = OpenVocabularySegmenter(FixedScorer(maps), config, torch.device("cpu"))
    rule = Background(
        0, stuff_names=tuple(words), probability_threshold=prob_thd, logit_scale=logit_scale,
        area_threshold=area_thd,
    )  # fmt: skip
    result = model.segment(np.zeros((32, 32, 3), np.uint8), ["background", *things], rule)
    # SCLIP's layout: the background's names first (class 0), then the classes
    queries = torch.cat([result.scores[len(things) :], result.scores[: len(things)]])
    query_idx = [0] * len(words) + [1, 2, 3]
    expected = sclip_postprocess(queries, query_idx, logit_scale, prob_thd, area_thd)
    assert (torch.from_numpy(result.labels) == expected).all()
    assert len(np.unique(result.labels)) > 1


def test_tcl_threshold_ties_go_to_background() -> None:
    """TCL appends a constant background score and takes the argmax, background first."""
    maps = {"cat": torch.full((4, 4), 0.5), "dog": torch.full((4, 4), 0.25)}
    config = InferenceConfig(mode="whole", short_side=32, long_side=32)
    model = OpenVocabularySegmenter(FixedScorer(maps), config, torch.device("cpu"))
    image = np.zeros((32, 32, 3), np.uint8)
    assert (
        model.segment(image, ["background", "cat", "dog"], Background(0, threshold=0.5)).labels == 0
    ).all()
    assert (
        model.segment(image, ["background", "cat", "dog"], Background(0, threshold=0.49)).labels
        == 1
    ).all()


def test_module_and_encoder_must_agree(module_path: Path) -> None:
    module, _ = load_module(module_path)
    wrong_encoder = FakeEncoder(WORLD, class_dim=8, nuisance_dim=8)
    with pytest.raises(WeightsError, match="takes 32-d features, the encoder gives 16-d"):
        AlignmentScorer(wrong_encoder, module, VocabularyEncoder(FakeClip(WORLD)))
