"""Training objectives: what a batch of clean latents costs the model, in one call.

An objective draws its own randomness (timesteps, noise) from the rank's generator, so a resumed run draws the
same values, and returns per-sample tensors: "loss" (what is optimized) plus any diagnostics to log. The trainer
knows nothing else about it; `OBJECTIVES` maps the config's `diffusion.objective` (recorded in pipeline.json) to
a builder.
"""
from __future__ import annotations

from typing import Annotated, Callable

import torch
from pydantic import AfterValidator

from training.diffusion import GaussianDiffusion
from training.flow import RectifiedFlowObjective

ModelFn = Callable[..., torch.Tensor]  # model_fn(x_t, timestep, **model_kwargs) -> network output


class IDDPMObjective:
    """PixArt-alpha's: t ~ U[0, 1000), x_t = q(x_t | x0), loss = MSE on eps (or v) + the variational bound."""

    name = "iddpm"

    def __init__(self, config):
        self.diffusion = GaussianDiffusion(prediction_type=config.diffusion.prediction_type)
        self.loss_options = config.diffusion.loss_options()  # official x0 target (snr) or Min-SNR weighting

    def __call__(self, model_fn: ModelFn, x0: torch.Tensor, model_kwargs: dict,
                 generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device, generator=generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return self.diffusion.training_losses(model_fn, x0, t, model_kwargs, noise=noise, **self.loss_options)


OBJECTIVES: dict[str, Callable] = {"iddpm": IDDPMObjective, "rectified_flow": RectifiedFlowObjective}


def build_objective(config):
    return OBJECTIVES[config.diffusion.objective](config)


def _known(name: str) -> str:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return name


# A config or pipeline.json field naming an objective of the registry.
ObjectiveName = Annotated[str, AfterValidator(_known)]
