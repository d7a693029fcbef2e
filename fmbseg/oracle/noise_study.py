"""Stage 2's loss under label noise, in the oracle world: ``python -m fmbseg.oracle.noise_study``.

Scenes are pseudo-labelled by Stage 1 with the fake CLIP and SAM, a share of the labelled
patches is then flipped to a random other class, and the alignment module is trained on the
fake encoder's features with each loss. Held-out patch accuracy (against the TRUE labels of
unseen scenes) is compared with the untrained module, i.e. nearest text embedding of the raw
features pushed through a random projection. It prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.align.features import IGNORE_PATCH, patch_labels, resize_nearest
from fmbseg.align.loss import get_loss
from fmbseg.align.module import AlignmentModule
from fmbseg.config import AutoMaskConfig, Params, PseudoLabelConfig
from fmbseg.io.images import read_rgb
from fmbseg.masks import IGNORE_LABEL
from fmbseg.models.vocabulary import VocabularyEncoder
from fmbseg.oracle.fakes import FakeClip, FakeEncoder, FakeSam
from fmbseg.oracle.scenes import UNKNOWN, OracleWorld, make_scene, write_scene_folder
from fmbseg.pseudolabel.dense import image_to_tensor
from fmbseg.pseudolabel.merge import label_map_path, read_label_map, run_merge
from fmbseg.pseudolabel.stage import Backends, run_pseudolabel

LOSS_NAMES = ("fmbseg", "cross_entropy", "supcon")
SIZE = 96  # encoder input side: 12 x 12 patches of 8


def _features(encoder: FakeEncoder, images: Sequence[np.ndarray]) -> torch.Tensor:
    batch = torch.cat(
        [
            F.interpolate(image_to_tensor(image), size=(SIZE, SIZE), mode="bilinear")
            for image in images
        ]
    )
    return encoder.encode(batch)  # (B, h, w, C)


def _patch_targets(label_maps: Sequence[np.ndarray], classes: int) -> torch.Tensor:
    grids = [patch_labels(resize_nearest(m, SIZE), 8, classes, 0.5) for m in label_maps]
    return torch.from_numpy(np.stack(grids)).long()


def flip_labels(labels: torch.Tensor, share: float, classes: int, seed: int) -> torch.Tensor:
    """Move ``share`` of the labelled patches to a uniformly chosen *other* class."""
    generator = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    labelled = torch.nonzero(labels.flatten() != IGNORE_PATCH).flatten()
    chosen = labelled[
        torch.randperm(len(labelled), generator=generator)[: round(share * len(labelled))]
    ]
    shift = torch.randint(1, classes, (len(chosen),), generator=generator)
    flat = noisy.view(-1)
    flat[chosen] = (flat[chosen] + shift) % classes
    return noisy


def train_module(
    features: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    loss: str,
    epochs: int,
    seed: int,
) -> AlignmentModule:
    """SGD + cosine annealing on batches of 5 images, as the training stage does."""
    torch.manual_seed(seed)
    module = AlignmentModule(features.shape[-1], text.shape[1], depth=1, heads=2)
    steps = epochs * -(-len(features) // 5)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loss_fn = get_loss(loss)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(features), generator=generator).split(5):
            z = module(features[batch]).reshape(-1, text.shape[1])
            value = loss_fn(z, labels[batch].reshape(-1), text, 0.1)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            scheduler.step()
    return module.eval()


@torch.no_grad()
def patch_accuracy(
    module: AlignmentModule, features: torch.Tensor, truth: torch.Tensor, text: torch.Tensor
) -> float:
    predicted = (module(features) @ text.T).argmax(-1)
    keep = truth != IGNORE_PATCH
    return float((predicted[keep] == truth[keep]).float().mean())


def run_study(
    noise_levels: Sequence[float] = (0.0, 0.2, 0.4),
    train_scenes: int = 40,
    test_scenes: int = 20,
    epochs: int = 15,
    seed: int = 0,
    signal: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Held-out patch accuracy per noise level: the untrained module and each loss.

    ``signal`` scales the fake encoder's class-specific dimensions against its nuisance ones:
    lower is a harder, less separable feature space.
    """
    world = OracleWorld()
    names = list(world.class_names)
    clip, encoder = FakeClip(world), FakeEncoder(world, signal=signal)
    text = VocabularyEncoder(clip).embed(names).float()
    params = Params(
        pseudolabel=PseudoLabelConfig(
            short_side=256, crop_stride=32, automask=AutoMaskConfig(points_per_side=16)
        )
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_scene_folder(
            world, train_scenes, root / "scenes", seed=seed, sizes=((96, 128), (128, 96))
        )
        run_pseudolabel(
            params, root / "scenes" / "images", names, root / "pl",
            backends=Backends(clip, FakeSam(world)), show_progress=False,
        )  # fmt: skip
        run_merge(params.merge, root / "pl", root / "merged")
        ids = sorted(path.stem for path in (root / "scenes" / "images").glob("*.png"))
        images = [read_rgb(root / "scenes" / "images" / f"{key}.png") for key in ids]
        pseudo = [
            read_label_map(label_map_path(root / "merged", key)).astype(np.int64) for key in ids
        ]
    train_features = _features(encoder, images)
    train_labels = _patch_targets(pseudo, len(names))
    rng = np.random.SeedSequence(seed + 1).generate_state(test_scenes)
    held_out = [make_scene(world, 96, 96, int(s)) for s in rng]
    test_features = _features(encoder, [scene.image for scene in held_out])
    truths = [np.where(s.labels == UNKNOWN, IGNORE_LABEL, s.labels) for s in held_out]
    test_labels = _patch_targets(truths, len(names))
    torch.manual_seed(seed)
    untrained = AlignmentModule(train_features.shape[-1], text.shape[1], depth=1, heads=2).eval()
    results: dict[str, dict[str, float]] = {}
    for level in noise_levels:
        noisy = flip_labels(train_labels, level, len(names), seed)
        row = {"untrained": patch_accuracy(untrained, test_features, test_labels, text)}
        for loss in LOSS_NAMES:
            module = train_module(train_features, noisy, text, loss, epochs, seed)
            row[loss] = patch_accuracy(module, test_features, test_labels, text)
        results[f"{level:.0%}"] = row
    return results


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    columns = ["untrained", *LOSS_NAMES]
    lines = [
        "| flipped patch labels | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for level, row in results.items():
        lines.append(f"| {level} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", type=float, default=1.0, help="fake encoder class signal")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(markdown_table(run_study(epochs=args.epochs, seed=args.seed, signal=args.signal)))


if __name__ == "__main__":
    main()
