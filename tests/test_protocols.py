"""The evaluation protocols give each benchmark the settings of its reference configuration."""

from __future__ import annotations

import dataclasses

import pytest

from fmbseg.config import InferenceConfig
from fmbseg.datasets.registry import get_dataset_spec
from fmbseg.protocols import SCLIP_BACKGROUND_WORDS, openai_imagenet_templates, resolve_protocol

# SCLIP configs/cfg_*.py, read by hand: Resize short side, logit_scale, prob_thd, area_thd
SCLIP_CONFIGS = {
    "voc21": (336, 65.0, 0.1, 0.1),
    "context60": (336, 50.0, 0.1, None),
    "coco_object": (336, 50.0, 0.1, None),
    "voc20": (336, None, None, None),
    "context59": (336, None, None, None),
    "coco_stuff": (448, None, None, None),
    "cityscapes": (560, None, None, None),
    "ade20k": (336, None, None, None),
}


@pytest.mark.parametrize("name", sorted(SCLIP_CONFIGS))
def test_sclip_settings_per_dataset(name: str) -> None:
    short, scale, prob_thd, area_thd = SCLIP_CONFIGS[name]
    protocol = resolve_protocol(InferenceConfig(protocol="sclip"), get_dataset_spec(name))
    config = protocol.inference
    assert (config.short_side, config.long_side, config.window, config.stride) == (
        short, 2048, 224, 112,
    )  # fmt: skip
    assert len(config.templates) == 80
    if prob_thd is None:
        assert protocol.background is None
    else:
        background = protocol.background
        assert background is not None and background.index == 0
        assert (background.logit_scale, background.probability_threshold) == (scale, prob_thd)
        assert background.area_threshold == area_thd
        words = ("background",) if name == "context60" else SCLIP_BACKGROUND_WORDS
        assert background.stuff_names == words
    assert protocol.record()["protocol"] == "sclip"


def test_the_80_openai_imagenet_templates() -> None:
    templates = openai_imagenet_templates()
    assert len(templates) == len(set(templates)) == 80
    assert (templates[0], templates[-1]) == ("a bad photo of a {}.", "a tattoo of the {}.")


def test_a_folder_with_a_benchmarks_classes_takes_its_settings_others_the_base_ones() -> None:
    voc = dataclasses.replace(get_dataset_spec("voc21"), name="demo_voc")
    assert resolve_protocol(InferenceConfig(protocol="sclip"), voc).reference.endswith(
        "cfg_voc21.py"
    )
    own = dataclasses.replace(voc, name="mine", class_names=("background", "cat", "dog"))
    protocol = resolve_protocol(InferenceConfig(protocol="sclip"), own)
    assert protocol.reference.endswith("base_config.py")
    assert protocol.background is not None and protocol.background.stuff_names == ("background",)
    assert protocol.background.probability_threshold == 0.0  # never: SCLIP's default prob_thd


def test_tcl_reads_the_inference_keys_and_names_its_background_rule() -> None:
    config = InferenceConfig(short_side=224, window=224, stride=112)
    co80 = resolve_protocol(config, get_dataset_spec("coco_object"))
    assert co80.inference == config
    assert co80.background is not None and len(co80.background.stuff_names) == 91
    assert co80.record()["background_rule"] == "stuff_names:coco_stuff_91"
    threshold = config.model_copy(update={"background": "threshold"})
    pv21 = resolve_protocol(threshold, get_dataset_spec("voc21"))
    assert pv21.record()["background_rule"] == "score_threshold:0.2"
    assert resolve_protocol(config, get_dataset_spec("ade20k")).background is None
