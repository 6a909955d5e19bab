"""The trainer's config: one YAML per training sub-stage, validated by pydantic before any work starts.

A sub-stage config names the model (a preset plus overrides), the shard dataset and which caption's T5 features to
train on, the optimizer (the paper's hyper-parameters by default), EMA, the DeepSpeed ZeRO setup, the VAE and text
encoder the data was encoded with, the weights it starts from, and where its outputs go:

    stage: 2
    name: stage2-256
    model: {preset: PixArt-XL/2}
    data: {root: data/sa1b, caption: llava, batch_size: 64}
    init: {weights: outputs/train/stage1/final, transition: class_to_text}
    run: {output_dir: outputs/train/stage2, steps: 100000}

A stage made of several sub-stages (stage 3: 256 -> 512 -> 1024 px) is a `StagePlan`: a YAML that lists the
sub-stage YAMLs to run in order, each initialized from the previous one's final weights.

Load either with `load_train_config(path, overrides)` / `load_stage_plan(path)`; errors name the field.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from common.autoencoder import SD_VAE_SPACE, LatentSpace
from common.pretrained import DEFAULT_T5, DEFAULT_VAE
from curation.shard_format import CAPTION_NAME_PATTERN, CARD_FILE
from training.diffusion import PredictionType
from training.lora import LoraSection
from training.objectives import ObjectiveName
from common.config import ConfigError, StrictModel, load_config

log = logging.getLogger(__name__)


class ModelSection(StrictModel):
    """A preset of training.model.PRESETS, with any PixArtConfig field overridden (e.g. depth, hidden_size,
    caption_channels, micro_conditions, pe_interpolation, gradient_checkpointing)."""

    preset: str = "PixArt-XL/2"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from training.model import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known: {sorted(PRESETS)}")
        return value

    def build(self):
        """The PixArtConfig this section describes. An unknown or invalid override is a ConfigError naming it."""
        from training.model import PRESETS, PixArtConfig

        known = {f.name for f in dataclasses.fields(PixArtConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ConfigError(f"model.overrides: unknown PixArtConfig field(s) {unknown}; known: {sorted(known)}")
        try:
            return dataclasses.replace(PRESETS[self.preset], **self.overrides)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.overrides: {err}") from None

    @model_validator(mode="after")
    def _overrides_are_valid(self) -> "ModelSection":
        self.build()
        return self


class DataSection(StrictModel):
    """The shard dataset (a curation output folder) and how batches are drawn from it."""

    root: str  # dataset folder: shards/, manifest.parquet (or manifest/ parts), see docs/SHARD_FORMAT.md
    caption: str | None = "llava"  # which caption's T5 features to train on (member t5_<caption>); None: class labels
    batch_size: int = Field(64, ge=1)  # per process; every batch holds one aspect-ratio bucket
    num_workers: int = Field(2, ge=0)  # DataLoader worker processes per training process
    prefetch_factor: int = Field(2, ge=1)
    # How workers start. forkserver: from a clean process, not forked from the trainer and the threads it runs
    # (training/data.py says why); fork: the old default, faster to start, unsafe once the trainer runs threads.
    multiprocessing_context: Literal["forkserver", "spawn", "fork"] = "forkserver"
    seed: int = 0  # the batch plan's shuffle seed (epoch e uses (seed, e))

    @field_validator("caption")
    @classmethod
    def _caption_name(cls, value: str | None) -> str | None:
        if value is not None and not CAPTION_NAME_PATTERN.match(value):
            raise ValueError(f"caption name must match {CAPTION_NAME_PATTERN.pattern}")
        return value


class OptimizerSection(StrictModel):
    """AdamW with linear warm-up then a constant rate; PixArt-alpha's values are the defaults."""

    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.03, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-10, gt=0)  # the official configs' AdamW eps
    grad_clip: float = Field(0.01, gt=0)  # global gradient-norm clip
    warmup_steps: int = Field(1000, ge=0)
    scale_lr: bool = False  # lr *= sqrt(global batch / 256), PixArt's "auto_lr" square-root rule
    # Micro-batches per update (DeepSpeed's): an update's batch is data.batch_size x processes x this.
    gradient_accumulation_steps: int = Field(1, ge=1)
    fused: bool | None = None  # torch's fused AdamW kernel; None: where the device has one (training.compute)

    def effective_lr(self, global_batch: int) -> float:
        return self.lr * math.sqrt(global_batch / 256) if self.scale_lr else self.lr


