"""Typed, frozen configuration built from ``params.yaml`` sections.

Resolution order (as in DINOv2): class defaults <- params file <- ``key.path=value`` overrides.
Validation is strict: an unknown key or a value of the wrong type is a :class:`ConfigError`
naming the file and the dotted key. The library takes these objects; only entry points read
files, and every stage saves the resolved configuration next to its outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fmbseg.errors import ConfigError
from fmbseg.io.atomic import write_text_atomic

Precision = Literal["fp32", "fp16", "bf16"]


class FrozenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClipConfig(FrozenConfig):
    """The vision-language model that detects classes and gives dense patch embeddings."""

    backend: str = "open_clip"
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    checkpoint: str | None = None
    allow_random_init: bool = False
    # Dense patch embeddings: a preset equal to its published last block (docs/method.md), and
    # switches that override the preset's residual and MLP ("auto": the preset's own choice).
    dense_attention: Literal["maskclip", "sclip", "clearclip", "naclip", "pixelclip"] = "clearclip"
    dense_residual: Literal["auto", "none", "input", "cls"] = "auto"
    dense_mlp: Literal["auto"] | bool = "auto"
    # NACLIP's neighbourhood: std of the Gaussian over patch distances, in patches.
    dense_neighbourhood_std: Annotated[float, Field(gt=0.0)] = 5.0
    batch_size: int = 16


class SamConfig(FrozenConfig):
    """The promptable segmenter that turns points into masks and proposes masks."""

    backend: str = "segment_anything"
    variant: str = "vit_b"
    checkpoint: str | None = None
    allow_random_init: bool = False
    points_per_batch: int = 64


class EncoderConfig(FrozenConfig):
    """The frozen self-supervised patch encoder that Stage 2 aligns to text."""

    backend: str = "timm"
    model: str = "vit_small_patch14_dinov2.lvd142m"
    checkpoint: str | None = None
    allow_random_init: bool = False
    # Architecture keyword arguments passed to timm (e.g. a tiny depth for tests).
    overrides: dict[str, int | float | bool | str] = {}
    batch_size: int = 8


class AutoMaskConfig(FrozenConfig):
    """SAM automatic mask generation on one grid over the whole image (route 1.2)."""

    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    # Area bounds as fractions of the image area, so they hold at any resolution.
    min_area_fraction: float = 0.0
    max_area_fraction: float = 1.0


class TextConfig(FrozenConfig):
    """The text space Stage 2 maps class names into. ``clip`` (default): the text tower of
    ``models.clip``; other backends read the keys below."""

    backend: str = "clip"
    model: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None
    allow_random_init: bool = False
    batch_size: int = 64


class Sam3ModelConfig(FrozenConfig):
    """SAM 3, the text-prompted segmenter of Stage 1's ``sam3`` route (fmbseg/models/sam3.py)."""

    backend: str = "transformers"
    model: str = "facebook/sam3"  # a Hugging Face id (gated) or a local model folder
    checkpoint: str | None = None
    allow_random_init: bool = False
    # Sam3Config arguments for a random-init architecture (e.g. the tests' tiny one).
    overrides: dict[str, Any] = {}
    prompt_batch: Annotated[int, Field(ge=1)] = 16  # class prompts per forward on one embedding


class ModelsConfig(FrozenConfig):
    clip: ClipConfig = ClipConfig()
    text: TextConfig = TextConfig()
    sam: SamConfig = SamConfig()
    sam3: Sam3ModelConfig = Sam3ModelConfig()
    encoder: EncoderConfig = EncoderConfig()
    # Searched (with $FMBSEG_WEIGHTS_DIR) before any download; one sub-folder per role.
    weights_dir: str | None = "weights"
    device: str = "cpu"
    precision: Precision = "fp32"


class TextPromptedRouteConfig(FrozenConfig):
    """Route ``sam3``: SAM 3 segments the candidate classes from their names."""

    # "all": every vocabulary class is prompted; "clip_votes": those CLIP's crop votes found.
    candidates: Literal["all", "clip_votes"] = "clip_votes"
    # Which classes routes 1.1/1.2 treat as present: CLIP's vote, or the classes SAM 3 found.
    present_from: Literal["clip", "sam3"] = "clip"
    score_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # query score x presence
    mask_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # on the mask's sigmoid


