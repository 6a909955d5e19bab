"""Samplers for a trained PixArt: DPM-Solver++ (diffusers' scheduler, PixArt's default 20 steps), SA-Solver
(diffusers' scheduler, 25 steps) and IDDPM (ancestral, 100 respaced steps, learned-range variance), all with
classifier-free guidance.

Guidance runs the conditional and the null-conditional pass in one batched forward (the model's `force_drop_ids`
swaps in the learned null caption or null class) and extrapolates eps on all latent channels. The official DiT
and PixArt `forward_with_cfg` guide only the first three channels, a leftover from pixel-space code; we guide all
four. The variance channels come from the conditional pass, as the official code does.

`generate_images` is the text-to-image entry point the CLI (`training.sample`), the trainer's sample grids and the
demo share: prompts -> T5 features -> latents -> VAE decode -> PIL images.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common.autoencoder import Autoencoder
from training.diffusion import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, GaussianDiffusion
from training.flow import FLOW_SAMPLERS, RectifiedFlow

DEFAULT_STEPS = {"dpm++": 20, "sa-solver": 25, "iddpm": 100, "euler": 20, "heun": 20}  # the paper's; euler, heun: flow
SAMPLERS = tuple(DEFAULT_STEPS)
SAMPLER_HELP = ("dpm++: DPM-Solver++ (2nd order multistep, deterministic), PixArt's default, 20 steps; "
                "sa-solver: SA-Solver (stochastic Adams, predictor and corrector order 2), 25 steps; "
                "iddpm: ancestral IDDPM with the learned variance, 100 steps; "
                "euler, heun: a rectified-flow model's flow-matching Euler / Heun, 20 steps (dpm++ works for both)")
DEFAULT_GUIDANCE_SCALE = 4.5


def dpm_solver_scheduler(**overrides):
    """diffusers' DPMSolverMultistepScheduler configured as PixArt-alpha samples: DPM-Solver++ (data prediction),
    second order, multistep, on the training schedule (1000 steps, linear betas 1e-4..0.02), for an eps model.
    training.export writes the same configuration into exported pipelines."""
    from diffusers import DPMSolverMultistepScheduler

    config = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                  beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                  prediction_type="epsilon", lower_order_final=True, timestep_spacing="linspace")
    config.update(overrides)
    return DPMSolverMultistepScheduler(**config)


def sa_solver_scheduler(**overrides):
    """diffusers' SASolverScheduler on the training schedule, as PixArt-alpha samples with SA-Solver (Xue et al.
    2023): data prediction, predictor and corrector order 2 (the paper's choice for large guidance scales) and
    noise injected for 200 <= t <= 800 (diffusers' default tau function, the paper's)."""
    from diffusers import SASolverScheduler

    config = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                  beta_schedule="linear", predictor_order=2, corrector_order=2, prediction_type="epsilon",
                  algorithm_type="data_prediction", lower_order_final=True, timestep_spacing="linspace")
    config.update(overrides)
    return SASolverScheduler(**config)


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond), elementwise (every channel it is given)."""
    return uncond + scale * (cond - uncond)


def _model_config(model, name: str, default=None):
    config = getattr(model, "config", None)
    return getattr(config, name, default) if config is not None else default


def _model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    try:
        param = next(model.parameters())
        return param.dtype, param.device
    except (AttributeError, StopIteration):
        return torch.float32, torch.device("cpu")


class GuidedDenoiser:
    """(x_t, timestep) -> the model's output with classifier-free guidance applied to its eps channels.

    `conditioning` holds the model's keyword inputs for the batch (caption, caption_mask, class_labels,
    resolution, aspect_ratio), each with the batch first. With guidance, the batch is doubled: the first half
    conditional, the second with `force_drop_ids` set, so the model swaps in its null embedding, as the official
    code guides. A `negative` conditioning (caption and caption_mask of negative prompts) replaces the null
    embedding in the second half instead, as diffusers' pipeline does with its negative prompt.
    """

    def __init__(self, model: Callable[..., torch.Tensor], conditioning: dict[str, torch.Tensor],
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE, dtype: torch.dtype = torch.float32,
                 negative: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.conditioning = {k: v for k, v in conditioning.items() if v is not None}
        self.guidance_scale = float(guidance_scale)
        self.dtype = dtype
        self.negative = {k: v for k, v in (negative or {}).items() if v is not None}
        # Guidance needs something to drop; scale 1 is the conditional model, so the null pass is skipped.
        self.guided = bool(self.conditioning) and self.guidance_scale != 1.0
        if self.guided:
            self._doubled = {k: torch.cat([self._cast(v), self._cast(self.negative.get(k, v))])
                             for k, v in self.conditioning.items()}
        else:
            self._single = {k: self._cast(v) for k, v in self.conditioning.items()}

    def _cast(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self.dtype) if value.is_floating_point() else value

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if not self.guided:
            return self.model(x.to(self.dtype), timestep, **self._single).float()
        batch = x.shape[0]
        kwargs = dict(self._doubled)
        if not self.negative:
            kwargs["force_drop_ids"] = torch.cat([torch.zeros(batch, dtype=torch.bool),
                                                  torch.ones(batch, dtype=torch.bool)]).to(x.device)
        out = self.model(torch.cat([x, x]).to(self.dtype), torch.cat([timestep, timestep]), **kwargs).float()
        cond, uncond = out.chunk(2)
        eps = classifier_free_guidance(cond[:, :channels], uncond[:, :channels], self.guidance_scale)
        return torch.cat([eps, cond[:, channels:]], dim=1)


def check_sampler_args(sampler: str, steps: int | None, guidance_scale: float) -> int:
    """Validate the sampler name, step count and guidance scale; returns the step count (the sampler's default
    when `steps` is None). Errors name the argument."""
    if sampler not in DEFAULT_STEPS:
        raise ValueError(f"sampler: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps: must be an integer between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale: must be a finite number >= 0 (1 = no guidance), got {guidance_scale!r}")
    return int(steps)


@torch.no_grad()
def sample(model: Callable[..., torch.Tensor], latent_hw: tuple[int, int], *, caption: torch.Tensor | None = None,
           caption_mask: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
           resolution: torch.Tensor | None = None, aspect_ratio: torch.Tensor | None = None,
           sampler: str = "dpm++", steps: int | None = None, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
           generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
           batch_size: int | None = None, latent_channels: int | None = None,
           device: torch.device | str | None = None, progress: bool = False,
           prediction_type: str = "epsilon", flow: RectifiedFlow | None = None,
           negative_caption: torch.Tensor | None = None,
           negative_caption_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Draw latents [B, C, h, w] (float32, in the model's scaled latent space) from `model`.

    Guidance runs against the model's null caption (or class), or against `negative_caption` (with its mask,
    batch first, padded like `caption`) when given.

    The batch size comes from the conditioning (caption or class_labels), else from `noise` or `batch_size`
    (an unconditional call, without guidance). `prediction_type` is what the model predicts: "epsilon" (PixArt's)
    or "v_prediction" (its training config's diffusion.prediction_type); `flow` makes it a rectified-flow model
    (training.flow: velocity output, samplers dpm++, euler, heun). Initial and per-step noise are drawn
    from `generator` on its own device, so a seed gives the same latents on any accelerator. `model` is put in
    eval mode for the call (captions are dropped at random in train mode) and restored afterwards.
    """
    steps = check_sampler_args(sampler, steps, guidance_scale)
    if flow is None and sampler in FLOW_SAMPLERS and sampler != "dpm++":
        raise ValueError(f"sampler: {sampler!r} samples rectified-flow models; this is an IDDPM model (dpm++, iddpm)")
    if flow is not None and sampler not in FLOW_SAMPLERS:
        raise ValueError(f"sampler: {sampler!r} is not a rectified-flow sampler; choose one of "
                         f"{', '.join(FLOW_SAMPLERS)}")
    h, w = (int(v) for v in latent_hw)
    patch = _model_config(model, "patch_size", 1)
    if h % patch or w % patch:
        raise ValueError(f"latent_hw: {h}x{w} is not divisible by the model's patch size {patch}")
    dtype, model_device = _model_dtype_device(model)
    device = torch.device(device) if device is not None else model_device
    channels = latent_channels or _model_config(model, "in_channels", None)
    if channels is None:
        raise ValueError("latent_channels: the model has no config.in_channels; pass latent_channels")

    conditioning = {"caption": caption, "caption_mask": caption_mask, "class_labels": class_labels,
                    "resolution": resolution, "aspect_ratio": aspect_ratio}
    conditioning = {k: v.to(device) for k, v in conditioning.items() if v is not None}
    if "caption" in conditioning:
        batch = conditioning["caption"].shape[0]
    elif "class_labels" in conditioning:
        batch = conditioning["class_labels"].shape[0]
    elif noise is not None:
        batch = noise.shape[0]
    elif batch_size is not None:
        batch = batch_size
    else:
        raise ValueError("batch_size: give a caption, class_labels, noise or batch_size")
    shape = (batch, channels, h, w)

    def randn() -> torch.Tensor:
        gen_device = generator.device if generator is not None else "cpu"
        return torch.randn(shape, generator=generator, device=gen_device).to(device)

    x = randn() if noise is None else noise.to(device=device, dtype=torch.float32)
    if tuple(x.shape) != shape:
        raise ValueError(f"noise: shape {tuple(x.shape)} does not match {shape}")
    negative = None
    if negative_caption is not None:
        if caption is None or negative_caption.shape != caption.shape:
            raise ValueError(f"negative_caption: expected the caption's shape "
                             f"{None if caption is None else tuple(caption.shape)}, got {tuple(negative_caption.shape)}")
        negative = {"caption": negative_caption.to(device), "caption_mask": None if negative_caption_mask is None
                    else negative_caption_mask.to(device)}
    denoise = GuidedDenoiser(model, conditioning, guidance_scale, dtype, negative=negative)

    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        if flow is not None:
            x = flow.sample(lambda x_t, t: denoise(x_t, t)[:, :channels], x, sampler, steps, progress)
        elif sampler in ("dpm++", "sa-solver"):
            make = dpm_solver_scheduler if sampler == "dpm++" else sa_solver_scheduler
            scheduler = make(prediction_type=prediction_type)
            scheduler.set_timesteps(steps, device=device)
            x = x * scheduler.init_noise_sigma
            # SA-Solver injects noise: it is drawn from `generator`, like the initial noise.
            extra = {"generator": generator} if sampler == "sa-solver" else {}
            for t in tqdm(scheduler.timesteps, desc=sampler, disable=not progress, leave=False):
                prediction = denoise(x, t.expand(batch))[:, :channels]  # eps or v: the scheduler knows which
                x = scheduler.step(prediction, t, x, return_dict=False, **extra)[0]
        else:
            diffusion = GaussianDiffusion.respaced(steps, prediction_type=prediction_type)
            timestep_map = diffusion.timestep_map.to(device)
            for i in tqdm(range(steps - 1, -1, -1), desc="iddpm", disable=not progress, leave=False):
                t = torch.full((batch,), i, dtype=torch.long, device=device)
                out = denoise(x, timestep_map[t])
                x = diffusion.p_sample(out, x, t, noise=randn())
    finally:
        if was_training:
            model.train()
    return x


# -- text to image ---------------------------------------------------------------------------------------------------


def check_image_size(height: int, width: int, vae_factor: int, patch_size: int) -> None:
    """Image sides must map to whole latent patches; errors name the side."""
    multiple = vae_factor * patch_size
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < multiple or value % multiple:
            raise ValueError(f"{name}: {value!r} must be a positive multiple of {multiple} "
                             f"(VAE downsample factor {vae_factor} x patch size {patch_size})")


@torch.no_grad()
def decode_latents(vae: Autoencoder, latents: torch.Tensor, batch_size: int = 4) -> list[Image.Image]:
    """Diffusion latents -> RGB PIL images through the autoencoder's latent space, a few at a time to bound memory."""
    images = []
    for chunk in latents.split(batch_size):
        pixels = vae.decode(vae.space.denormalize(chunk.float()))
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images += [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
    return images


def generate_images(model, vae: Autoencoder, text_encoder=None, prompts: Sequence[str] | None = None, *,
                    class_labels: Sequence[int] | None = None, height: int | None = None, width: int | None = None,
                    sampler: str = "dpm++", steps: int | None = None,
                    guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int | None = 0,
                    generator: torch.Generator | None = None, batch_size: int = 4, progress: bool = False,
                    prediction_type: str = "epsilon", flow: RectifiedFlow | None = None,
                    negative_prompt: str | None = None, images_per_prompt: int = 1) -> list[Image.Image]:
    """`images_per_prompt` images per prompt (text models, `text_encoder` a common.pretrained.TextEncoder) or
    per class label (class-conditional models), in prompt order (all of a prompt's images together), decoded by
    `vae` (a common.autoencoder.Autoencoder carrying the latent space the model was trained in). A
    `negative_prompt` is guided against instead of the model's null caption. Height and width default to the
    model's native size; micro-conditions (resolution = (height, width), and the aspect ratio as
    config.aspect_ratio says: by default the official ratio key nearest to height / width) are passed when the
    model takes them.

    A `seed` (or an explicit `generator`) makes the result reproducible; the prompts are sampled `batch_size` at
    a time from one random stream, so a prompt's image depends on its position in the list.
    """
    text_model = bool(_model_config(model, "text_conditioned", prompts is not None))
    if text_model:
        if prompts is None or class_labels is not None:
            raise ValueError("prompts: a text-conditioned model needs prompts (and no class_labels)")
        if isinstance(prompts, str):
            raise ValueError("prompts: expected a list of strings, got a single string")
        if text_encoder is None:
            raise ValueError("text_encoder: a text-conditioned model needs a text encoder to encode the prompts")
        # The null caption the model guides against has caption_length tokens: encode to the same length.
        length = _model_config(model, "caption_length", None)
        if length is not None and getattr(text_encoder, "max_length", length) != length:
            if not dataclasses.is_dataclass(text_encoder):
                raise ValueError(f"text_encoder: encodes {text_encoder.max_length} tokens, the model's null caption "
                                 f"has {length} (config.caption_length)")
            text_encoder = dataclasses.replace(text_encoder, max_length=length)
    else:
        if class_labels is None or prompts is not None:
            raise ValueError("class_labels: a class-conditional model needs class_labels (and no prompts)")
        num_classes = _model_config(model, "num_classes", None)
        for label in class_labels:
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not (
                    0 <= label < (num_classes if num_classes is not None else math.inf)):
                raise ValueError(f"class_labels: {label!r} is not a class index in [0, {num_classes})")
    if negative_prompt is not None and not text_model:
        raise ValueError("negative_prompt: only a text-conditioned model takes one")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, (int, np.integer)) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt: must be an integer >= 1, got {images_per_prompt!r}")
    items = [item for item in (prompts if text_model else class_labels) for _ in range(images_per_prompt)]
    if not items:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    steps = check_sampler_args(sampler, steps, guidance_scale)

    factor = vae.downsample_factor
    patch = _model_config(model, "patch_size", 1)
    native = _model_config(model, "input_size", None)
    height = height if height is not None else (native * factor if native else None)
    width = width if width is not None else (native * factor if native else None)
    if height is None or width is None:
        raise ValueError("height: the model has no native size (config.input_size); pass height and width")
    check_image_size(height, width, factor, patch)

    _, device = _model_dtype_device(model)
    if generator is None:
        generator = torch.Generator("cpu")
        if seed is None:
            generator.seed()  # fresh, non-deterministic
        else:
            generator.manual_seed(seed)
    micro = bool(_model_config(model, "micro_conditions", False))
    negative = None
    if negative_prompt is not None:
        negative = text_encoder.encode([negative_prompt], device=device)

    images: list[Image.Image] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        kwargs: dict[str, torch.Tensor] = {}
        if text_model:
            kwargs["caption"], kwargs["caption_mask"] = text_encoder.encode(chunk, device=device)
            if negative is not None:
                kwargs["negative_caption"] = negative[0].expand(len(chunk), -1, -1)
                kwargs["negative_caption_mask"] = negative[1].expand(len(chunk), -1)
        else:
            kwargs["class_labels"] = torch.tensor([int(c) for c in chunk], dtype=torch.long, device=device)
        if micro:
            kwargs["resolution"] = torch.tensor([[float(height), float(width)]] * len(chunk), device=device)
            aspect = model.config.aspect_ratio(height, width)  # the official ratio key, unless configured h / w
            kwargs["aspect_ratio"] = torch.tensor([[aspect]] * len(chunk), device=device)
        latents = sample(model, (height // factor, width // factor), sampler=sampler, steps=steps,
                         guidance_scale=guidance_scale, generator=generator, progress=progress,
                         prediction_type=prediction_type, flow=flow, **kwargs)
        images += decode_latents(vae, latents)
    return images