class EMASection(StrictModel):
    enabled: bool = True
    decay: float = Field(0.9999, ge=0, lt=1)


class DiffusionSection(StrictModel):
    """The training objective (training/diffusion.py): what the network predicts and how its error is measured."""

    # What the network's first output half predicts: PixArt's eps, or v (see training/diffusion.py). Recorded in
    # the weights folder's pipeline.json, so the samplers and the exported scheduler use the same.
    prediction_type: PredictionType = "epsilon"
    # Timesteps t < x0_target_below are trained on an x0 target (the clean latent against the x0 the output
    # implies), later ones on eps, unweighted: the official PixArt-alpha `snr=True` option is 250. null: off.
    x0_target_below: int | None = Field(None, ge=1, le=1000)
    # Min-SNR loss weighting, min(SNR, gamma) / SNR on the eps error (Hang et al. 2023; the official code uses it,
    # with gamma 5, only in its LoRA script). null: PixArt's default, unweighted.
    min_snr_gamma: float | None = Field(None, gt=0)
    # The training objective (training/objectives.py), recorded in pipeline.json for the samplers: iddpm, PixArt's
    # (the fields above), or rectified_flow, SD3's velocity objective (training/flow.py) with logit-normal training
    # times and a time shift, a number or "auto" (sqrt(image tokens / flow_base_tokens)).
    objective: ObjectiveName = "iddpm"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    flow_shift: float | Literal["auto"] = "auto"
    flow_base_tokens: int = Field(256, ge=1)

    @field_validator("flow_shift")
    @classmethod
    def _positive_shift(cls, value):
        if value != "auto" and not value > 0:
            raise ValueError("must be a number > 0 or 'auto'")
        return value

    @model_validator(mode="after")
    def _one_objective(self) -> "DiffusionSection":
        if self.objective == "rectified_flow":
            for name in ("prediction_type", "min_snr_gamma", "x0_target_below"):
                if name in self.model_fields_set:
                    raise ValueError(f"{name} is an IDDPM setting; rectified_flow predicts the velocity, unweighted")
        return self

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "snr_gamma" in data:
            raise ValueError("snr_gamma was split by what it does: min_snr_gamma is the Min-SNR weighting it "
                             "applied; x0_target_below: 250 is the official PixArt `snr=True` loss")
        return data

    @model_validator(mode="after")
    def _one_loss(self) -> "DiffusionSection":
        if self.min_snr_gamma is not None and self.x0_target_below is not None:
            raise ValueError("min_snr_gamma and x0_target_below are two different losses; set one of them")
        return self

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of GaussianDiffusion.training_losses."""
        return {"min_snr_gamma": self.min_snr_gamma, "x0_target_below": self.x0_target_below}


class RoutingSection(StrictModel):
    """TREAD token routing in training (training.model.TokenRouting): a random `rate` share of the image tokens
    skips blocks start..end-1 (end exclusive) and rejoins after them. rate 0: off. Sampling never routes."""

    rate: float = Field(0.0, ge=0, lt=1)
    start: int = Field(1, ge=0)
    end: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "RoutingSection":
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end}, exclusive)")
        return self

    def build(self):
        """The model's TokenRouting, or None when off."""
        from training.model import TokenRouting

        return TokenRouting(self.rate, self.start, self.end) if self.rate > 0 else None


