"""Rectified flow (training/flow.py) against closed forms: the path and its velocity, the logit-normal times and
their shift (diffusers' sigma shift as the reference), oracle velocity models that must land on the data exactly,
and the same Gaussian data sampled as a flow and as an IDDPM model landing on the same points."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.diffusion import GaussianDiffusion
from training.flow import RectifiedFlow
from training.sampling import sample


class Oracle(torch.nn.Module):
    """A 'network' given by a closed form f(x, timestep) (no parameters: the samplers treat it as float32 on CPU)."""

    def __init__(self, fn, channels: int = 2):
        super().__init__()
        self.fn = fn
        self.config = type("Config", (), {"in_channels": channels, "patch_size": 1})()

    def forward(self, x, timestep, **_):
        return self.fn(x, timestep.float().reshape(-1, *([1] * (x.ndim - 1))))


def gaussian_flow_velocity(mu: float, s: float):
    """E[eps - x0 | x_t] for x0 ~ N(mu, s^2) per coordinate and x_t = (1 - t) x0 + t eps (t = timestep / 1000)."""
    def v(x, timestep):
        t = timestep / 1000.0
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        centred = x - (1 - t) * mu
        return t / var * centred - (mu + (1 - t) * s ** 2 / var * centred)
    return v


def test_path_and_velocity_are_the_straight_line():
    flow = RectifiedFlow()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    assert torch.equal(flow.interpolate(x0, torch.zeros(3), noise), x0)
    assert torch.equal(flow.interpolate(x0, torch.ones(3), noise), noise)
    t, h = torch.tensor([0.2, 0.5, 0.9]), 1e-3
    derivative = (flow.interpolate(x0.double(), t.double() + h, noise.double())
                  - flow.interpolate(x0.double(), t.double() - h, noise.double())) / (2 * h)
    torch.testing.assert_close(derivative, (noise - x0).double())


def test_the_loss_is_the_velocity_error_at_the_shifted_time():
    flow = RectifiedFlow(shift=3.0, patch_size=1)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    u = torch.tensor([0.1, 0.4, 0.6, 0.95])
    seen = {}

    def model(x_t, timestep):
        seen["x_t"], seen["timestep"] = x_t, timestep
        return torch.cat([noise - x0 + 0.5, torch.full_like(x0, 7.0)], dim=1)  # the second half is ignored

    out = flow.training_losses(model, x0, u, noise=noise)
    t = 3 * u / (1 + 2 * u)
    torch.testing.assert_close(seen["timestep"], 1000 * t)
    torch.testing.assert_close(seen["x_t"], (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise)
    torch.testing.assert_close(out["loss"], torch.full((4,), 0.25))
    assert torch.equal(out["vb"], torch.zeros(4))


def test_logit_normal_times_follow_their_distribution():
    flow = RectifiedFlow(logit_mean=0.5, logit_std=0.8)
    t = flow.sample_timesteps(200_000, generator=torch.Generator().manual_seed(0)).double()
    assert 0 < t.min() and t.max() < 1
    logits = torch.log(t / (1 - t))
    assert abs(logits.mean().item() - 0.5) < 0.01 and abs(logits.std().item() - 0.8) < 0.01
    # P(t <= 0.5) = Phi((0 - 0.5) / 0.8)
    expected = 0.5 * (1 + math.erf((0 - 0.5) / 0.8 / math.sqrt(2)))
    assert abs((t <= 0.5).double().mean().item() - expected) < 0.005


@given(shift=st.floats(0.1, 10.0), tokens=st.integers(1, 16384))
@settings(max_examples=50, deadline=None)
def test_shift_is_diffusers_sigma_shift_and_auto_follows_the_resolution(shift, tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0)
    ours = RectifiedFlow.shifted(unshifted.sigmas[:-1].double(), shift)
    np.testing.assert_allclose(ours.numpy(), reference.sigmas[:-1].double().numpy(), rtol=1e-5)
    assert RectifiedFlow(shift="auto", base_tokens=256).shift_for(tokens) == pytest.approx(math.sqrt(tokens / 256))
    assert RectifiedFlow(shift=shift).shift_for(tokens) == shift


@pytest.mark.parametrize("sampler,tol", [("euler", 1e-5), ("heun", 1e-5), ("dpm++", 5e-3)])
def test_an_oracle_velocity_reaches_a_point_mass_exactly(sampler, tol):
    """Data = one point c: the exact velocity is (x_t - c) / t, every path is straight, and every solver lands on c
    (the first-order step is already exact on straight paths). diffusers' DPM-Solver rounds its flow timesteps to
    integers, so the network (here the oracle) is told t only to within 5e-4: hence its tolerance."""
    c = torch.tensor([1.5, -0.5]).reshape(1, 2, 1, 1)
    model = Oracle(lambda x, timestep: (x - c) / (timestep / 1000.0))
    noise = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    x = sample(model, (3, 3), noise=noise, sampler=sampler, steps=6, flow=RectifiedFlow(shift=2.0, patch_size=1))
    torch.testing.assert_close(x, c.expand_as(x), atol=tol, rtol=0)


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 1000, 4e-3), ("heun", 30, 1e-3), ("dpm++", 100, 1e-2)])
def test_an_oracle_velocity_of_gaussian_data_lands_on_the_closed_form_map(sampler, steps, tol):
    """x0 ~ N(mu, s^2): the probability-flow ODE maps noise z to mu + s z (x_t = (1 - t) mu + sqrt((1 - t)^2 s^2
    + t^2) z all along), so each sample lands on its own closed-form point, not only on the right distribution.
    (diffusers' flow DPM-Solver starts at t = 0.999 and tells the network integer timesteps: a looser bound.)"""
    mu, s = 1.0, 0.5
    noise = torch.randn(16, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    x = sample(Oracle(gaussian_flow_velocity(mu, s)), (2, 2), noise=noise, sampler=sampler, steps=steps,
               flow=RectifiedFlow(shift=1.0, patch_size=1))
    torch.testing.assert_close(x, mu + s * noise, atol=tol, rtol=0)


def test_flow_and_iddpm_models_of_the_same_data_follow_the_same_ode():
    """The IDDPM oracle eps of x0 ~ N(mu, s^2) under PixArt's schedule, sampled by our IDDPM DPM-Solver++, and the
    flow oracle velocity, sampled by our flow Heun sampler, start from the same noise and land on the same points.

    Why they must: IDDPM's x = sqrt(a) x0 + sqrt(1 - a) eps is the flow state at t = sqrt(1 - a) / (sqrt(a) +
    sqrt(1 - a)) times (sqrt(a) + sqrt(1 - a)); both ODEs carry the same conditional expectations, so a trajectory
    of one is a trajectory of the other after that change of time and scale. The trajectories are also checked
    pointwise through that map, halfway."""
    mu, s = 0.8, 0.6
    diffusion = GaussianDiffusion()
    abar = diffusion.alphas_cumprod.float()

    def eps_oracle(x, timestep):
        a = abar[timestep.long().clamp(0, 999)]
        var = a * s ** 2 + 1 - a
        return (1 - a).sqrt() / var * (x - a.sqrt() * mu)

    noise = torch.randn(32, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    iddpm = sample(Oracle(eps_oracle), (2, 2), noise=noise, sampler="dpm++", steps=50)
    flow = sample(Oracle(gaussian_flow_velocity(mu, s)), (2, 2), noise=noise, sampler="heun", steps=30,
                  flow=RectifiedFlow(shift=1.0, patch_size=1))
    # IDDPM starts at abar_999 = 4e-5, not at pure noise: sqrt(abar) mu ~ 0.005 apart at the start.
    torch.testing.assert_close(iddpm, flow, atol=2e-2, rtol=0)
    torch.testing.assert_close(flow, mu + s * noise, atol=1e-3, rtol=0)

    # Pointwise through the map: integrate both halfway with many small Euler steps of their own ODEs.
    a_mid = float(abar[500])
    k = math.sqrt(a_mid) + math.sqrt(1 - a_mid)
    t_mid = math.sqrt(1 - a_mid) / k
    v = gaussian_flow_velocity(mu, s)
    x, t = noise.clone(), 1.0
    for t_next in np.linspace(1.0, t_mid, 2001)[1:]:
        x = x + (t_next - t) * v(x, torch.tensor(1000.0 * t))
        t = t_next
    # The IDDPM state at a_mid along the same trajectory, from the closed form of the Gaussian ODE.
    iddpm_mid = math.sqrt(a_mid) * mu + math.sqrt(a_mid * s ** 2 + 1 - a_mid) * noise
    torch.testing.assert_close(k * x, iddpm_mid, atol=1e-3, rtol=0)


def test_objective_from_the_trainer_config_and_sampler_checks(tmp_path):
    from training.objectives import build_objective
    from training.train_config import DiffusionSection, TrainConfig

    def config(**diffusion):
        return TrainConfig(stage=2, model={"preset": "tiny", "overrides": {"patch_size": 4}}, data={"root": "x"},
                           run={"output_dir": str(tmp_path), "steps": 1}, diffusion=diffusion)

    assert build_objective(config()).name == "iddpm"
    objective = build_objective(config(objective="rectified_flow", flow_shift=3.0, logit_std=0.5))
    flow = objective.flow
    assert isinstance(flow, RectifiedFlow) and flow.shift == 3.0 and flow.logit_std == 0.5 and flow.patch_size == 4
    # The objective draws its times and noise from the generator it is given: the same seed, the same loss.
    x0 = torch.randn(2, 4, 8, 8)
    model_fn = lambda x, t, **_: x * (t[:, None, None, None] / 1000)  # noqa: E731
    losses = [objective(model_fn, x0, {}, torch.Generator().manual_seed(7))["loss"] for _ in range(2)]
    assert torch.equal(losses[0], losses[1])
    with pytest.raises(ValueError, match="prediction_type is an IDDPM setting"):
        DiffusionSection(objective="rectified_flow", prediction_type="v_prediction")
    model = Oracle(lambda x, t: x)
    with pytest.raises(ValueError, match="rectified-flow"):
        sample(model, (2, 2), batch_size=1, sampler="euler")
    with pytest.raises(ValueError, match="not a rectified-flow sampler"):
        sample(model, (2, 2), batch_size=1, sampler="iddpm", flow=RectifiedFlow(patch_size=1))
