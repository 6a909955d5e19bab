"""Rectified flow: the second training objective beside IDDPM (training/diffusion.py), as SD3 trains it.

    x_t = (1 - t) x_0 + t eps,    t in (0, 1),    the network predicts the velocity  v = dx_t/dt = eps - x_0

A straight line from the data (t = 0) to the noise (t = 1); sampling integrates dx/dt = v from t = 1 to 0. The loss
is the plain MSE to eps - x_0 (SD3's "rf/lognorm(0.00, 1.00)", the best of the 61 formulations it compared). The
training times come from a logit-normal, t = sigmoid(m + s n) with n ~ N(0, 1), which puts the samples in the
middle of the path where the velocity is hardest to predict, then through the resolution-dependent shift

    t -> a t / (1 + (a - 1) t),    a = shift, or sqrt(tokens / base_tokens) when shift is "auto"

(SD3 section 5.3.2: more pixels carry the same signal at a higher noise level, so a larger picture spends more of
its steps at high noise). `shift` is the same map diffusers' flow schedulers apply to their sigmas, so training and
sampling agree. The network sees the time as `1000 t`, the scale of diffusers' flow schedulers' timesteps and of the
IDDPM timesteps the PixArt time embedding was built for, so a stage-1 IDDPM model can start a flow stage 2.

A model whose output has twice the latent channels (PixArt's learned-sigma layout) is trained on its first half;
the second is unused by this objective. Sampling uses diffusers' schedulers: FlowMatchEulerDiscreteScheduler
("euler"), FlowMatchHeunDiscreteScheduler ("heun", second order, two calls per step) and
DPMSolverMultistepScheduler with flow sigmas and flow prediction ("dpm++", second order, one call per step; what
training.export writes into an exported pipeline, since PixArtAlphaPipeline needs a scheduler with
`init_noise_sigma`).

The equivalence with IDDPM (tests/test_flow.py): IDDPM's x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps is the flow path
scaled by 1 / (sqrt(abar) + sqrt(1 - abar)) at t = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar)), so the two
probability-flow ODEs have the same trajectories up to that scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from training.diffusion import NUM_TRAIN_TIMESTEPS, mean_flat

FLOW_SAMPLERS = ("dpm++", "euler", "heun")
SD3_BASE_TOKENS = 256
# The trainer config's diffusion fields that pipeline.json records, so that sampling and export follow the objective.
FLOW_PIPELINE_FIELDS = {"objective", "logit_mean", "logit_std", "flow_shift", "flow_base_tokens"}  # SD3's 256 px pictures: 32x32 latents, patch 2


@dataclass(frozen=True)
class RectifiedFlow:
    """The objective's settings and what follows from them: training times and losses, and the schedulers."""

    logit_mean: float = 0.0  # SD3's lognorm(0, 1)
    logit_std: float = 1.0
    shift: float | Literal["auto"] = "auto"  # a fixed shift, or sqrt(image tokens / base_tokens)
    base_tokens: int = SD3_BASE_TOKENS
    patch_size: int = 2  # the model's: image tokens = latent cells / patch_size^2

    def __post_init__(self) -> None:
        if not self.logit_std > 0:
            raise ValueError(f"logit_std: must be > 0, got {self.logit_std!r}")
        if self.shift != "auto" and not (isinstance(self.shift, (int, float)) and self.shift > 0):
            raise ValueError(f"shift: must be a number > 0 or 'auto', got {self.shift!r}")
        if self.base_tokens < 1:
            raise ValueError(f"base_tokens: must be >= 1, got {self.base_tokens!r}")

    # -- time ---------------------------------------------------------------------------------------------------

    def tokens(self, latent_hw) -> int:
        """Image tokens of a latent of size latent_hw."""
        return (int(latent_hw[0]) // self.patch_size) * (int(latent_hw[1]) // self.patch_size)

    def shift_for(self, tokens: int) -> float:
        """The time shift for pictures of `tokens` image tokens (latent cells / patch^2)."""
        return float(self.shift) if self.shift != "auto" else math.sqrt(tokens / self.base_tokens)

    @staticmethod
    def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
        """a t / (1 + (a - 1) t): monotone, fixes 0 and 1, and moves the middle towards 1 (noise) for a > 1."""
        return shift * t / (1.0 + (shift - 1.0) * t)

    def sample_timesteps(self, batch_size: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Logit-normal times in (0, 1), float32 [B], before the shift (which depends on the picture size and is
        applied in `training_losses`, where the latents are known)."""
        n = torch.randn(batch_size, generator=generator,
                        device=generator.device if generator is not None else "cpu", dtype=torch.float64)
        t = torch.sigmoid(self.logit_mean + self.logit_std * n).float()
        return t.to(device) if device is not None else t

    # -- training -----------------------------------------------------------------------------------------------

    @staticmethod
    def interpolate(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t eps, t [B] broadcast over the other dimensions."""
        t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1.0 - t) * x0 + t * noise

    def training_losses(self, model_fn: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"loss", "mse", "vb"}, each [B] (vb is zero: the interface of GaussianDiffusion.training_losses).

        `t` comes from `sample_timesteps` and is shifted here for the batch's picture size.
        `model_fn(x_t, 1000 t, **model_kwargs)` is the network; its first C output channels are the velocity.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        t = self.shifted(t.to(x0.device, torch.float32), self.shift_for(self.tokens(x0.shape[-2:])))
        x_t = self.interpolate(x0, t, noise)
        output = model_fn(x_t, t * NUM_TRAIN_TIMESTEPS, **(model_kwargs or {})).float()
        velocity = output[:, :x0.shape[1]]
        mse = mean_flat((noise.float() - x0.float() - velocity) ** 2)
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}

    # -- sampling -----------------------------------------------------------------------------------------------

    def scheduler(self, sampler: str, tokens: int):
        """The diffusers scheduler for `sampler` ("dpm++", "euler" or "heun") at this objective's shift."""
        shift = self.shift_for(tokens)
        if sampler == "euler":
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        if sampler == "heun":
            from diffusers import FlowMatchHeunDiscreteScheduler

            return FlowMatchHeunDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        if sampler == "dpm++":
            from training.sampling import dpm_solver_scheduler

            # Sana's sampler: DPM-Solver++(2M) on the flow path (sigma = t, alpha = 1 - t), velocity input.
            return dpm_solver_scheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
        raise ValueError(f"sampler: {sampler!r} is not a rectified-flow sampler; choose one of "
                         f"{', '.join(FLOW_SAMPLERS)}")

    def sample(self, velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
               sampler: str = "dpm++", steps: int = 20, progress: bool = False) -> torch.Tensor:
        """Integrate from noise `x` [B, C, h, w] (t = 1) to data (t = 0) with `velocity(x_t, 1000 t [B]) -> v`."""
        from tqdm.auto import tqdm

        scheduler = self.scheduler(sampler, self.tokens(x.shape[-2:]))
        scheduler.set_timesteps(steps, device=x.device)
        batch = x.shape[0]
        for timestep in tqdm(scheduler.timesteps, desc=f"flow {sampler}", disable=not progress, leave=False):
            v = velocity(x, timestep.float().expand(batch))
            x = scheduler.step(v, timestep, x, return_dict=False)[0]
        return x


class RectifiedFlowObjective:
    """The trainer's `diffusion.objective: rectified_flow` (training.objectives): logit-normal times and noise from
    the rank's generator, then RectifiedFlow.training_losses."""

    name = "rectified_flow"

    def __init__(self, config):
        self.flow = flow_from_config(config.diffusion, config.pixart_config().patch_size)

    def __call__(self, model_fn: Callable[..., torch.Tensor], x0: torch.Tensor, model_kwargs: dict,
                 generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        t = self.flow.sample_timesteps(x0.shape[0], x0.device, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return self.flow.training_losses(model_fn, x0, t, model_kwargs, noise=noise)


def flow_from_config(config, patch_size: int) -> RectifiedFlow | None:
    """The RectifiedFlow that a config-like object (the trainer's `diffusion` section, or a PipelineInfo read from
    pipeline.json) describes, or None for an IDDPM one."""
    if getattr(config, "objective", "iddpm") != "rectified_flow":
        return None
    return RectifiedFlow(logit_mean=config.logit_mean, logit_std=config.logit_std, shift=config.flow_shift,
                         base_tokens=config.flow_base_tokens, patch_size=patch_size)