class PseudoLabelConfig(FrozenConfig):
    """Stage 1 (routes 1.1, 1.2 and the text-prompted sam3) for one dataset split."""

    # Prompt templates, averaged per class; the paper uses one.
    templates: tuple[str, ...] = ("a photo of a {}.",)
    # The image is resized so its short side is this many pixels (then to whole CLIP patches)
    # and cut into CLIP-sized crops every ``crop_stride`` pixels (a multiple of the patch size).
    short_side: int = 448
    crop_stride: int = 112
    min_crops: int = 1
    points_per_class: int = 5
    routes: tuple[Literal["1.1", "1.2", "sam3"], ...] = ("1.1", "1.2")
    sam3: TextPromptedRouteConfig = TextPromptedRouteConfig()
    automask: AutoMaskConfig = AutoMaskConfig()
    images_per_shard: int = 64
    # The stage fails at the end when more than this fraction of images could not be read.
    max_failed_fraction: float = 0.05
    max_image_pixels: int = 50_000_000


class MasksConfig(FrozenConfig):
    """Class-agnostic masks for methods that train on them (PixelCLIP): SAM's automatic masks
    on every image (``pseudolabel.automask``; route 1.2's are reused where they exist) or
    k-means clusters of the frozen encoder's patch tokens (``dino``)."""

    source: Literal["sam", "dino"] = "sam"
    # sam: this stage's own automatic-mask filters (0 turns one off, as in SAM); None keeps
    # pseudolabel.automask's, and only then can route 1.2's masks be reused.
    pred_iou_thresh: float | None = None
    stability_score_thresh: float | None = None
    kmeans_clusters: Annotated[int, Field(ge=1)] = 16
    # Encoder input side (a multiple of its patch): 560 gives DINOv2/14 the 40x40 tokens that
    # PixelCLIP's DINO ViT-S/16 has at 640.
    kmeans_image_size: Annotated[int, Field(gt=0)] = 560
    kmeans_iterations: Annotated[int, Field(ge=1)] = 100
    kmeans_tolerance: Annotated[float, Field(ge=0.0)] = 1e-4
    seed: int = 0
    images_per_shard: Annotated[int, Field(ge=1)] = 64


class MergeConfig(FrozenConfig):
    """Subsampling of route 1.2 and merging with route 1.1 into label maps."""

    route_12_fraction: float = 0.2
    sam3_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0  # route sam3's kept share
    # Where masks overlap, a route earlier in this order wins.
    priority: tuple[Literal["1.1", "1.2", "sam3"], ...] = ("1.1", "sam3", "1.2")
    seed: int = 0


class FeaturesConfig(FrozenConfig):
    """Stage 2's cache of frozen-encoder patch features and patch pseudo-labels."""

    # A multiple of the encoder's patch size. "tiles": images are rescaled, aspect kept, to this
    # short side and cut into tiles of this size, as inference sees them; "square": each image
    # is resized to one square of this side (its aspect distorted; caches from before).
    image_size: int = 448
    geometry: Literal["tiles", "square"] = "tiles"
    # A patch takes its majority pseudo-label if that label covers at least this fraction
    # of the patch's pixels; otherwise it is ignored by the loss.
    min_label_fraction: float = 0.5
    images_per_shard: int = 256
    # Also store each label map nearest-resized to this square side (0: not stored); Fusioner
    # trains on them at its decoder's resolution (8x the patch grid).
    label_map_size: Annotated[int, Field(ge=0)] = 0


class FusionerConfig(FrozenConfig):
    """Fusioner (Ma et al., BMVC 2022; docs/fusioner.md): frozen visual and text tokens fused by
    one transformer, a conv decoder, per-pixel sigmoid per class. Defaults are the paper's."""

    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    decoder_upsamples: Annotated[int, Field(ge=0)] = 3  # x2 each: 16x16 patches -> 128x128
    temperature: float = 0.07
    # "class": one (image, present class) pair per episode, the paper's; "image": every
    # vocabulary class of an image as text tokens of one forward (as joint inference).
    episode: Literal["class", "image"] = "class"
    batch_size: int = 32
    epochs: int = 510
    warmup_epochs: int = 10
    lr: float = 1e-3  # fusion (AdamW): linear warm-up, then cosine to min_lr, per step
    min_lr: float = 2e-6
    weight_decay: float = 0.01  # fusion weight matrices: cosine to weight_decay_end
    weight_decay_end: float = 0.4
    decoder_lr: float = 1e-3  # decoder (Adam): constant, no weight decay
    seed: int = 0
    # Zero-shot protocols: these classes never become training targets (their pixels stay
    # negatives of the other classes); "pascal5i:<fold>" / "coco20i:<fold>" adds a fold's novel
    # classes.
    exclude_classes: tuple[str, ...] = ()
    holdout: str | None = None


