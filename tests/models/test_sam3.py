"""The ``transformers`` SAM 3 backend on a tiny random-init configuration of the real
architecture (``Sam3Model``: ViT with RoPE and windowed attention, FPN, CLIP text encoder, DETR
encoder/decoder with presence token, mask decoder), widths 32, one or two layers each.

The reference is transformers' own inference call, one class prompt at a time:
``Sam3Processor(images=..., text=...)`` -> ``Sam3Model(**inputs)`` ->
``post_process_instance_segmentation``. Weights are random: no test judges what a mask means.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.config import ModelsConfig
from fmbseg.errors import ConfigError, WeightsError
from fmbseg.models.base import TextPromptedSegmenter
from fmbseg.models.registry import build_text_prompted_segmenter
from fmbseg.models.sam3 import TINY_SAM3

pytest.importorskip("transformers.models.sam3", reason="transformers without SAM 3")

PROMPTS = ["cat", "traffic light", "sky", "café terrace", "dog"]
MASK = 0.5


def models(weights_dir: Path | None = None, **sam3: object) -> ModelsConfig:
    section = {"overrides": TINY_SAM3, "allow_random_init": True, **sam3}
    return ModelsConfig.model_validate(
        {"sam3": section, "weights_dir": str(weights_dir) if weights_dir else None}
    )


def make_image() -> np.ndarray:
    image = np.full((90, 130, 3), 80, np.uint8)  # not square, not the model's side
    image[10:60, 15:70] = (210, 40, 40)
    image[40:85, 80:125] = (30, 190, 70)
    return image


IMAGE = make_image()


@pytest.fixture(scope="module")
def sam3():
    return build_text_prompted_segmenter(models())


@pytest.fixture(scope="module")
def threshold(sam3) -> float:
    """The median of the tiny model's instance scores (random weights score them all near
    0.25), so the score threshold keeps some instances and rejects others."""
    everything = sam3.segment_prompts(sam3.embed_image(IMAGE), PROMPTS, 0.0, MASK)
    return float(np.median([d.score for d in everything]))


def upstream(sam3, prompt: str, threshold: float) -> dict:
    """transformers' own one-prompt inference on the same model and processor."""
    inputs = sam3.processor(images=IMAGE, text=prompt, return_tensors="pt")
    with torch.no_grad():
        outputs = sam3.model(**inputs)
    (result,) = sam3.processor.post_process_instance_segmentation(
        outputs, threshold=threshold, mask_threshold=MASK, target_sizes=[IMAGE.shape[:2]]
    )
    return {"scores": result["scores"], "masks": result["masks"].bool().numpy()}


def test_batched_prompts_equal_transformers_one_prompt_inference(sam3, threshold) -> None:
    assert isinstance(sam3, TextPromptedSegmenter) and sam3.provenance.is_random
    detections = sam3.segment_prompts(sam3.embed_image(IMAGE), PROMPTS, threshold, MASK)
    compared = 0
    for index, prompt in enumerate(PROMPTS):
        reference = upstream(sam3, prompt, threshold)
        ours = [d for d in detections if d.prompt == index]
        kept = [i for i, mask in enumerate(reference["masks"]) if mask.any()]
        assert len(ours) == len(kept), prompt
        for detection, i in zip(ours, kept, strict=True):
            assert detection.mask.shape == IMAGE.shape[:2]
            assert np.array_equal(detection.mask, reference["masks"][i])
            assert detection.score == pytest.approx(float(reference["scores"][i]), abs=1e-5)
            assert 0.0 < detection.presence < 1.0
        compared += len(ours)
    assert compared >= 3, "the tiny model should detect some instances"
    assert len(detections) < len(PROMPTS) * 8, "and the threshold should reject others"


def test_prompt_batches_do_not_change_detections(sam3, threshold) -> None:
    embedding = sam3.embed_image(IMAGE)
    together = sam3.segment_prompts(embedding, PROMPTS, threshold, MASK)
    sam3.prompt_batch = 2
    try:
        in_pairs = sam3.segment_prompts(embedding, PROMPTS, threshold, MASK)
    finally:
        sam3.prompt_batch = 16
    assert [d.prompt for d in together] == [d.prompt for d in in_pairs]
    for a, b in zip(together, in_pairs, strict=True):
        assert np.array_equal(a.mask, b.mask) and a.score == pytest.approx(b.score, abs=1e-6)


def test_the_image_is_encoded_once_for_all_prompts(sam3) -> None:
    calls: list[int] = []
    hook = sam3.model.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        sam3.segment_prompts(sam3.embed_image(IMAGE), PROMPTS * 4, 0.0, MASK)
    finally:
        hook.remove()
    assert calls == [1]


def test_a_saved_model_folder_loads_back_with_its_hash(sam3, tmp_path: Path) -> None:
    folder = tmp_path / "sam3"
    sam3.model.save_pretrained(folder)
    sam3.processor.save_pretrained(folder)
    loaded = build_text_prompted_segmenter(models(checkpoint=str(folder), allow_random_init=False))
    assert loaded.provenance.source == "file" and loaded.provenance.tag.startswith("sha256:")
    embedding = sam3.embed_image(IMAGE)
    expected = sam3.segment_prompts(embedding, PROMPTS, 0.0, MASK)
    got = loaded.segment_prompts(loaded.embed_image(IMAGE), PROMPTS, 0.0, MASK)
    assert [d.score for d in got] == pytest.approx([d.score for d in expected], abs=1e-6)

    weights = tmp_path / "weights"
    (weights / "sam3").mkdir(parents=True)
    folder.rename(weights / "sam3" / "sam3")
    from_dir = build_text_prompted_segmenter(models(weights, allow_random_init=False))
    assert from_dir.provenance.source == "weights_dir"


def test_without_weights_the_error_says_the_model_is_gated_and_how_to_get_access(
    tmp_path: Path,
) -> None:
    with pytest.raises(WeightsError) as error:
        build_text_prompted_segmenter(models(tmp_path, allow_random_init=False))
    message = str(error.value)
    assert "\n" not in message and "no weights for sam3 facebook/sam3" in message
    assert (
        "facebook/sam3 is gated: request access at https://huggingface.co/facebook/sam3" in message
    )
    assert "hf auth login" in message and "models.sam3.allow_random_init=true" in message


def test_an_override_that_is_not_a_sam3_config_is_a_config_error() -> None:
    bad = json.loads(json.dumps(TINY_SAM3))
    bad["vision_config"]["backbone_config"]["model_type"] = "no_such_model"
    with pytest.raises(ConfigError, match="models.sam3.overrides"):
        build_text_prompted_segmenter(models(overrides=bad))
