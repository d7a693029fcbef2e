"""Benchmark cases: Fusioner beside FMbSeg on the same inputs.

``fusioner_train_step``: one training step of each on the same 5 images' cached patch grids
(FMbSeg: every labelled patch against the K class embeddings; Fusioner: the paper's episodes,
one present class per image, its label map at the decoder's resolution). ``fusioner_inference``:
one image segmented by each through the same encoder, windows and vocabulary, with K classes
and with one, so the cost of each extra class shows. Fusioner's sizes are the paper's (12
blocks of width 512, decoder to 8x the grid) except at ``tiny``; weights are random-init, which
costs the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fmbseg.bench.presets import build_clip, build_encoder, clip_facts, encoder_facts

if TYPE_CHECKING:
    from fmbseg.bench.cases import CaseContext
    from fmbseg.bench.measure import Recorder
    from fmbseg.config import FusionerConfig
    from fmbseg.fusioner.module import Fusioner

TINY_FUSIONER = {"width": 32, "depth": 2, "heads": 4, "decoder_upsamples": 1}


def fusioner_config(size: str) -> FusionerConfig:
    from fmbseg.config import FusionerConfig

    return FusionerConfig.model_validate(TINY_FUSIONER if size == "tiny" else {})


def build_fusioner(config: FusionerConfig, visual_dim: int, text_dim: int) -> Fusioner:
    import torch

    from fmbseg.fusioner.module import Fusioner, FusionerSpec

    torch.manual_seed(0)
    return Fusioner(
        FusionerSpec(
            visual_dim=visual_dim,
            text_dim=text_dim,
            width=config.width,
            depth=config.depth,
            heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            decoder_upsamples=config.decoder_upsamples,
            temperature=config.temperature,
        )
    )


def fusioner_train_step(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """Fusioner's step split into forward, loss, backward and both optimisers, and each
    method's whole step, on the same cached grids."""
    import torch
    import torch.nn.functional as F

    from fmbseg.align.loss import fmbseg_loss
    from fmbseg.align.module import AlignmentModule
    from fmbseg.align.train import deterministic
    from fmbseg.bench.cases import IGNORED_PATCH_FRACTION, TEMPERATURE, TRAIN_BATCH
    from fmbseg.fusioner.loss import IGNORED, masked_bce
    from fmbseg.fusioner.train import optimizers

    preset = ctx.preset
    patch, in_dim = encoder_facts(preset)
    _, _, text_dim = clip_facts(preset)
    grid = preset.feature_size // patch
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(TRAIN_BATCH, grid, grid, in_dim, generator=generator)
    features = features.half().float().to(ctx.device)  # the cache stores float16
    labels = torch.randint(0, preset.classes, (TRAIN_BATCH, grid, grid), generator=generator)
    ignored = torch.rand(labels.shape, generator=generator) < IGNORED_PATCH_FRACTION
    labels = labels.masked_fill(ignored, -1)
    text = ctx.text_embeddings(text_dim).to(ctx.device)

    torch.manual_seed(0)
    module = AlignmentModule(in_dim, text_dim).to(ctx.device).train()
    sgd = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    patch_labels = labels.flatten().to(ctx.device)

    def fmbseg_step() -> None:
        sgd.zero_grad(set_to_none=True)
        embeddings = module(features).reshape(-1, text_dim)
        fmbseg_loss(embeddings, patch_labels, text, TEMPERATURE).backward()
        sgd.step()

    config = fusioner_config(preset.name)
    model = build_fusioner(config, in_dim, text_dim).to(ctx.device).train()
    fusion, decoder = optimizers(model, config)
    for group in fusion.param_groups:
        group["lr"] = config.lr  # after warm-up; the lr does not change the cost
    side = grid * 2**config.decoder_upsamples
    maps = F.interpolate(labels[:, None].float(), size=(side, side), mode="nearest")[:, 0].long()
    # The paper's episode: one class present in each image (here its first labelled patch's).
    classes = torch.stack([row[row >= 0][0] for row in labels.flatten(1)])[:, None]
    targets = (maps[:, None] == classes[:, :, None, None]).to(torch.int8)
    targets = targets.masked_fill(maps[:, None] < 0, IGNORED).to(ctx.device)
    tokens = text[classes.to(ctx.device)]

    def optimiser_steps() -> None:
        fusion.step()
        decoder.step()
        fusion.zero_grad(set_to_none=True)
        decoder.zero_grad(set_to_none=True)

    def fusioner_step() -> None:
        masked_bce(model(features, tokens), targets).backward()
        optimiser_steps()

    with deterministic():
        for _ in rec.rounds():
            logits = rec.time("fusioner.forward", model, features, tokens)
            loss = rec.time("fusioner.loss_forward", masked_bce, logits, targets)
            rec.time("fusioner.backward", loss.backward)
            rec.time("fusioner.optimizer_steps", optimiser_steps)
            rec.time("fusioner.whole_step", fusioner_step)
            rec.time("fmbseg.whole_step", fmbseg_step)
    return {
        "images": TRAIN_BATCH,
        "grid": grid,
        "in_dim": in_dim,
        "text_dim": text_dim,
        "classes": preset.classes,
        "fusioner": {**config.model_dump(include=set(TINY_FUSIONER)), "episodes": TRAIN_BATCH},
        "fusioner_parameters": sum(p.numel() for p in model.parameters()),
        "fmbseg_parameters": sum(p.numel() for p in module.parameters()),
        "decoder_side": side,
        "units": {name: [TRAIN_BATCH, "image"] for name in rec.samples},
    }