class PixelClipConfig(FrozenConfig):
    """PixelCLIP (Shin et al., NeurIPS 2024; docs/pixelclip.md): CLIP's image tower fine-tuned on
    class-agnostic masks clustered online onto learnable class prompts. Defaults are the
    official code's (ViT-B/16 config)."""

    clusters: Annotated[int, Field(ge=2)] = 64  # k learnable classes
    prompt_length: Annotated[int, Field(ge=1)] = 4  # learnable token vectors per class
    # "{}" stands for the class's prompt_length learnable tokens.
    prompt_template: str = "A photo of a {} in the scene"
    epsilon: Annotated[float, Field(gt=0.0)] = 100.0  # clustering logits: epsilon * cosine
    sinkhorn_iterations: Annotated[int, Field(ge=1)] = 3
    momentum: Annotated[float, Field(ge=0.0, le=1.0)] = 0.999  # EMA teacher
    # What of the image tower trains: "attention" (every attn weight + the positional
    # embedding, the ViT config) or "full".
    finetune: Literal["attention", "full"] = "attention"
    dense_attention: Literal["maskclip", "sclip", "clearclip", "naclip", "pixelclip"] = "pixelclip"
    # Weak view: short side resized (long side capped), a random square crop; both views are
    # resized to image_size for the towers; teacher features and masks meet at mask_size.
    short_side: Annotated[int, Field(gt=0)] = 1024
    max_side: Annotated[int, Field(gt=0)] = 1333
    crop_size: Annotated[int, Field(gt=0)] = 640
    image_size: Annotated[int, Field(gt=0)] = 320
    mask_size: Annotated[int, Field(gt=0)] = 256
    # Images per optimiser step, clustered together; split into accumulation_steps micro-batches.
    batch_size: Annotated[int, Field(ge=1)] = 48
    accumulation_steps: Annotated[int, Field(ge=1)] = 1
    steps: Annotated[int, Field(ge=1)] = 10_000
    lr: Annotated[float, Field(gt=0.0)] = 2e-4  # AdamW; cosine from lr to lr * lr_end_factor
    lr_end_factor: Annotated[float, Field(ge=0.0)] = 0.5
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4  # GroupNorm: 0
    encoder_lr_factor: Annotated[float, Field(ge=0.0)] = 0.01
    prompt_lr_factor: Annotated[float, Field(ge=0.0)] = 10.0
    head_lr_factor: Annotated[float, Field(ge=0.0)] = 1.0
    grad_clip: Annotated[float, Field(gt=0.0)] = 0.01  # whole-model gradient norm
    checkpoint_every: Annotated[int, Field(ge=1)] = 500  # steps
    seed: int = 0
    # Inference: patch features bilinearly upsampled to this square grid before L2 and cosine
    # (PixelCLIP's 64); 0 scores at the patch grid.
    score_size: Annotated[int, Field(ge=0)] = 64


class TrainConfig(FrozenConfig):
    """Stage 2's alignment module and its training."""

    loss: Literal["fmbseg", "cross_entropy", "supcon"] = "fmbseg"
    temperature: float = 0.1
    epochs: int = 10
    batch_size: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    depth: int = 1
    heads: int = 8
    mlp_ratio: float = 4.0
    # Start from a trained module (per-dataset fine-tuning, as in the paper's appendix).
    init_from: str | None = None
    # The Stage 2 method (fmbseg.methods): "fmbseg" is the paper's alignment module, trained
    # with the keys above; other methods read their own block below.
    method: str = "fmbseg"
    fusioner: FusionerConfig = FusionerConfig()
    pixelclip: PixelClipConfig = PixelClipConfig()


