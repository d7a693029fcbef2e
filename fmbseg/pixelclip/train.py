"""PixelCLIP training: CLIP's image tower learns from class-agnostic masks, no class names.

One step (``train.pixelclip``; PixelCLIP's code, docs/pixelclip.md):

1. the momentum teacher moves toward the student (``momentum``, before use);
2. the k learnable prompts go through the frozen text tower -> class embeddings f_C;
3. the teacher embeds each weak view; its features are pooled under every mask (at
   ``mask_size``); all masks of the step, over every micro-batch, are clustered onto f_C
   together (Sinkhorn-Knopp, equal mass), so accumulation clusters what one big batch would;
4. each class's target is the union of its masks; the student's cosine maps of the strong view
   go through the ConvHead; BCE at pixels some mask covers, averaged over (pixel, class) pairs
   of the whole step; gradients reach the student's trained part, the prompts and the head;
5. gradient norm clipped over all of them; AdamW with per-group learning rates; cosine decay
   from ``lr`` to ``lr * lr_end_factor``.

Output folder::

    run.json                             fingerprint: pixelclip params, CLIP config, masks
    checkpoints/step_NNNNNNN.safetensors student and teacher trained tensors, prompts, head,
                                         AdamW state, every step's loss so far
    checkpoints/latest.json              step, optimiser groups, scheduler, sha256; written last
    loss.csv, loss.png, metrics.json     the curve and summary
    module.safetensors, module.json      the fine-tuned image tower: the student's trained
                                         tensors over models.clip's weights, and its dense variant
    text_embeddings.safetensors          the k learnt class embeddings
    model.json                           method "pixelclip" and the files above, last

Exact resume: the views of sample ``g`` come from a generator seeded by ``(seed, g)`` and the
image order of each pass from ``(seed, pass)``, so a checkpoint holds no RNG state and a resumed
run repeats the uninterrupted one bit for bit on the same machine (CPU, same thread count).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fmbseg.charts import LOSS_CHART, LOSS_FILE, write_loss_curve
from fmbseg.config import ModelsConfig, Params, PixelClipConfig
from fmbseg.errors import ConfigError, FmbsegError, InputError
from fmbseg.io.atomic import atomic_write, write_text_atomic
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
from fmbseg.pixelclip.cluster import assign_clusters, cluster_targets, pool_masks
from fmbseg.pixelclip.data import Views, make_views
from fmbseg.pixelclip.head import ConvHead
from fmbseg.pixelclip.prompts import PromptedTextEncoder

if TYPE_CHECKING:
    from fmbseg.models.clip import OpenClipModel
    from fmbseg.pseudolabel.agnostic import MaskTable

log = logging.getLogger(__name__)

METHOD_NAME = "pixelclip"
MODULE_FILE = "module.safetensors"
INFO_FILE = "module.json"
TEXT_FILE = "text_embeddings.safetensors"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"

CheckpointCallback = Callable[[dict[str, Any]], None]


def clip_models(models: ModelsConfig, config: PixelClipConfig) -> ModelsConfig:
    """``models`` with the CLIP dense path PixelCLIP trains and infers with."""
    clip = models.clip.model_copy(
        update={
            "dense_attention": config.dense_attention,
            "dense_residual": "auto",
            "dense_mlp": "auto",
        }
    )
    return models.model_copy(update={"clip": clip})


def build_clip(models: ModelsConfig) -> OpenClipModel:
    from fmbseg.models.clip import OpenClipModel
    from fmbseg.models.registry import build_vision_language_model

    clip = build_vision_language_model(models)
    if not isinstance(clip, OpenClipModel):
        raise ConfigError(
            f"models.clip.backend: PixelCLIP fine-tunes an open_clip ViT, got {models.clip.backend!r}"
        )
    return clip


def trained_names(visual: torch.nn.Module, finetune: str) -> list[str]:
    """Names of the image tower's parameters that train: ``attention`` (every attn weight and
    the positional embedding) or ``full``."""
    names = [name for name, _ in visual.named_parameters()]
    if finetune == "full":
        return names
    return [n for n in names if ".attn." in n or n == "positional_embedding"]


@dataclass
class Parts:
    """What one PixelCLIP run trains and holds: student, momentum teacher, prompts, head."""

    student: OpenClipModel
    teacher: OpenClipModel
    prompts: PromptedTextEncoder
    head: ConvHead
    names: list[str]  # trained parameter names of the image tower

    def student_tensors(self) -> dict[str, torch.Tensor]:
        visual = dict(self.student.network.visual.named_parameters())
        return {name: visual[name] for name in self.names}

    def teacher_tensors(self) -> dict[str, torch.Tensor]:
        visual = dict(self.teacher.network.visual.named_parameters())
        return {name: visual[name] for name in self.names}

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.student_tensors().values(), self.prompts.prompts, *self.head.parameters()]


def build_parts(clip: OpenClipModel, config: PixelClipConfig) -> Parts:
    """The student is ``clip`` itself, its chosen part trainable; the teacher a frozen copy."""
    teacher = copy.deepcopy(clip)
    visual = clip.network.visual
    names = trained_names(visual, config.finetune)
    trained = set(names)
    for name, parameter in visual.named_parameters():
        parameter.requires_grad_(name in trained)
    device = clip.network.visual.proj.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = ConvHead().to(device)
    prompts = PromptedTextEncoder(
        clip.network,
        clip.tokenizer,
        config.clusters,
        config.prompt_length,
        config.prompt_template,
        seed=config.seed,
    ).to(device)
    return Parts(clip, teacher, prompts, head, names)


def build_optimizer(
    parts: Parts, config: PixelClipConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW groups: image tower x encoder_lr_factor, prompts x prompt_lr_factor, head
    x head_lr_factor (its GroupNorms without weight decay); cosine to lr * lr_end_factor."""
    norms = [
        p
        for m in parts.head.modules()
        if isinstance(m, torch.nn.GroupNorm)
        for p in m.parameters(recurse=False)
    ]
    norm_ids = {id(p) for p in norms}
    head_rest = [p for p in parts.head.parameters() if id(p) not in norm_ids]
    lr, decay = config.lr, config.weight_decay
    groups = [
        {"params": list(parts.student_tensors().values()), "lr": lr * config.encoder_lr_factor},
        {"params": [parts.prompts.prompts], "lr": lr * config.prompt_lr_factor},
        {"params": head_rest, "lr": lr * config.head_lr_factor},
        {"params": norms, "lr": lr * config.head_lr_factor, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=decay)
    end = config.lr_end_factor

    def factor(step: int) -> float:
        return end + (1 - end) * 0.5 * (
            1 + math.cos(math.pi * min(step, config.steps) / config.steps)
        )

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def momentum_update(parts: Parts, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, on the trained tensors (the
    rest of the tower is equal in both and stays so)."""
    student = parts.student_tensors()
    for name, teacher in parts.teacher_tensors().items():
        teacher.mul_(momentum).add_(student[name], alpha=1 - momentum)


def class_maps_to_logits(head: ConvHead, cosine: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K, h, w) cosine maps -> (B, K, size, size) logits, the head shared by every class."""
    batch, classes, height, width = cosine.shape
    logits = head(cosine.reshape(batch * classes, 1, height, width))
    logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    return logits.reshape(batch, classes, size, size)


def train_step(
    parts: Parts,
    views: list[Views],
    config: PixelClipConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> float:
    """One optimiser step over ``views`` (``accumulation_steps`` micro-batches); its loss."""
    device = parts.student.network.visual.proj.device
    momentum_update(parts, config.momentum)
    classes = parts.prompts()
    class_leaf = classes.detach().requires_grad_(True)
    chunks = np.array_split(np.arange(len(views)), config.accumulation_steps)
    chunks = [chunk for chunk in chunks if len(chunk)]
    masks = [view.masks.to(device) for view in views]
    with torch.no_grad():
        pooled = []
        for chunk in chunks:
            weak = torch.stack([views[i].weak for i in chunk]).to(device)
            features = F.normalize(parts.teacher.dense_patches(weak), dim=-1)
            for row, i in enumerate(chunk):
                if len(masks[i]):
                    pooled.append(pool_masks(features[row].permute(2, 0, 1), masks[i]))
        total_masks = sum(len(m) for m in masks)
        assignment = (
            assign_clusters(
                torch.cat(pooled), class_leaf.detach(), config.epsilon, config.sinkhorn_iterations
            )
            if total_masks
            else torch.zeros(0, dtype=torch.int64, device=device)
        )
        per_image = assignment.split([len(m) for m in masks])
        targets = [
            cluster_targets(m, a, config.clusters) for m, a in zip(masks, per_image, strict=True)
        ]
        covered = [m.any(dim=0) for m in masks] if total_masks else []
    pairs = config.clusters * sum(int(c.sum()) for c in covered)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    if pairs:
        for chunk in chunks:
            strong = torch.stack([views[i].strong for i in chunk]).to(device)
            features = F.normalize(parts.student.dense_patches(strong), dim=-1)
            cosine = torch.einsum("bhwd,kd->bkhw", features, class_leaf)
            logits = class_maps_to_logits(parts.head, cosine, config.mask_size)
            target = torch.stack([targets[i] for i in chunk])
            valid = torch.stack([covered[i] for i in chunk])[:, None].to(logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            loss = (bce * valid).sum() / pairs
            loss.backward()
            loss_sum += loss.item()
        classes.backward(class_leaf.grad)
        torch.nn.utils.clip_grad_norm_(parts.trained_parameters(), config.grad_clip)
    optimizer.step()  # without masks nothing has a gradient and AdamW leaves it be
    scheduler.step()
    return loss_sum


class StepSampler:
    """Which images step ``s`` sees: passes over the images, each in an order seeded by
    ``(seed, pass)``; sample ``g`` is the ``g``-th of that sequence."""

    def __init__(self, keys: list[str], seed: int, batch_size: int) -> None:
        self.keys = keys
        self.seed = seed
        self.batch_size = batch_size
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {
                epoch: np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.keys))
            }
        return self._orders[epoch]

    def samples(self, step: int) -> list[tuple[int, str]]:
        """(sample position, image id) of every image of ``step`` (counted from 0)."""
        first = step * self.batch_size
        positions = range(first, first + self.batch_size)
        return [
            (g, self.keys[int(self._order(g // len(self.keys))[g % len(self.keys)])])
            for g in positions
        ]

    def rng(self, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 1, position])


class Checkpoints:
    """Every ``checkpoint_every`` steps (see :mod:`fmbseg.io.checkpoints`): trained tensors,
    AdamW state and losses as tensors; step, optimiser groups, scheduler and seconds in JSON."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(
        self,
        step: int,
        parts: Parts,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        losses: list[float],
        seconds: float,
    ) -> None:
        moments, groups = flatten_optimizer("optimizer", optimizer)
        tensors = flatten_state("student", parts.student_tensors())
        tensors |= flatten_state("teacher", parts.teacher_tensors())
        tensors["prompts"] = parts.prompts.prompts
        tensors |= flatten_state("head", parts.head.state_dict()) | moments
        tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
        record = {
            "step": step,
            "optimizer_param_groups": groups,
            "scheduler": scheduler.state_dict(),
            "seconds": seconds,
        }
        save_checkpoint(self.folder, f"step_{step:07d}.safetensors", tensors, record)

    def restore(
        self,
        parts: Parts,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> tuple[int, list[float], float]:
        """Load the latest checkpoint into the objects: (steps done, losses, seconds)."""
        latest = load_latest(self.folder)
        if latest is None:
            return 0, [], 0.0
        tensors, record = latest
        with torch.no_grad():
            for prefix, current in (
                ("student", parts.student_tensors()),
                ("teacher", parts.teacher_tensors()),
            ):
                stored = unflatten_state(prefix, tensors)
                for name, tensor in current.items():
                    tensor.copy_(stored[name])
            parts.prompts.prompts.copy_(tensors["prompts"])
        parts.head.load_state_dict(unflatten_state("head", tensors))
        load_optimizer("optimizer", optimizer, tensors, record["optimizer_param_groups"])
        scheduler.load_state_dict(record["scheduler"])
        return int(record["step"]), tensors["losses"].tolist(), float(record["seconds"])


def _read_views(
    sampler: StepSampler,
    step: int,
    images: dict[str, Path],
    table: MaskTable,
    config: PixelClipConfig,
    max_pixels: int,
) -> list[Views]:
    from fmbseg.io.images import read_rgb

    views = []
    for position, key in sampler.samples(step):
        image = read_rgb(images[key], max_pixels)
        masks = table.masks(key)
        if masks.shape[1:] != image.shape[:2]:
            raise InputError(
                f"{images[key]}: image is {image.shape[1]}x{image.shape[0]}, its masks in "
                f"{table.folder} are {masks.shape[2]}x{masks.shape[1]}; rerun the masks stage"
            )
        views.append(make_views(image, masks, config, sampler.rng(position)))
    return views


def _check(config: PixelClipConfig) -> None:
    if config.batch_size % config.accumulation_steps:
        raise ConfigError(
            f"train.pixelclip.batch_size ({config.batch_size}) must be a multiple of "
            f"accumulation_steps ({config.accumulation_steps})"
        )
    if config.mask_size < 2:
        raise ConfigError(f"train.pixelclip.mask_size: at least 2 (got {config.mask_size})")


def run_train(
    params: Params,
    images_dir: str | Path,
    masks_dir: str | Path,
    out_dir: str | Path,
    *,
    show_progress: bool = True,
    on_checkpoint: CheckpointCallback | None = None,
    restart_if_changed: bool = False,
) -> dict[str, Any]:
    """Train (or resume) PixelCLIP on the images and their class-agnostic masks; the metrics.

    ``on_checkpoint`` is called after each checkpoint with its record (step, mean loss since
    the last one, learning rate of the image tower).
    """
    from fmbseg.io.images import image_id, list_images
    from fmbseg.pseudolabel.agnostic import MaskTable

    config = params.train.pixelclip
    _check(config)
    out = Path(out_dir)
    table = MaskTable(masks_dir)
    root = Path(images_dir)
    images = {image_id(path, root): path for path in list_images(root)}
    keys = table.image_ids()
    missing = [key for key in keys if key not in images]
    if missing:
        raise InputError(f"{root}: image {missing[0]!r} of the masks in {table.folder} not found")
    if not table.summary.get("masks"):
        raise InputError(
            f"{table.folder}: the masks stage kept no mask on {len(keys)} images, so PixelCLIP "
            "has nothing to learn from; lower masks.pred_iou_thresh and "
            "masks.stability_score_thresh (0 turns SAM's filter off; random-init SAM passes "
            "neither default) or set masks.source=dino"
        )
    models = clip_models(params.models, config)
    record = {
        "pixelclip": config.model_dump(mode="json"),
        "clip": models.clip.model_dump(mode="json"),
        "precision": params.models.precision,
        "masks": table.run,
        "masks_sha256": table.content_sha256(),
    }
    resuming = claim_output(
        out,
        record,
        kind="a training run",
        work=f"{CHECKPOINT_DIR}/{LATEST_FILE}",
        restart_if_changed=restart_if_changed,
        own_files=(
            LOSS_FILE,
            LOSS_CHART,
            METRICS_FILE,
            MODULE_FILE,
            INFO_FILE,
            TEXT_FILE,
            MODEL_FILE,
        ),
        own_dirs=(CHECKPOINT_DIR,),
    )
    from fmbseg.align.train import deterministic

    with deterministic():
        parts = build_parts(build_clip(models), config)
        if not resuming:
            write_run_record(out, record)
        optimizer, scheduler = build_optimizer(parts, config)
        checkpoints = Checkpoints(out / CHECKPOINT_DIR)
        done, losses, seconds = checkpoints.restore(parts, optimizer, scheduler)
        if done:
            log.info("resuming %s after step %d of %d", out, done, config.steps)
        sampler = StepSampler(keys, config.seed, config.batch_size)
        max_pixels = params.pseudolabel.max_image_pixels
        from tqdm import tqdm

        with tqdm(
            total=config.steps,
            initial=done,
            desc="pixelclip",
            unit="step",
            disable=not show_progress,
        ) as progress:
            started = time.perf_counter()
            for step in range(done, config.steps):
                views = _read_views(sampler, step, images, table, config, max_pixels)
                loss = train_step(parts, views, config, optimizer, scheduler)
                if not math.isfinite(loss):
                    raise FmbsegError(
                        f"training loss became {loss} at step {step + 1}; lower train.pixelclip.lr"
                    )
                losses.append(loss)
                progress.update(1)
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                    seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    checkpoints.save(step + 1, parts, optimizer, scheduler, losses, seconds)
                    since = losses[-((step % config.checkpoint_every) + 1) :]
                    checkpoint = {
                        "epoch": step + 1,
                        "step": step + 1,
                        "loss": float(np.mean(since)),
                        "lr": scheduler.get_last_lr()[0],
                    }
                    if on_checkpoint is not None:
                        on_checkpoint(checkpoint)
    _save_model(out, parts, config, table)
    return _write_curves(out, losses, seconds, config, table, len(keys))


def _save_model(out: Path, parts: Parts, config: PixelClipConfig, table: MaskTable) -> None:
    from safetensors.torch import save

    provenance = parts.student.provenance
    info = {
        "clip_model": provenance.model,
        "clip_weights": provenance.tag,
        "dense_attention": config.dense_attention,
        "finetune": config.finetune,
        "clusters": config.clusters,
        "mask_source": table.source,
    }
    tensors = {
        name: value.detach().cpu().contiguous() for name, value in parts.student_tensors().items()
    }
    with atomic_write(out / MODULE_FILE) as handle:
        handle.write(save(tensors, {key: str(value) for key, value in info.items()}))
    write_text_atomic(out / INFO_FILE, json.dumps(info, indent=2))
    with torch.no_grad():
        classes = parts.prompts().cpu().contiguous()
    names = [f"cluster_{k}" for k in range(config.clusters)]
    with atomic_write(out / TEXT_FILE) as handle:
        handle.write(save({"text_embeddings": classes}, {"vocabulary": json.dumps(names)}))
    write_model_record(out, METHOD_NAME, (MODULE_FILE, INFO_FILE, TEXT_FILE), **info)


def _write_curves(
    out: Path,
    losses: list[float],
    seconds: float,
    config: PixelClipConfig,
    table: MaskTable,
    images: int,
) -> dict[str, Any]:
    every = config.checkpoint_every
    write_loss_curve(out, losses, every)
    metrics = {
        "final_loss": float(np.mean(losses[-every:])),
        "first_loss": float(losses[0]),
        "steps": len(losses),
        "images": images,
        "clusters": config.clusters,
        "epsilon": config.epsilon,
        "mask_source": table.source,
        "masks": int(table.summary.get("masks", 0)),
        "seconds": seconds,
    }
    write_text_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2))
    return metrics