def fusioner_inference(ctx: CaseContext, rec: Recorder) -> dict[str, Any]:
    """One image through each method's segmenter (sliding windows), K classes and one."""
    import torch

    from fmbseg.align.module import AlignmentModule
    from fmbseg.config import InferenceConfig
    from fmbseg.geometry import plan_inference
    from fmbseg.methods.fmbseg import AlignmentScorer
    from fmbseg.methods.fusioner import FusionerScorer
    from fmbseg.models.vocabulary import VocabularyEncoder
    from fmbseg.segmenter import OpenVocabularySegmenter

    preset = ctx.preset
    encoder = build_encoder(preset.encoder_model, preset.encoder_overrides, ctx.runtime)
    clip = build_clip(preset, ctx.runtime)
    names = tuple(f"class {k}" for k in range(preset.classes))
    vocabulary = VocabularyEncoder(clip)
    vocabulary.embed(names)  # encoded once per vocabulary, as in predict and evaluate
    window = preset.feature_size
    config = InferenceConfig(short_side=window, window=window, stride=window // 2)
    torch.manual_seed(0)
    module = AlignmentModule(encoder.embed_dim, clip.embed_dim).to(ctx.device)
    fusioner = fusioner_config(preset.name)
    model = build_fusioner(fusioner, encoder.embed_dim, clip.embed_dim).to(ctx.device)
    segmenters = {
        "fmbseg": AlignmentScorer(encoder, module, vocabulary),
        "fusioner": FusionerScorer(encoder, model, vocabulary),
    }
    segmenters = {
        method: OpenVocabularySegmenter(scorer, config, ctx.device, preset.encoder_batch)
        for method, scorer in segmenters.items()
    }
    image = ctx.image()
    for _ in rec.rounds():
        for method, segmenter in segmenters.items():
            rec.time(f"{method}.segment", segmenter.segment, image, names)
            rec.time(f"{method}.segment_one_class", segmenter.segment, image, names[:1])
    fastest = {name: min(s.seconds for s in samples) for name, samples in rec.samples.items()}
    per_class = {
        method: (fastest[f"{method}.segment"] - fastest[f"{method}.segment_one_class"])
        / max(len(names) - 1, 1)
        for method in segmenters
    }
    return {
        "windows": len(plan_inference(*image.shape[:2], config, encoder.patch_size).windows),
        "window": window,
        "classes": len(names),
        "fusioner": fusioner.model_dump(include=set(TINY_FUSIONER)),
        # Fastest rounds: seconds each class adds to one image, (K classes - 1 class) / (K - 1).
        "seconds_per_extra_class": {method: round(s, 6) for method, s in per_class.items()},
        "units": {name: [1, "image"] for name in rec.samples},
    }
