"""Stage 2 end to end with each verified encoder family of the timm backend: DINOv3 (patch 16,
four register tokens, RoPE) and Perception Encoder spatial (patch 16, class token), tiny
random-init configurations of the real architectures (timm ``overrides``).

Stage 1's label maps come from the oracle run; the encoder is the only thing that changes:
``fmbseg cache-features``, ``train``, ``predict`` and ``evaluate`` must all follow its patch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmbseg.cli import main
from fmbseg.config import ModelsConfig
from fmbseg.models.registry import build_patch_encoder
from fmbseg.oracle.scenes import OracleWorld

TINY = {"depth": 1, "embed_dim": 48, "num_heads": 2}
FAMILIES = {
    # name: (patch, prefix tokens the encoder must drop)
    "vit_small_patch16_dinov3.lvd1689m": (16, 5),
    "vit_pe_spatial_small_patch16_512.fb": (16, 1),
}


def settings(model: str) -> list[str]:
    options = [
        "models.clip.backend=oracle",
        "models.sam.backend=oracle",
        f"models.encoder.model={model}",
        "models.encoder.allow_random_init=true",
        f"models.encoder.overrides={json.dumps(TINY)}",
        "features.image_size=64",
        "train.epochs=1",
        "train.heads=2",
        "inference.short_side=64",
        "inference.window=64",
        "inference.stride=32",
    ]
    return [part for option in options for part in ("-S", option)]


@pytest.mark.parametrize(("model", "expected"), FAMILIES.items())
def test_the_encoder_gives_its_patch_grid_without_prefix_tokens(
    model: str, expected: tuple[int, int]
) -> None:
    import torch

    encoder = build_patch_encoder(
        ModelsConfig.model_validate(
            {"encoder": {"model": model, "allow_random_init": True, "overrides": TINY}}
        )
    )
    patch, prefix = expected
    assert encoder.patch_size == patch and encoder.model.num_prefix_tokens == prefix
    assert encoder.provenance.is_random
    features = encoder.encode(torch.rand(2, 3, 3 * patch, 5 * patch))
    assert features.shape == (2, 3, 5, 48)


@pytest.mark.parametrize("model", FAMILIES)
def test_cache_train_predict_evaluate_follow_the_encoders_patch(
    model: str, oracle_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = tmp_path / "dataset"
    shutil.copytree(oracle_run.scenes / "images", dataset / "images" / "val")
    shutil.copytree(oracle_run.scenes / "labels", dataset / "masks" / "val")
    names = OracleWorld().class_names
    (dataset / "classes.txt").write_text("\n".join(names), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    images = str(oracle_run.scenes / "images")
    options = settings(model)

    assert main(["-q", "cache-features", *options, "--images", images, "--labels",
                 str(oracle_run.merged), "--out", "features"]) == 0  # fmt: skip
    index = json.loads((tmp_path / "features" / "index.json").read_text())
    assert json.dumps(index).count(model) >= 1  # the cache names the encoder it holds
    assert main(["-q", "train", *options, "--features", "features", "--out", "model"]) == 0
    assert main(["-q", "predict", *options, images, "--classes", ",".join(names),
                 "--model", "model", "--out", "predictions"]) == 0  # fmt: skip
    first = sorted((oracle_run.scenes / "images").iterdir())[0]
    labels = np.asarray(Image.open(next((tmp_path / "predictions").rglob(f"{first.stem}*.png"))))
    assert labels.shape[:2] == Image.open(first).size[::-1]
    assert main(["-q", "evaluate", *options, "--dataset", "dataset", "--split", "val",
                 "--model", "model", "--out", "eval"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["images"] == 16