class DeepSpeedSection(StrictModel):
    """The DeepSpeed ZeRO setup; `extra` is merged into the generated DeepSpeed config last (an escape hatch,
    e.g. {zero_optimization: {offload_optimizer: {device: cpu}}})."""

    zero_stage: Literal[2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    extra: dict[str, Any] = Field(default_factory=dict)


class PretrainedSection(StrictModel):
    """The VAE and text encoder the shards were encoded with: used for sample grids and written to pipeline.json
    so sampling and export need no flags."""

    vae: str = DEFAULT_VAE
    vae_class: str = "AutoencoderKL"
    vae_subfolder: str | None = None
    text_encoder: str = DEFAULT_T5
    # The latent normalization x = (z - shift_factor) * scaling_factor; null: the dataset card's (what curation
    # read from the autoencoder's config). See TrainConfig.latent_space.
    scaling_factor: float | None = Field(None, gt=0)
    shift_factor: float | None = None


class InitSection(StrictModel):
    """Where the weights come from (training/init_sources.py): a weights folder of a previous (sub-)stage, an
    official PixArt-alpha .pth, a diffusers PixArtTransformer2DModel (hub id or folder), or None for random init."""

    weights: str | None = None
    subfolder: str | None = None  # diffusers: the transformer's subfolder (default: "transformer" for a pipeline)
    transition: Literal["auto", "class_to_text", "continue"] = "auto"  # auto: decided from the two configs
    use_ema: bool = False  # start from the EMA weights (a previous stage's ema.safetensors, an official state_dict_ema)
    t_star: int = Field(500, ge=0, lt=1000)  # class_to_text: the timestep at which modulations are matched


class RunSection(StrictModel):
    output_dir: str
    steps: int = Field(ge=1)  # optimizer updates (steps skipped for a NaN/inf loss do not count)
    seed: int = 0  # noise, timesteps and caption dropout (per rank: seed + rank)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(1000, ge=1)  # DeepSpeed checkpoint and a consolidated weights folder
    keep_last: int = Field(3, ge=1)  # checkpoints and weights folders kept
    resume: bool = True  # continue from output_dir's latest checkpoint; false refuses an output_dir that has one
    max_bad_steps: int = Field(10, ge=1)  # this many NaN/inf losses in a row stop the run (with a checkpoint)
    progress: bool = True  # a tqdm bar on rank 0
    cpu_threads: int | None = Field(None, ge=1)  # torch threads per process on CPU; None: cores / local processes
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "pixart"  # with report_to wandb (WANDB_MODE=offline works without an account)
    # Peak dense FLOP/s per device for MFU; None: known GPUs' bf16 peak (training/metrics.py), none on CPU.
    peak_tflops: float | None = Field(None, gt=0)
    compile: bool = False  # torch.compile the model (training.compute); the first steps pay for the compilation
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": no code generation, for checks)


class SamplingSection(StrictModel):
    """Sample grids from fixed prompts (text models) or class labels (class-conditional) every `every` steps."""

    every: int = Field(0, ge=0)  # 0: no grids
    prompts: list[str] = Field(default_factory=lambda: [
        "a photograph of an astronaut riding a horse",
        "a bowl of fruit on a wooden table, studio lighting",
        "a red vintage car parked on a cobblestone street",
        "a snowy mountain lake at sunrise",
    ])
    class_labels: list[int] = Field(default_factory=lambda: [0, 1, 2, 3])
    size: tuple[int, int] | None = None  # (height, width) in pixels; default: the model's training size
    steps: int = Field(20, ge=1)
    sampler: str = "dpm++"
    guidance_scale: float = Field(4.5, ge=0)
    seed: int = 0
    use_ema: bool = True


class EvaluationSection(StrictModel):
    """FID and CLIP score every `every` steps on a small held-out set (training/evaluate.py), logged as eval/*."""

    every: int = Field(0, ge=0)  # 0: never
    prompt_file: str | None = None  # held-out prompts, one per line
    reference: str | None = None  # folder of held-out reference images for FID
    images_per_prompt: int = Field(1, ge=1)
    clip_model: str | None = "openai/clip-vit-large-patch14"  # hub id or folder; null: no CLIP score
    fid_features: str = "inception"  # or module:callable returning a torch feature extractor
    inception_weights: str | None = None  # local FID Inception weights; default: torch-fidelity's download
    fid_size: int = Field(299, ge=8)
    sampler: str = "dpm++"
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.5, ge=0)
    seed: int = 0
    use_ema: bool = True

    @model_validator(mode="after")
    def _needs_data(self) -> "EvaluationSection":
        if self.every and not (self.prompt_file and self.reference):
            raise ValueError("evaluation.every needs evaluation.prompt_file and evaluation.reference")
        return self


