"""Fusioner training on Stage 1's pseudo-labels, from the feature cache (annotation-free).

Episodes (``train.fusioner.episode``): ``class`` -- the spec's: one (image, class present in its
label map) pair, one text token, target = (label == class), every other labelled pixel a
negative; ``image`` -- one image with every trainable vocabulary class as text tokens. Pixels
Stage 1 left unlabelled are in no loss term. Classes of ``exclude_classes`` and of the
``holdout`` fold are never a text token nor a target; their pixels stay negatives of the others.

Optimisers (the spec's): the fusion module with AdamW, learning rate linear from 0 over the
warm-up epochs then cosine to ``min_lr``, weight decay cosine from ``weight_decay`` to
``weight_decay_end`` on weight matrices (0 on biases and 1-D parameters), both per step; the
decoder with Adam at a constant ``decoder_lr``. Both are pure functions of the step, so a
checkpoint needs no scheduler state.

Output folder: the files of :mod:`fmbseg.align.train` (``run.json``, ``text_embeddings``,
``checkpoints/``, ``loss.csv``/``loss.png``, ``metrics.json``), the trained model as
``module.safetensors`` + ``module.json`` (see :mod:`fmbseg.fusioner.module`) and ``model.json``
naming method ``fusioner``, written last.

Exact resume: randomness is the seeded initialisation and each epoch's episode order, drawn from
a generator seeded by ``(seed, epoch)``; continuing from a checkpoint repeats the uninterrupted
run bit for bit on the same machine and thread count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.align.features import IGNORE_PATCH, FeatureShard, FeatureShards
from fmbseg.align.module import architecture_path
from fmbseg.align.train import (
    TEXT_FILE,
    deterministic,
    encode_text_embeddings,
    save_text_embeddings,
    stored_text_embeddings,
)
from fmbseg.charts import LOSS_CHART, LOSS_FILE, write_loss_curve
from fmbseg.config import FusionerConfig, Params
from fmbseg.errors import ConfigError, FmbsegError, InputError
from fmbseg.fusioner.loss import IGNORED, masked_bce
from fmbseg.fusioner.module import Fusioner, FusionerSpec, save_fusioner
from fmbseg.io.atomic import write_text_atomic
from fmbseg.io.checkpoints import (
    LATEST_FILE,
    flatten_optimizer,
    flatten_state,
    load_latest,
    load_optimizer,
    save_checkpoint,
    unflatten_state,
)
from fmbseg.io.runs import claim_output, write_run_record
from fmbseg.methods import MODEL_FILE, EpochCallback, write_model_record
from fmbseg.models.base import TextEncoder
from fmbseg.models.runtime import Runtime

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODULE_FILE = "module.safetensors"
METRICS_FILE = "metrics.json"


def trainable_classes(config: FusionerConfig, vocabulary: tuple[str, ...]) -> tuple[int, ...]:
    """Vocabulary indices that may be text tokens and targets (all but the held-out ones)."""
    from fmbseg.evaluation.folds import matching, name_key, novel_classes, parse_holdout

    known = {name_key(name) for name in vocabulary}
    unknown = [name for name in config.exclude_classes if name_key(name) not in known]
    if unknown:
        raise ConfigError(
            f"train.fusioner.exclude_classes: {unknown[0]!r} is not a class of the training "
            f"vocabulary ({len(vocabulary)} classes)"
        )
    held = matching(vocabulary, config.exclude_classes)
    if config.holdout is not None:
        held |= matching(vocabulary, novel_classes(*parse_holdout(config.holdout)))
    kept = tuple(k for k in range(len(vocabulary)) if k not in held)
    if not kept:
        raise ConfigError("train.fusioner: every class of the vocabulary is held out")
    return kept


@dataclass(frozen=True)
class Batch:
    visual: torch.Tensor  # (B, h, w, C)
    classes: torch.Tensor  # (B, N) vocabulary indices of the text tokens
    targets: torch.Tensor  # (B, N, S, S): 1, 0 or IGNORED


def _targets(label_maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, S, S) label maps, (B, N) classes -> (B, N, S, S) binary targets, IGNORED where the
    pixel is unlabelled."""
    maps = label_maps.long()[:, None]
    targets = (maps == classes[:, :, None, None]).to(torch.int8)
    return targets.masked_fill(maps == IGNORE_PATCH, IGNORED)


