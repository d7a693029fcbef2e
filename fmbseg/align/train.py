"""Stage 2 training: the alignment module on cached features, against frozen CLIP text embeddings.

Output folder::

    run.json                           fingerprint: train params, templates, CLIP config, feature
                                       cache content, init_from file; a rerun with others is
                                       refused (or, asked to, started afresh)
    text_embeddings.safetensors        (K, D) text embeddings of the training vocabulary
    checkpoints/epoch_NNN.safetensors  module weights, SGD momentum, every step's loss so far
    checkpoints/latest.json            epoch, step, optimiser and scheduler state, sha256 of the
                                       tensors file; written last, so it names a whole checkpoint
    loss.csv, loss.png                 step, epoch, loss (for DVC plots) and its chart
    metrics.json                       final loss, epochs, steps, seconds
    module.safetensors, module.json    the trained module (see :mod:`fmbseg.align.module`)
    model.json                         method "fmbseg" and the files of the trained model, last

Exact resume: the only randomness is the module's initialisation (seeded once) and each epoch's
image order, drawn from a generator seeded by ``(train.seed, epoch)``; so a checkpoint holds no
RNG state, and continuing from it repeats the uninterrupted run bit for bit on the same machine.
The cosine schedule spans ``train.epochs`` whole epochs, whatever epoch a run starts from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmbseg.align.features import IGNORE_PATCH, FeatureShards
from fmbseg.align.loss import get_loss
from fmbseg.align.module import (
    AlignmentModule,
    ModuleSpec,
    architecture_path,
    load_module,
    save_module,
)
from fmbseg.charts import LOSS_CHART, LOSS_FILE, write_loss_curve
from fmbseg.config import Params
from fmbseg.errors import ConfigError, FmbsegError, InputError, WeightsError
from fmbseg.io.atomic import atomic_write, sha256_file, write_text_atomic
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
from fmbseg.methods import MODEL_FILE, write_model_record
from fmbseg.models.base import TextEncoder
from fmbseg.models.runtime import Runtime

log = logging.getLogger(__name__)

TEXT_FILE = "text_embeddings.safetensors"
CHECKPOINT_DIR = "checkpoints"
MODULE_FILE = "module.safetensors"
METRICS_FILE = "metrics.json"

EpochCallback = Callable[[dict[str, Any]], None]


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels for the duration (warnings, not errors, where CUDA has none)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def epoch_batches(
    shards: FeatureShards, seed: int, epoch: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (features (B, h, w, C), labels (B, h, w)) in a seeded order: shards shuffled,
    then images within each shard, so memory holds one shard plus a partial batch."""
    rng = np.random.default_rng([seed, epoch])
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for position in rng.permutation(len(shards)):
        shard = shards.load(int(position))
        for i in rng.permutation(len(shard)):
            features.append(shard.features[i])
            labels.append(shard.labels[i])
            if len(features) == batch_size:
                yield torch.stack(features), torch.stack(labels)
                features, labels = [], []
    if features:
        yield torch.stack(features), torch.stack(labels)