class TrainConfig(StrictModel):
    """One training sub-stage."""

    stage: Literal[1, 2, 3]
    name: str = "train"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    ema: EMASection = Field(default_factory=EMASection)
    diffusion: DiffusionSection = Field(default_factory=DiffusionSection)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    pretrained: PretrainedSection = Field(default_factory=PretrainedSection)
    init: InitSection = Field(default_factory=InitSection)
    run: RunSection
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        model = self.model.build()
        text_model = model.text_conditioned
        if self.routing.rate > 0 and self.routing.end > model.depth:
            raise ValueError(f"routing.end: {self.routing.end} is past the model's {model.depth} blocks (model.depth)")
        if text_model and self.data.caption is None:
            raise ValueError("data.caption: a text-conditioned model needs the name of the caption to train on")
        if not text_model and self.data.caption is not None:
            raise ValueError(f"data.caption: the model is class-conditional (num_classes set), so it trains on "
                             f"class_label; set data.caption to null (got {self.data.caption!r})")
        if self.init.weights is None and self.init.transition != "auto":
            raise ValueError(f"init.transition: {self.init.transition!r} transforms the weights of a previous stage, "
                             f"but init.weights is null; set init.weights to its weights folder, or "
                             f"init.transition to auto to start from random weights")
        if self.init.transition == "class_to_text" and not text_model:
            raise ValueError("init.transition: class_to_text needs a text-conditioned model (model.preset/overrides)")
        if self.sampling.every and text_model and not self.sampling.prompts:
            raise ValueError("sampling.prompts: sample grids of a text model need at least one prompt")
        if self.sampling.every and not text_model and not self.sampling.class_labels:
            raise ValueError("sampling.class_labels: sample grids of a class-conditional model need labels")
        if self.sampling.every and self.deepspeed.zero_stage == 3 and not (self.ema.enabled and self.sampling.use_ema):
            # Under ZeRO-3 only the EMA is whole on rank 0; the model's weights are spread over the ranks.
            raise ValueError("sampling.use_ema: with deepspeed.zero_stage=3 sample grids use the EMA weights; "
                             "set ema.enabled and sampling.use_ema, or sampling.every=0")
        return self

    def pixart_config(self):
        return self.model.build()

    def latent_space(self) -> LatentSpace:
        """The latent space the data's latents live in: the dataset card's `vae` section (curation wrote the
        autoencoder's config there), else PixArt's SD VAE with a warning; pretrained.scaling_factor / shift_factor
        replace its factors when set (the preflight checks the model's in_channels against the data)."""
        card_file = Path(self.data.root) / CARD_FILE
        card = json.loads(card_file.read_text()) if card_file.is_file() else {}
        vae = card.get("vae") or {}
        recorded = {field: vae[key] for field, key in (("channels", "latent_channels"),
                                                        ("downsample_factor", "downsample_factor"),
                                                        ("scaling_factor", "scaling_factor"),
                                                        ("shift_factor", "shift_factor")) if vae.get(key) is not None}
        if "scaling_factor" not in recorded and self.pretrained.scaling_factor is None:
            log.warning("data.root: %s records no autoencoder scaling_factor; assuming PixArt's SD VAE (%s); set "
                        "pretrained.scaling_factor and pretrained.shift_factor for another autoencoder",
                        card_file, SD_VAE_SPACE)
        return dataclasses.replace(SD_VAE_SPACE, **recorded).with_factors(self.pretrained.scaling_factor,
                                                                           self.pretrained.shift_factor)


class StagePlan(StrictModel):
    """A stage run as sub-stages in order (stage 3: 256 -> 512 -> 1024 px); sub-stage i > 0 starts from sub-stage
    i - 1's final weights, whatever its own `init.weights` says (that one is for running it alone)."""

    stage: Literal[1, 2, 3]
    substages: list[str] = Field(min_length=1)  # YAML paths, relative to the plan file


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A sub-stage config from YAML with `section.field=value` overrides; ConfigError names the bad field."""
    return load_config(path, TrainConfig, overrides)


def is_stage_plan(path: str | Path) -> bool:
    """True for a YAML that lists `substages` (a StagePlan) rather than one sub-stage."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # load_config will report it properly
    return isinstance(data, dict) and "substages" in data


def load_stage_plan(path: str | Path) -> tuple[StagePlan, list[Path]]:
    """The plan and its sub-stage YAML paths, resolved against the plan's folder; each must exist."""
    path = Path(path)
    plan = load_config(path, StagePlan)
    files = [(path.parent / name) if not Path(name).is_absolute() else Path(name) for name in plan.substages]
    for i, file in enumerate(files):
        if not file.is_file():
            raise ConfigError(f"invalid config {path}:\n  substages.{i}: file not found: {file}")
    return plan, files
