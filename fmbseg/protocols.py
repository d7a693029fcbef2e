"""Evaluation protocols: how a benchmark's images are resized, windowed, prompted and how its
background is decided, as the reference configurations do it (docs/method.md, "Reference
fidelity").

``tcl``: TCL's mmseg 0.x configs (github.com/khanrc/tcl, ``segmentation/configs/_base_/
datasets/*.py``), which the paper follows: ``img_scale=(2048, 448)`` keep-ratio, 448 windows,
stride 224, for every set. These are the defaults of ``inference.*``, which this protocol reads
as they are. Background: TCL adds a constant background score (``bg_thresh: 0.4`` in
``configs/eval.yml``) on TCL's own mask scores for the sets whose first class is background;
that value does not carry over to cosine scores, so here the background rule is
``inference.background`` for every set with a background class: the paper's PV-21 rule
(COCO-Stuff's 91 stuff names, ``stuff``) or a cosine threshold (``threshold``).

``sclip``: SCLIP's mmseg 1.x configs (github.com/wangf3014/SCLIP, ``configs/cfg_*.py``), which
most peers after 2024 report under: short side 336 (COCO-Stuff 448, Cityscapes 560), 224
windows, stride 112, OpenAI's 80 ImageNet templates, and on the three sets with background a
probability threshold (``prob_thd``) on ``softmax(logit_scale * cosine)``, background being
the best of its names (V21 and COCO-Object: a list of 26 background words; PC-60: the word
"background"); V21 also drops classes under ``area_thd``. A dataset that is not one of the
eight but has the classes of one of them (the quickstart's ``demo_voc``: VOC's 21) takes that
one's settings; any other takes SCLIP's base settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fmbseg.config import InferenceConfig
from fmbseg.datasets.registry import DatasetSpec, coco_stuff_stuff_names, get_dataset_spec
from fmbseg.errors import InputError
from fmbseg.segmenter import Background

# SCLIP configs/cls_voc21.txt and cls_coco_object.txt, first line: the names of background.
SCLIP_BACKGROUND_WORDS = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk",
    "bed", "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf",
    "curtain", "stair", "floor", "hill", "rail", "fence",
)  # fmt: skip


@dataclass(frozen=True)
class SclipDataset:
    """One SCLIP config file: its ``Resize`` short side and model settings."""

    config: str
    short_side: int = 336
    logit_scale: float = 40.0  # CLIPForSegmentation's default
    prob_thd: float | None = None
    area_thd: float | None = None
    background_names: tuple[str, ...] = ()


SCLIP_WINDOW, SCLIP_STRIDE, SCLIP_LONG_SIDE = 224, 112, 2048
SCLIP_DATASETS: dict[str, SclipDataset] = {
    "voc21": SclipDataset(
        "cfg_voc21.py",
        logit_scale=65.0,
        prob_thd=0.1,
        area_thd=0.1,
        background_names=SCLIP_BACKGROUND_WORDS,
    ),
    "context60": SclipDataset(
        "cfg_context60.py", logit_scale=50.0, prob_thd=0.1, background_names=("background",)
    ),
    "coco_object": SclipDataset(
        "cfg_coco_object.py",
        logit_scale=50.0,
        prob_thd=0.1,
        background_names=SCLIP_BACKGROUND_WORDS,
    ),
    "voc20": SclipDataset("cfg_voc20.py"),
    "context59": SclipDataset("cfg_context59.py"),
    "coco_stuff": SclipDataset("cfg_coco_stuff164k.py", short_side=448),
    "cityscapes": SclipDataset("cfg_city_scapes.py", short_side=560),
    "ade20k": SclipDataset("cfg_ade20k.py"),
}
SCLIP_BASE = SclipDataset("base_config.py")


def openai_imagenet_templates() -> tuple[str, ...]:
    """OpenAI's 80 ImageNet prompt templates (SCLIP's ``prompts/imagenet_template.py`` holds the
    same 80, in the same order), as ``{}`` format strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


@dataclass(frozen=True)
class Protocol:
    """What evaluating one dataset uses: the inference settings and the background rule."""

    name: str
    inference: InferenceConfig
    background: Background | None
    reference: str  # the reference configuration these settings come from

    def record(self) -> dict[str, Any]:
        """What metrics.json and MLflow say about how the numbers were made."""
        config = self.inference
        return {
            "protocol": self.name,
            "protocol_reference": self.reference,
            "background_rule": "none" if self.background is None else self.background.rule,
            "resize": (
                f"squashed to {config.square_side}x{config.square_side}"
                if config.mode == "whole" and config.square_side is not None
                else f"keep-ratio short {config.short_side} / long {config.long_side}"
            ),
            "windows": (
                "whole image"
                if config.mode == "whole"
                else f"{config.window} stride {config.stride}, averaged per {config.aggregate[:-1]}"
            ),
            "templates": len(config.templates),
        }


def configured_background(inference: InferenceConfig, index: int) -> Background:
    """``inference.background``'s rule for the class at ``index``: the paper's PV-21 rule
    (COCO-Stuff's stuff names count as background) or a score threshold."""
    if inference.background == "stuff":
        return Background(
            index, stuff_names=coco_stuff_stuff_names(), rule="stuff_names:coco_stuff_91"
        )
    threshold = inference.background_threshold
    return Background(index, threshold=threshold, rule=f"score_threshold:{threshold}")


def background_rule(
    inference: InferenceConfig, names: Sequence[str], background: str | None
) -> Background | None:
    """How the class named ``background`` is predicted (``fmbseg predict --background``, a
    served request's ``background``), or None when no class stands for background."""
    if background is None:
        return None
    if background not in names:
        raise InputError(f"background class {background!r} is not one of the classes {names}")
    return configured_background(inference, list(names).index(background))


def _sclip_settings(spec: DatasetSpec) -> SclipDataset:
    if spec.name in SCLIP_DATASETS:
        return SCLIP_DATASETS[spec.name]
    for name, settings in SCLIP_DATASETS.items():
        if get_dataset_spec(name).class_names == spec.class_names:
            return settings
    return SCLIP_BASE


def resolve_protocol(inference: InferenceConfig, spec: DatasetSpec) -> Protocol:
    """The settings ``inference.protocol`` gives dataset ``spec``."""
    index = spec.background_index
    if inference.protocol == "tcl":
        background = None if index is None else configured_background(inference, index)
        reference = "khanrc/tcl segmentation/configs/_base_/datasets (mmseg 0.x)"
        return Protocol("tcl", inference, background, reference)

    settings = _sclip_settings(spec)
    resolved = inference.model_copy(
        update={
            "short_side": settings.short_side,
            "long_side": SCLIP_LONG_SIDE,
            "window": SCLIP_WINDOW,
            "stride": SCLIP_STRIDE,
            "templates": openai_imagenet_templates(),
        }
    )
    background = None
    if index is not None:
        names = settings.background_names or (spec.class_names[index],)
        rule = f"sclip_probability:{settings.prob_thd or 0.0}@scale{settings.logit_scale:g}"
        if settings.area_thd is not None:
            rule += f",area:{settings.area_thd}"
        background = Background(
            index,
            stuff_names=names,
            probability_threshold=settings.prob_thd or 0.0,
            logit_scale=settings.logit_scale,
            area_threshold=settings.area_thd,
            rule=rule,
        )
    return Protocol("sclip", resolved, background, f"wangf3014/SCLIP configs/{settings.config}")