def _episodes(shard: FeatureShard, trainable: torch.Tensor, mode: str) -> list[tuple[int, int]]:
    """(image position, class) pairs of a shard; class -1 means "all trainable classes"."""
    assert shard.label_maps is not None
    if mode == "image":
        return [(i, -1) for i in range(len(shard))]
    pairs = []
    for i, label_map in enumerate(shard.label_maps):
        present = torch.unique(label_map.long())
        present = present[torch.isin(present, trainable)]
        pairs.extend((i, int(k)) for k in present)
    return pairs


def count_episodes(shards: FeatureShards, trainable: torch.Tensor, mode: str) -> int:
    return sum(len(_episodes(shard, trainable, mode)) for shard in shards)


def epoch_batches(
    shards: FeatureShards,
    trainable: torch.Tensor,
    config: FusionerConfig,
    epoch: int,
) -> Iterator[Batch]:
    """Batches in a seeded order: shards shuffled, then each shard's episodes, so memory holds
    one shard plus a partial batch."""
    rng = np.random.default_rng([config.seed, epoch])
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def collate() -> Batch:
        visual, classes, maps = (torch.stack(parts) for parts in zip(*pending, strict=True))
        pending.clear()
        return Batch(visual, classes, _targets(maps, classes))

    for position in rng.permutation(len(shards)):
        shard = shards.load(int(position))
        assert shard.label_maps is not None
        episodes = _episodes(shard, trainable, config.episode)
        for index in rng.permutation(len(episodes)):
            image, k = episodes[index]
            classes = trainable if k < 0 else torch.tensor([k])
            pending.append((shard.features[image], classes, shard.label_maps[image]))
            if len(pending) == config.batch_size:
                yield collate()
    if pending:
        yield collate()


def learning_rate(config: FusionerConfig, step: int, total: int, warmup: int) -> float:
    """Fusion lr at ``step``: linear 0 -> lr over ``warmup`` steps, then cosine to min_lr."""
    if step < warmup:
        return config.lr * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def weight_decay(config: FusionerConfig, step: int, total: int) -> float:
    """Fusion weight decay at ``step``: cosine from weight_decay to weight_decay_end."""
    start, end = config.weight_decay, config.weight_decay_end
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / max(total, 1)))


def optimizers(
    model: Fusioner, config: FusionerConfig
) -> tuple[torch.optim.AdamW, torch.optim.Adam]:
    """Fusion: AdamW in two groups (decayed weight matrices; biases and 1-D parameters not).
    Decoder: Adam, constant lr, no weight decay."""
    decayed, plain = [], []
    for name, parameter in model.fusion.named_parameters():
        (plain if parameter.ndim <= 1 or name.endswith(".bias") else decayed).append(parameter)
    fusion = torch.optim.AdamW(
        [{"params": decayed, "decayed": True}, {"params": plain, "weight_decay": 0.0}],
        lr=0.0,
        betas=(0.9, 0.999),
    )
    decoder = torch.optim.Adam(model.decoder.parameters(), lr=config.decoder_lr, weight_decay=0.0)
    return fusion, decoder


