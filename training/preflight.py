"""Preflight: everything that can be known to be wrong before the first step, found before the output folder is
touched (and all of it under `make train-stageN ... --dry-run`). Each refusal is one line naming the config field.

    data        the manifest plans at least one batch per process (data.root, data.caption, data.batch_size)
    features    a sample's T5 width equals model caption_channels; its latent channels equal in_channels
    resolution  the data's bucket sizes match the model's input_size (a 2x mismatch is refused); a pe_interpolation
                other than PixArt's for that size is a warning
    models      pretrained.text_encoder / pretrained.vae, when local, have the width / latent channels the model
                takes; the dataset card's encoders differ from pretrained.* -> warning
    init        init.weights is a complete weights folder whose model can initialize this one (transition, shapes)
    reporting   run.report_to names only installed sinks
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import ConfigError
from curation.shard_format import CARD_FILE
from training.data import BatchPlan, ShardReader, SampleError
from training.model import PixArtConfig
from training.train_config import TrainConfig

log = logging.getLogger("training.preflight")

PROBE_SAMPLES = 8  # samples read to learn the data's feature widths (the first readable one decides)


class PreflightError(ConfigError):
    """A setting that cannot work with the data, models or weights it names."""


@dataclass
class Preflight:
    plan: BatchPlan | None
    checks: list[str] = field(default_factory=list)  # what was checked, for --dry-run
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message)


def preflight(config: TrainConfig, world_size: int = 1, resuming: bool = False,
              source_config: PixArtConfig | None = None) -> Preflight:
    """Check `config` against its data, models and init weights. `resuming`: the run continues from its own
    checkpoints, so init.weights is not needed. `source_config`: the model init.weights will hold, when that
    folder is written by an earlier sub-stage of the same launch."""
    model = config.pixart_config()
    data = config.data
    plan = BatchPlan.from_dataset(data.root, data.caption, data.batch_size, world_size, data.seed,
                                  num_classes=model.num_classes)
    report = Preflight(plan)
    report.checks.append(f"data: {plan.num_samples} usable samples, {plan.batches_per_rank} batches per process "
                         f"per epoch")
    _check_features(config, model, plan, report)
    _check_resolution(config, model, plan, report)
    _check_pretrained(config, model, report)
    if "wandb" in config.run.report_to and importlib.util.find_spec("wandb") is None:
        raise PreflightError("run.report_to: wandb is not installed (pip install 'pixart-from-scratch[wandb]'); "
                             "remove it from run.report_to")
    if not resuming and (config.init.weights or source_config is not None):
        _check_init(config, model, report, source_config)
    return report


def _check_features(config: TrainConfig, model: PixArtConfig, plan: BatchPlan, report: Preflight) -> None:
    reader, rows = ShardReader(config.data.root), plan.rows
    errors = []
    for i in range(min(PROBE_SAMPLES, plan.num_samples)):
        try:
            sample = reader.read(str(rows["shard"][i]), str(rows["key"][i]), config.data.caption)
        except SampleError as err:
            errors.append(str(err))
            continue
        channels = sample.latent_mean.shape[0]
        if channels != model.in_channels:
            raise PreflightError(f"model.overrides.in_channels: the data's latents ({config.data.root}) have "
                                 f"{channels} channels, the model takes in_channels={model.in_channels}")
        if config.data.caption is not None:
            width = sample.t5[config.data.caption].shape[1]
            if width != model.caption_channels:
                raise PreflightError(f"model.overrides.caption_channels: the data's t5_{config.data.caption} "
                                     f"features are {width} wide ({config.data.root}), the model's caption_channels "
                                     f"is {model.caption_channels}")
        report.checks.append(f"features: latents have {channels} channels"
                             + (f", T5 features are {width} wide" if config.data.caption else ""))
        return
    report.warn(f"data.root: none of the first {len(errors)} samples could be read to check feature widths "
                f"({errors[0] if errors else 'no samples'})")


def expected_pe_interpolation(input_size: int) -> float:
    """PixArt's position-embedding scale for a latent size: 1 up to 512 px (64 latents), 2 at 1024 px; what
    diffusers' PixArtTransformer2DModel assumes (sample_size // 64) when a model is exported."""
    return float(max(input_size // 64, 1))


def _check_resolution(config: TrainConfig, model: PixArtConfig, plan: BatchPlan, report: Preflight) -> None:
    areas = (plan.rows["latent_h"] * plan.rows["latent_w"]).astype(np.float64)
    side = math.sqrt(float(np.median(areas)))
    ratio = side / model.input_size
    sizes = sorted({(int(h), int(w)) for h, w in zip(plan.rows["latent_h"], plan.rows["latent_w"])})
    if not 2 / 3 <= ratio <= 3 / 2:
        raise PreflightError(
            f"model.overrides.input_size: the data's buckets are about {side:.0f}x{side:.0f} latents (median area; "
            f"{len(sizes)} bucket(s), e.g. {sizes[0][0]}x{sizes[0][1]}), the model's input_size is "
            f"{model.input_size}; sample grids and export would use {model.input_size}-latent images. Set "
            f"input_size to about {round(side)}, or train on data curated for this resolution")
    report.checks.append(f"resolution: buckets about {side:.0f}x{side:.0f} latents for input_size "
                         f"{model.input_size}")
    # A 32x autoencoder (DC-AE) makes odd latent sides easy to get: 512 px buckets are multiples of 32 pixels.
    broken = [f"{h}x{w}" for h, w in sizes if h % model.patch_size or w % model.patch_size]
    if broken:
        raise PreflightError(f"data.root: latents of {', '.join(broken[:3])} are not whole patches "
                             f"(model patch_size {model.patch_size}); curate with buckets.multiple a multiple of "
                             f"{model.patch_size} x the autoencoder's downsample factor")
    expected = expected_pe_interpolation(model.input_size)
    if model.pe_interpolation != expected:
        report.warn(f"model.overrides.pe_interpolation: {model.pe_interpolation} at input_size {model.input_size}; "
                    f"PixArt (and diffusers' PixArtTransformer2DModel, which export targets) use {expected}")


def _local_config(name: str, subfolder: str | None = None) -> dict | None:
    """A local model folder's config.json, or None (a hub id: checked when loaded)."""
    folder = Path(name) / (subfolder or "")
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _check_pretrained(config: TrainConfig, model: PixArtConfig, report: Preflight) -> None:
    pre = config.pretrained
    if model.text_conditioned:
        t5 = _local_config(pre.text_encoder)
        width = t5 and t5.get("d_model")
        if width and width != model.caption_channels:
            raise PreflightError(f"pretrained.text_encoder: {pre.text_encoder} is {width} wide, the model's "
                                 f"caption_channels is {model.caption_channels}")
    vae = _local_config(pre.vae, pre.vae_subfolder)
    channels = vae and vae.get("latent_channels")
    if channels and channels != model.in_channels:
        raise PreflightError(f"pretrained.vae: {pre.vae} has {channels} latent channels, the model takes "
                             f"in_channels={model.in_channels}")
    card_file = Path(config.data.root) / CARD_FILE
    try:
        card = json.loads(card_file.read_text())
    except (OSError, ValueError):
        return
    vae_card, t5_card = card.get("vae") or {}, card.get("text_encoder") or {}
    for setting, ours, theirs in (("pretrained.vae", pre.vae, vae_card.get("model")),
                                  ("pretrained.vae_class", pre.vae_class, vae_card.get("model_class")),
                                  ("pretrained.scaling_factor", pre.scaling_factor, vae_card.get("scaling_factor")),
                                  ("pretrained.shift_factor", pre.shift_factor, vae_card.get("shift_factor")),
                                  ("pretrained.text_encoder", pre.text_encoder, t5_card.get("model"))):
        # A hub id and a local copy of it legitimately differ, so this is a warning; factors left null are the
        # card's.
        if theirs is not None and ours is not None and theirs != ours:
            report.warn(f"{setting} is {ours!r} but {card_file.parent} was encoded with {theirs!r}")


def _check_init(config: TrainConfig, model: PixArtConfig, report: Preflight,
                source_config: PixArtConfig | None) -> None:
    from training.stages import choose_transition
    from training.weights import EMA_NAME, MODEL_NAME, read_config, weights_problem

    init = config.init
    if source_config is None:
        from training.init_sources import source_kind

        kind = source_kind(init.weights)  # a missing .pth or folder is a TransitionError naming init.weights
        if kind != "weights":  # released weights: shapes and position embedding are checked as they load
            report.checks.append(f"init: {init.weights} ({kind} weights, continue)")
            return
        problem = weights_problem(init.weights, ema=init.use_ema)
        if problem is not None:
            raise PreflightError(f"init.weights: {problem}; expected the final/ weights folder of the previous "
                                 f"stage" + (" with EMA weights (init.use_ema)" if init.use_ema else ""))
        source_config = read_config(init.weights)
    transition = choose_transition(source_config, model, init.transition)  # TransitionError names init.*
    if init.weights and Path(init.weights, MODEL_NAME).is_file():
        _check_shapes(Path(init.weights) / (EMA_NAME if init.use_ema else MODEL_NAME), model)
    report.checks.append(f"init: {init.weights} -> {transition}")


def _check_shapes(path: Path, model: PixArtConfig) -> None:
    """Every tensor the two models share has the same shape (read from the safetensors header, no weights)."""
    import torch
    from safetensors import safe_open

    from training.model import PixArt

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in PixArt(model).state_dict().items()}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            theirs = tuple(fh.get_slice(key).get_shape())
            if key in ours and ours[key] != theirs:
                raise PreflightError(f"init.weights: {key} has shape {theirs} in {path}, {ours[key]} in this model "
                                     f"(model.preset / model.overrides)")