class InferenceConfig(FrozenConfig):
    """Open-vocabulary segmentation of one image; defaults follow TCL's protocol."""

    # Evaluation protocol (fmbseg/protocols.py): "tcl" uses the keys below (their defaults are
    # TCL's mmseg configs); "sclip" takes resize, windows, templates and background per dataset
    # from SCLIP's configs instead. Recorded in metrics.json and MLflow.
    protocol: Literal["tcl", "sclip"] = "tcl"
    mode: Literal["sliding", "whole"] = "sliding"
    # Whole mode only: resize the image to this square instead (aspect ratio not kept), as
    # PixelCLIP evaluates (320 for ViT-B/16); None keeps the keep-ratio rescale below.
    square_side: Annotated[int, Field(gt=0)] | None = None
    # Keep-ratio rescale as mmseg's img_scale=(long_side, short_side): the scale is
    # min(long_side / long, short_side / short), each side int(side * scale + 0.5).
    short_side: Annotated[int, Field(gt=0)] = 448
    long_side: Annotated[int, Field(gt=0)] = 2048
    window: Annotated[int, Field(gt=0)] = 448
    stride: Annotated[int, Field(gt=0)] = 224
    # Where window scores are averaged: "pixels" (the protocols' per-pixel averaging) or
    # "patches" (faster: at patch resolution, upsampled once; the image is rounded to patches).
    aggregate: Literal["pixels", "patches"] = "pixels"
    templates: tuple[str, ...] = ("a photo of a {}.",)
    # How a dataset's background class is predicted: the paper's PV-21 rule (COCO-Stuff's
    # stuff names join the vocabulary and count as background) or a score threshold.
    background: Literal["stuff", "threshold"] = "stuff"
    background_threshold: float = 0.2
    # Fusioner: all classes as text tokens of one forward per window ("joint"), or one forward
    # per class ("per_class", the paper's 1-way protocol; scores may differ, text tokens attend
    # to each other).
    class_queries: Literal["joint", "per_class"] = "joint"


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ManifestGateConfig(FrozenConfig):
    """Bounds on the image table a dataset split is pseudo-labelled from."""

    splits: tuple[str, ...] = ("train", "val", "test")
    # Smaller images are thumbnails or broken files rather than scenes to segment.
    min_width: int = 32
    min_height: int = 32
    max_pixels: int = 50_000_000
    # Undecodable files are skipped by the stages; more than this share means a broken copy.
    max_undecodable_fraction: Fraction = 0.01


class PseudoLabelGateConfig(FrozenConfig):
    """Bounds on Stage 1's pseudo-label run and its merged label maps."""

    max_failed_fraction: Fraction = 0.05
    # A mask must cover more than the minimum and at most the maximum share of its image.
    min_mask_area_fraction: Fraction = 0.0
    max_mask_area_fraction: Fraction = 1.0
    # SAM's predicted IoU is an unclamped regression: good masks may score slightly above 1.
    min_score: float = 0.0
    max_score: float = 1.1
    # Merged maps labelling less than this on average give Stage 2 too little to learn from.
    min_mean_labelled_fraction: Fraction = 0.1


class FeatureGateConfig(FrozenConfig):
    """Bounds on Stage 2's feature cache (its grid and dimension are checked against index.json)."""

    min_labelled_patch_fraction: Fraction = 0.05


class GatesConfig(FrozenConfig):
    manifest: ManifestGateConfig = ManifestGateConfig()
    pseudolabels: PseudoLabelGateConfig = PseudoLabelGateConfig()
    features: FeatureGateConfig = FeatureGateConfig()
    # Offending rows (and values) listed per expectation in a report.
    max_listed: int = Field(default=20, ge=1)


class DataConfig(FrozenConfig):
    """Which datasets the pipeline downloads, trains on and evaluates on (``dvc.yaml`` builds
    its paths from these: ``<train>/images/<train_split>``, ``<root>/<evaluate name>/``)."""

    root: str = "data"
    # Registered training sets the download stage fetches into ``root`` (never a user's folder:
    # a stage's output is replaced from DVC's cache, files added to it included).
    download: tuple[str, ...] = ("demo_train",)
    # The training folder, a DVC dependency: ``images/<train_split>/`` and a ``classes.txt``
    # (one class name per line), e.g. ``data/demo_train`` or a folder of your own.
    train: str = "data/demo_train"
    # Class names to pseudo-label with; None reads ``<train>/classes.txt``.
    vocabulary: tuple[str, ...] | None = None
    train_split: str = "train"
    evaluate: tuple[str, ...] = ("demo_voc",)
    evaluate_split: str = "val"


class Params(FrozenConfig):
    """Everything ``params.yaml`` may hold; each stage reads its own sections."""

    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    pseudolabel: PseudoLabelConfig = PseudoLabelConfig()
    merge: MergeConfig = MergeConfig()
    masks: MasksConfig = MasksConfig()
    features: FeaturesConfig = FeaturesConfig()
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()
    gates: GatesConfig = GatesConfig()


C = TypeVar("C", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar or flow value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    merged = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def _describe(error: Mapping[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key"
    got = error.get("input")
    return f"{location}: {error['msg']} (got {got!r})"


def validate(model: type[C], data: Mapping[str, Any], source: str) -> C:
    """Build ``model`` from plain data, strictly, with a one-line error on the first problem."""
    try:
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {_describe(errors[0])}{more}") from None
    except TypeError as exc:
        raise ConfigError(f"{source}: values must be plain YAML data ({exc})") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: params file not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{file}:{where} not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_params(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """Defaults <- ``path`` (if given) <- overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    return validate(Params, data, source)


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved configuration beside a stage's outputs (atomically)."""
    write_text_atomic(path, to_yaml(config))