class Checkpoints:
    """One resumable checkpoint per epoch (see :mod:`fmbseg.io.checkpoints`): model weights, both
    optimisers' moments and losses as tensors; epoch, param groups and seconds in JSON."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(
        self,
        epoch: int,
        model: Fusioner,
        optimisers: dict[str, torch.optim.Optimizer],
        losses: list[float],
        seconds: float,
    ) -> None:
        tensors = flatten_state("model", model.state_dict())
        groups = {}
        for name, optimiser in optimisers.items():
            moments, groups[name] = flatten_optimizer(name, optimiser)
            tensors |= moments
        tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
        record = {"epoch": epoch, "param_groups": groups, "seconds": seconds}
        save_checkpoint(self.folder, f"epoch_{epoch:03d}.safetensors", tensors, record)

    def restore(
        self, model: Fusioner, optimisers: dict[str, torch.optim.Optimizer]
    ) -> tuple[int, list[float], float]:
        """Load the latest checkpoint into the objects: (epochs done, losses, seconds)."""
        latest = load_latest(self.folder)
        if latest is None:
            return 0, [], 0.0
        tensors, record = latest
        model.load_state_dict(unflatten_state("model", tensors))
        for name, optimiser in optimisers.items():
            load_optimizer(name, optimiser, tensors, record["param_groups"][name])
        return int(record["epoch"]), tensors["losses"].tolist(), float(record["seconds"])


def run_train(
    params: Params,
    features_dir: str | Path,
    out_dir: str | Path,
    *,
    text: TextEncoder | None = None,
    show_progress: bool = True,
    on_epoch: EpochCallback | None = None,
    restart_if_changed: bool = False,
) -> dict[str, Any]:
    """Train (or resume training) Fusioner on a feature cache holding label maps."""
    out = Path(out_dir)
    config = params.train.fusioner
    if config.epochs < 1 or config.batch_size < 1 or config.warmup_epochs < 0:
        raise ConfigError(
            f"train.fusioner: epochs={config.epochs} and batch_size={config.batch_size} must be "
            f">= 1 and warmup_epochs={config.warmup_epochs} >= 0"
        )
    shards = FeatureShards(features_dir)
    if not shards.label_map_size:
        raise InputError(
            f"{shards.folder}: the feature cache holds no label maps, which Fusioner trains on; "
            "set features.label_map_size (e.g. 8x the patch grid) and rerun cache-features"
        )
    trainable = torch.tensor(trainable_classes(config, shards.vocabulary))
    record = {
        "method": "fusioner",
        "fusioner": config.model_dump(mode="json"),
        "templates": list(params.pseudolabel.templates),
        "text": params.models.text.model_dump(mode="json")
        | {"clip": params.models.clip.model_dump(mode="json")},
        "features_sha256": shards.content_sha256,
    }
    resuming = claim_output(
        out,
        record,
        kind="a training run",
        work=f"{CHECKPOINT_DIR}/{LATEST_FILE}",
        restart_if_changed=restart_if_changed,
        own_files=(
            TEXT_FILE,
            LOSS_FILE,
            LOSS_CHART,
            METRICS_FILE,
            MODULE_FILE,
            architecture_path(Path(MODULE_FILE)).name,
            MODEL_FILE,
        ),
        own_dirs=(CHECKPOINT_DIR,),
    )
    device = Runtime.from_config(params.models).torch_device()
    embeddings = stored_text_embeddings(out / TEXT_FILE, shards.vocabulary) if resuming else None
    text_metadata = None
    if embeddings is None:
        embeddings, text_metadata = encode_text_embeddings(shards.vocabulary, params, text)
    spec = FusionerSpec(
        visual_dim=shards.dim,
        text_dim=embeddings.shape[1],
        width=config.width,
        depth=config.depth,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        decoder_upsamples=config.decoder_upsamples,
        temperature=config.temperature,
    )
    with deterministic():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = Fusioner(spec).to(device)
        if not resuming:
            write_run_record(out, record)
        if text_metadata is not None:
            save_text_embeddings(out / TEXT_FILE, embeddings, text_metadata)
        metrics = _fit(
            config,
            shards,
            trainable,
            model,
            embeddings.to(device),
            out,
            device,
            show_progress,
            on_epoch,
        )
    vocabulary = list(shards.vocabulary)
    trained_on = [vocabulary[k] for k in trainable.tolist()]
    save_fusioner(
        model,
        out / MODULE_FILE,
        encoder=shards.encoder["model"],
        text_embeddings=TEXT_FILE,
        vocabulary=vocabulary,
        trained_classes=trained_on,
    )
    write_model_record(
        out,
        "fusioner",
        (MODULE_FILE, architecture_path(Path(MODULE_FILE)).name, TEXT_FILE),
        encoder=shards.encoder["model"],
        vocabulary=vocabulary,
        trained_classes=trained_on,
    )
    return metrics


def _fit(
    config: FusionerConfig,
    shards: FeatureShards,
    trainable: torch.Tensor,
    model: Fusioner,
    text: torch.Tensor,
    out: Path,
    device: torch.device,
    show_progress: bool,
    on_epoch: EpochCallback | None,
) -> dict[str, Any]:
    from tqdm import tqdm

    episodes = count_episodes(shards, trainable, config.episode)
    if not episodes:
        raise InputError(
            f"{shards.folder}: no labelled pixel of a trainable class in any label map"
        )
    steps_per_epoch = math.ceil(episodes / config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    fusion, decoder = optimizers(model, config)
    optimisers = {"fusion": fusion, "decoder": decoder}
    checkpoints = Checkpoints(out / CHECKPOINT_DIR)
    start_epoch, losses, seconds = checkpoints.restore(model, optimisers)
    if start_epoch:
        log.info("resuming %s after epoch %d of %d", out, start_epoch, config.epochs)
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        model.train()
        description = f"fusioner epoch {epoch + 1}/{config.epochs}"
        for batch in tqdm(
            epoch_batches(shards, trainable, config, epoch),
            total=steps_per_epoch,
            desc=description,
            unit="step",
            disable=not show_progress,
        ):
            step = len(losses)
            lr, decay = (
                learning_rate(config, step, total, warmup),
                weight_decay(config, step, total),
            )
            for group in fusion.param_groups:
                group["lr"] = lr
                if group.get("decayed"):
                    group["weight_decay"] = decay
            targets = batch.targets.to(device)
            logits = model(batch.visual.to(device).float(), text[batch.classes.to(device)])
            if logits.shape[-2:] != targets.shape[-2:]:
                logits = F.interpolate(
                    logits, size=targets.shape[-2:], mode="bilinear", align_corners=False
                )
            loss = masked_bce(logits, targets)
            if not torch.isfinite(loss):
                raise FmbsegError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    "lower train.fusioner.lr"
                )
            fusion.zero_grad(set_to_none=True)
            decoder.zero_grad(set_to_none=True)
            loss.backward()
            fusion.step()
            decoder.step()
            losses.append(loss.item())
        seconds += time.perf_counter() - started
        checkpoints.save(epoch + 1, model, optimisers, losses, seconds)
        record = {
            "epoch": epoch + 1,
            "steps": len(losses),
            "loss": float(np.mean(losses[-steps_per_epoch:])),
            "lr": learning_rate(config, len(losses), total, warmup),
        }
        log.info("epoch %(epoch)d: mean loss %(loss).4f", record)
        if on_epoch is not None:
            on_epoch(record)
    return _write_curves(out, losses, steps_per_epoch, seconds, episodes)


def _write_curves(
    out: Path, losses: list[float], steps_per_epoch: int, seconds: float, episodes: int
) -> dict[str, Any]:
    write_loss_curve(out, losses, steps_per_epoch)
    metrics = {
        "final_loss": float(np.mean(losses[-steps_per_epoch:])),
        "first_epoch_loss": float(np.mean(losses[:steps_per_epoch])),
        "epochs": len(losses) // steps_per_epoch,
        "steps": len(losses),
        "episodes": episodes,
        "seconds": seconds,
    }
    write_text_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2))
    return metrics