def stored_text_embeddings(path: Path, vocabulary: tuple[str, ...]) -> torch.Tensor | None:
    """The (K, D) text embeddings a run stored at ``path``, None when it has not stored them."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(path, "pt") as handle:
        stored = json.loads((handle.metadata() or {}).get("vocabulary", "null"))
        if stored == list(vocabulary):
            return handle.get_tensor("text_embeddings")
    raise InputError(f"{path}: text embeddings of another vocabulary; delete the file")


def encode_text_embeddings(
    vocabulary: tuple[str, ...], params: Params, text: TextEncoder | None
) -> tuple[torch.Tensor, dict[str, str]]:
    """(K, D) text embeddings of ``vocabulary`` and the metadata to store them with."""
    from fmbseg.models.registry import build_text_encoder
    from fmbseg.models.vocabulary import VocabularyEncoder

    if text is None:
        text = build_text_encoder(params.models)
    with torch.no_grad():
        embeddings = VocabularyEncoder(text, params.pseudolabel.templates).embed(vocabulary)
    metadata = {
        "vocabulary": json.dumps(list(vocabulary), ensure_ascii=False),
        "templates": json.dumps(list(params.pseudolabel.templates), ensure_ascii=False),
        "text": text.provenance.model,
        "text_weights": text.provenance.tag,
    }
    return embeddings.detach().to("cpu", torch.float32).contiguous(), metadata


def save_text_embeddings(path: Path, embeddings: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    with atomic_write(path) as handle:
        handle.write(save({"text_embeddings": embeddings}, metadata))


def _initial_module(params: Params, spec: ModuleSpec, shards: FeatureShards) -> AlignmentModule:
    """Seeded fresh weights, or ``train.init_from``'s (same architecture and encoder)."""
    if params.train.init_from is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.train.seed)
            return AlignmentModule.from_spec(spec)
    module, info = load_module(params.train.init_from, expected=spec)
    if info.encoder != shards.encoder["model"]:
        raise WeightsError(
            f"{params.train.init_from}: trained on features of encoder {info.encoder!r}, but "
            f"{shards.folder} holds features of {shards.encoder['model']!r}"
        )
    return module


