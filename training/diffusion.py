"""IDDPM Gaussian diffusion, as PixArt-alpha trains it.

1000 steps, linear betas 1e-4..0.02, the network predicts eps and, in its second half of channels, a value
in [-1, 1] that interpolates the reverse-step log-variance between the posterior variance (v = -1) and beta_t
(v = +1): IDDPM's "learned range". The loss is the eps MSE plus the variational-bound term computed with the
eps half detached, so the bound trains only the variance (Nichol & Dhariwal 2021, and PixArt's
diffusion/model/gaussian_diffusion.py with loss type MSE). The bound is in bits per dimension; at t = 0 it is the
negative log-likelihood of the discretized Gaussian decoder.

`prediction_type="v_prediction"` trains the first half on v = sqrt(abar) eps - sqrt(1 - abar) x_0 instead
(Salimans & Ho 2022), diffusers' name for it. PixArt-alpha predicts eps; v is for small models trained briefly:
an eps model's x_0 estimate at high noise divides its error by sqrt(abar) (about 1/150 at t = 999), and its loss
there is nearly blind to the layout a caption asks for, which is decided exactly there. The variance half and
the bound are unchanged (the bound sees the eps that the v output implies).

A respaced process (IDDPM sampling with 100 steps) is the same class built from a subset of the training
timesteps: its betas are recomputed so that the kept steps have the original cumulative alphas, and the network
is always called with the original timestep (`timestep_map`).

All schedule arithmetic is float64 on the CPU; per-batch coefficients are gathered there and handed to the
tensors' device as float32.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, get_args

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
PredictionType = Literal["epsilon", "v_prediction"]  # diffusers' names; the trainer config and pipeline.json use it
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
BETA_START = 1e-4
BETA_END = 0.02

# Half a bin of 8-bit data scaled to [-1, 1]; the decoder term treats inputs as 256 discrete levels (IDDPM).
_HALF_BIN = 1.0 / 255.0


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                 beta_end: float = BETA_END) -> np.ndarray:
    """Ho et al.'s linear schedule, float64. For other step counts it is rescaled as IDDPM's "linear" schedule is
    (scale = 1000 / num_timesteps), so 1000 steps gives exactly 1e-4..0.02."""
    scale = NUM_TRAIN_TIMESTEPS / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps of a `num_timesteps` process, evenly spread from 0 to num_timesteps - 1 inclusive, as
    IDDPM's (and PixArt's) `space_timesteps(num_timesteps, [steps])` picks them: a fractional stride is added up
    step by step in floating point and each running total rounded (Python's round, half to even). The running
    total is not i * stride: the two differ in the last bits, and so after rounding for 278 of the 1000 step
    counts (21 steps: 499, not 500), which changes the model's inputs; we match the official choice."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    stride = 1.0 if steps == 1 else (num_timesteps - 1) / (steps - 1)
    taken, position = [], 0.0
    for _ in range(steps):
        taken.append(round(position))
        position += stride
    return taken


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that IDDPM (and so PixArt) trains with; we keep it so
    that the decoder term, and the variance it teaches, match the official models."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) of a Gaussian discretized into bins of width 2/255 over [-1, 1], elementwise, in nats. The two
    edge bins extend to -inf and +inf, so data at or beyond the edges takes the tail mass."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - _HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


class GaussianDiffusion:
    """The forward process q, its posterior, the learned-range reverse step p, and the training losses.

    `GaussianDiffusion()` is PixArt's training process; `GaussianDiffusion.respaced(100)` is the IDDPM sampler's.
    Timesteps `t` index this process's steps (0 = the least noisy); the network sees `timestep_map[t]`.
    """

    def __init__(self, betas: np.ndarray | None = None, timestep_map: list[int] | None = None,
                 prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        self.prediction_type = prediction_type
        betas = linear_betas() if betas is None else np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array of values in (0, 1]")
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(self.num_timesteps),
                                         dtype=torch.long)
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map must have one entry per beta")

        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value (IDDPM) so the learned
        # range stays finite there (a one-step process has no t = 1: beta_0 stands in).
        clipped = np.append(posterior_variance[1], posterior_variance[1:]) if len(betas) > 1 else betas.copy()

        f64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
        self.betas = f64(betas)
        self.alphas_cumprod = f64(abar)
        self.alphas_cumprod_prev = f64(abar_prev)
        self.sqrt_alphas_cumprod = f64(np.sqrt(abar))
        self.sqrt_one_minus_alphas_cumprod = f64(np.sqrt(1.0 - abar))
        self.sqrt_recip_alphas_cumprod = f64(np.sqrt(1.0 / abar))
        self.sqrt_recipm1_alphas_cumprod = f64(np.sqrt(1.0 / abar - 1.0))
        self.posterior_variance = f64(posterior_variance)
        self.posterior_log_variance_clipped = f64(np.log(clipped))
        self.posterior_mean_coef1 = f64(betas * np.sqrt(abar_prev) / (1.0 - abar))
        self.posterior_mean_coef2 = f64((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar))
        self.log_betas = f64(np.log(betas))
        # Eps-only models: beta_t, with the posterior variance at t = 0 for a better decoder likelihood (IDDPM).
        self.fixed_large_log_variance = f64(np.log(np.append(clipped[0], betas[1:])))
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def respaced(cls, steps: int, betas: np.ndarray | None = None,
                 prediction_type: str = "epsilon") -> "GaussianDiffusion":
        """The process restricted to `steps` evenly spaced timesteps of the base process (default: PixArt's)."""
        base = cls(betas)
        kept = space_timesteps(base.num_timesteps, steps)
        abar = base.alphas_cumprod.numpy()[kept]
        # Chosen so the respaced cumulative alphas equal the base ones at the kept steps.
        new_betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return cls(new_betas, timestep_map=kept, prediction_type=prediction_type)

    # -- the forward process and its posterior --------------------------------------------------------------------

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The schedule array `name` at timesteps t, shaped [B, 1, 1, ...] to broadcast against `like`, float32 on
        its device (a float32 copy of each array is kept per device, so a training step moves no schedule data)."""
        key = (name, like.device)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = getattr(self, name).to(device=like.device, dtype=torch.float32)
        return table[t.to(like.device).long()].reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A draw from q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def eps_from_prediction(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The eps the network's (first-half) output stands for: itself, or sqrt(abar) v + sqrt(1 - abar) x_t."""
        if self.prediction_type == "epsilon":
            return prediction
        return self._at("sqrt_alphas_cumprod", t, x_t) * prediction + self._at("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t

    def prediction_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network's first half should output for x_t = q_sample(x0, t, noise): eps, or v."""
        if self.prediction_type == "epsilon":
            return noise
        return self._at("sqrt_alphas_cumprod", t, x0) * noise - self._at("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    # -- the reverse process --------------------------------------------------------------------------------------

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from the network's output: `mean`, `log_variance`, `pred_x0`, `eps`.

        An output with 2C channels is (prediction, v) with learned-range variance, v in [-1, 1]; one with C channels
        is the prediction alone (eps or v, as `prediction_type` says), with
        the fixed "large" variance (beta_t, and the posterior variance at t = 0), IDDPM's choice for such models.
        Nothing is clipped: latents are not bounded to [-1, 1].
        """
        channels = x_t.shape[1]
        model_output = model_output.float()
        if model_output.shape[1] == 2 * channels:
            prediction, v = model_output.split(channels, dim=1)
            min_log = self._at("posterior_log_variance_clipped", t, x_t)
            max_log = self._at("log_betas", t, x_t)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        elif model_output.shape[1] == channels:
            prediction = model_output
            log_variance = self._at("fixed_large_log_variance", t, x_t).expand_as(x_t)
        else:
            raise ValueError(f"model output has {model_output.shape[1]} channels; expected {channels} (eps) "
                             f"or {2 * channels} (eps and learned variance) for {channels}-channel latents")
        eps = self.eps_from_prediction(x_t, t, prediction)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    def p_sample(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model_output, x_t, t)
        noise = torch.randn_like(x_t) if noise is None else noise
        last = (t == 0).reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.device)
        return torch.where(last, out["mean"], out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise)

    # -- training -------------------------------------------------------------------------------------------------

    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """One term of the variational bound, bits per dimension, [B]: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0, the discretized Gaussian decoder's NLL of x_0 at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        decoder_nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, decoder_nll, kl)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t, float32 [B]."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return (abar / (1.0 - abar)).float()

    def training_losses(self, model_fn: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
                        min_snr_gamma: float | None = None,
                        x0_target_below: int | None = None) -> dict[str, torch.Tensor]:
        """{"loss", "mse", "vb"}, each [B]: loss = w * mse + vb (PixArt's LossType.MSE; vb is 0 for eps-only models).

        mse is the error of the first half of the output against its target, eps (or v), with two options:

        - `x0_target_below` = T: for t < T the error is measured in x0 space instead, between the clean latent and
          the x0 the output implies, unweighted. This is the official PixArt-alpha `snr=True` training option
          (gaussian_diffusion.py: eps target for t > 249, x0 target below, so T = 250 matches it).
        - `min_snr_gamma`: the Min-SNR weight w (Hang et al. 2023), min(SNR, gamma) / SNR for eps and
          min(SNR, gamma) / (SNR + 1) for v: the nearly clean timesteps, whose errors are largest but matter least
          to a sample, stop dominating the gradient. The official code has it only in its LoRA script (gamma 5).
          "mse" is reported unweighted.

        `model_fn(x_t, timestep, **model_kwargs)` is the network. The bound is computed on a copy of its output
        whose first half is detached, so the bound's gradient reaches only the variance channels and the MSE's
        only the first half.
        """
        if min_snr_gamma is not None and x0_target_below is not None:
            raise ValueError("min_snr_gamma and x0_target_below are two different losses; choose one")
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        output = model_fn(x_t, self.timestep_map.to(t.device)[t], **(model_kwargs or {})).float()
        channels = x0.shape[1]
        prediction = output[:, :channels]
        target = self.prediction_target(x0.float(), t, noise.float())
        if x0_target_below is not None:
            low = (t.to(x_t.device) < x0_target_below).reshape(-1, *([1] * (x0.ndim - 1)))
            pred_x0 = self.predict_x0_from_eps(x_t.float(), t, self.eps_from_prediction(x_t.float(), t, prediction))
            target = torch.where(low, x0.float(), target)
            prediction = torch.where(low, pred_x0, prediction)
        mse = mean_flat((target - prediction) ** 2)
        if output.shape[1] == 2 * channels:
            frozen = torch.cat([output[:, :channels].detach(), output[:, channels:]], dim=1)
            vb = self.vb_terms_bpd(frozen, x0.float(), x_t.float(), t)
        else:
            vb = torch.zeros_like(mse)
        weight = 1.0
        if min_snr_gamma is not None:
            snr = self.snr(t)
            weight = snr.clamp(max=min_snr_gamma) / (snr if self.prediction_type == "epsilon" else snr + 1.0)
        return {"loss": weight * mse + vb, "mse": mse, "vb": vb}

    def sample_timesteps(self, batch_size: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform training timesteps in [0, num_timesteps) (PixArt's UniformSampler)."""
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator,
                          device=generator.device if generator is not None else "cpu")
        return t.to(device) if device is not None else t