class Checkpoints:
    """One resumable checkpoint per epoch (see :mod:`fmbseg.io.checkpoints`): module weights,
    SGD momentum and losses as tensors; epoch, optimiser groups, scheduler and seconds in JSON."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(
        self,
        epoch: int,
        module: AlignmentModule,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        losses: list[float],
        seconds: float,
    ) -> None:
        moments, groups = flatten_optimizer("optimizer", optimizer)
        tensors = flatten_state("module", module.state_dict()) | moments
        tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
        record = {
            "epoch": epoch,
            "optimizer_param_groups": groups,
            "scheduler": scheduler.state_dict(),
            "seconds": seconds,
        }
        save_checkpoint(self.folder, f"epoch_{epoch:03d}.safetensors", tensors, record)

    def restore(
        self,
        module: AlignmentModule,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> tuple[int, list[float], float]:
        """Load the latest checkpoint into the objects: (epochs done, losses, seconds)."""
        latest = load_latest(self.folder)
        if latest is None:
            return 0, [], 0.0
        tensors, record = latest
        module.load_state_dict(unflatten_state("module", tensors))
        load_optimizer("optimizer", optimizer, tensors, record["optimizer_param_groups"])
        scheduler.load_state_dict(record["scheduler"])
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
    """Train (or resume training) the alignment module; returns the metrics.

    ``on_epoch`` is called after each epoch's checkpoint with that epoch's record (epoch, steps,
    mean loss, learning rate), e.g. to log it to an experiment tracker. A run of other params or
    inputs in ``out_dir`` is refused, or replaced with ``restart_if_changed``.
    """
    out = Path(out_dir)
    train = params.train
    if train.epochs < 1 or train.batch_size < 1:
        raise ConfigError(
            f"train.epochs={train.epochs} and train.batch_size={train.batch_size} must be >= 1"
        )
    shards = FeatureShards(features_dir)
    init_sha = None
    if train.init_from is not None:
        if not Path(train.init_from).is_file():
            raise WeightsError(f"{train.init_from}: train.init_from module not found")
        init_sha = sha256_file(train.init_from)
    record = {
        # Other methods' blocks do not change this method's run.
        "train": train.model_dump(mode="json", exclude={"fusioner", "pixelclip"}),
        "templates": list(params.pseudolabel.templates),
        "text": params.models.text.model_dump(mode="json")
        | {"clip": params.models.clip.model_dump(mode="json")},
        "features_sha256": shards.content_sha256,
        "init_from_sha256": init_sha,
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
            architecture_path(MODULE_FILE).name,
            MODEL_FILE,
        ),
        own_dirs=(CHECKPOINT_DIR,),
    )
    device = Runtime.from_config(params.models).torch_device()
    embeddings = stored_text_embeddings(out / TEXT_FILE, shards.vocabulary) if resuming else None
    text_metadata = None
    if embeddings is None:
        embeddings, text_metadata = encode_text_embeddings(shards.vocabulary, params, text)
    spec = ModuleSpec(shards.dim, embeddings.shape[1], train.depth, train.heads, train.mlp_ratio)
    with deterministic():
        module = _initial_module(params, spec, shards).to(device)
        # Inputs and weights are usable: only now does the run leave files (run.json first).
        if not resuming:
            write_run_record(out, record)
        if text_metadata is not None:
            save_text_embeddings(out / TEXT_FILE, embeddings, text_metadata)
        embeddings = embeddings.to(device)
        metrics = _fit(params, shards, module, embeddings, out, device, show_progress, on_epoch)
    save_module(
        module,
        out / MODULE_FILE,
        encoder=shards.encoder["model"],
        text_embeddings=TEXT_FILE,
        vocabulary=shards.vocabulary,
    )
    write_model_record(
        out,
        "fmbseg",
        (MODULE_FILE, architecture_path(MODULE_FILE).name, TEXT_FILE),
        encoder=shards.encoder["model"],
        vocabulary=list(shards.vocabulary),
    )
    return metrics


def _fit(
    params: Params,
    shards: FeatureShards,
    module: AlignmentModule,
    text: torch.Tensor,
    out: Path,
    device: torch.device,
    show_progress: bool,
    on_epoch: EpochCallback | None,
) -> dict[str, Any]:
    from tqdm import tqdm

    train = params.train
    loss_fn = get_loss(train.loss)
    steps_per_epoch = math.ceil(shards.num_images / train.batch_size)
    optimizer = torch.optim.SGD(
        module.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=train.epochs * steps_per_epoch
    )
    checkpoints = Checkpoints(out / CHECKPOINT_DIR)
    start_epoch, losses, seconds = checkpoints.restore(module, optimizer, scheduler)
    if start_epoch:
        log.info("resuming %s after epoch %d of %d", out, start_epoch, train.epochs)
    for epoch in range(start_epoch, train.epochs):
        started = time.perf_counter()
        module.train()
        batches = epoch_batches(shards, train.seed, epoch, train.batch_size)
        description = f"train epoch {epoch + 1}/{train.epochs}"
        for features, labels in tqdm(
            batches, total=steps_per_epoch, desc=description, unit="step", disable=not show_progress
        ):
            embeddings = module(features.to(device))
            loss = loss_fn(
                embeddings.reshape(-1, embeddings.shape[-1]),
                labels.reshape(-1).to(device),
                text,
                train.temperature,
                ignore_index=IGNORE_PATCH,
            )
            if not torch.isfinite(loss):
                raise FmbsegError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}, step "
                    f"{len(losses) + 1}; lower train.lr or raise train.temperature"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        seconds += time.perf_counter() - started
        checkpoints.save(epoch + 1, module, optimizer, scheduler, losses, seconds)
        record = {
            "epoch": epoch + 1,
            "steps": len(losses),
            "loss": float(np.mean(losses[-steps_per_epoch:])),
            "lr": scheduler.get_last_lr()[0],
        }
        log.info("epoch %(epoch)d: mean loss %(loss).4f", record)
        if on_epoch is not None:
            on_epoch(record)
    return _write_curves(out, losses, steps_per_epoch, seconds, shards)


def _write_curves(
    out: Path, losses: list[float], steps_per_epoch: int, seconds: float, shards: FeatureShards
) -> dict[str, Any]:
    write_loss_curve(out, losses, steps_per_epoch)
    epochs = len(losses) // steps_per_epoch
    metrics = {
        "final_loss": float(np.mean(losses[-steps_per_epoch:])),
        "first_epoch_loss": float(np.mean(losses[:steps_per_epoch])),
        "epochs": epochs,
        "steps": len(losses),
        "images": shards.num_images,
        "seconds": seconds,
    }
    write_text_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2))
    return metrics
