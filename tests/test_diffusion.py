"""training.diffusion against closed forms computed here in float64 numpy / math, independently of the module."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.diffusion import GaussianDiffusion, space_timesteps

BETAS = np.linspace(1e-4, 0.02, 1000)  # PixArt's schedule, written out
ABAR = np.cumprod(1.0 - BETAS)


pytestmark = pytest.mark.usefixtures("one_thread")


def abar(t: int) -> float:
    return float(np.prod(1.0 - BETAS[: t + 1]))


def test_schedule_is_pixarts():
    d = GaussianDiffusion()
    assert d.num_timesteps == 1000
    np.testing.assert_allclose(d.betas.numpy(), BETAS, rtol=0, atol=1e-15)
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    for t in (0, 1, 500, 999):
        assert d.alphas_cumprod[t].item() == pytest.approx(abar(t), rel=1e-12)


def test_q_sample_is_the_closed_form_marginal():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 6, 6, generator=g)
    noise = torch.randn(4, 4, 6, 6, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    got = d.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        want = math.sqrt(abar(ti)) * x0[i].double().numpy() + math.sqrt(1 - abar(ti)) * noise[i].double().numpy()
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-5, atol=1e-6)


def test_q_sample_moments_over_many_draws():
    d = GaussianDiffusion()
    x0 = torch.full((20000, 1, 1, 1), 1.5)
    t = torch.full((20000,), 300)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar(300)) * 1.5, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - abar(300), rel=0.03)


def test_posterior_is_the_product_of_gaussians():
    """q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}):
    precision = alpha_t / beta_t + 1 / (1 - abar_{t-1}), mean = var * (sqrt(alpha_t) x_t / beta_t + sqrt(abar_{t-1}) x_0 / (1 - abar_{t-1}))."""
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(2)
    x0, x_t = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([1, 250, 999])
    mean, var, log_var = d.q_posterior(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        beta, alpha, abar_prev = BETAS[ti], 1 - BETAS[ti], abar(ti - 1)
        want_var = 1.0 / (alpha / beta + 1.0 / (1.0 - abar_prev))
        want_mean = want_var * (math.sqrt(alpha) * x_t[i].double().numpy() / beta
                                + math.sqrt(abar_prev) * x0[i].double().numpy() / (1.0 - abar_prev))
        np.testing.assert_allclose(mean[i].numpy(), want_mean, rtol=1e-5, atol=1e-6)
        assert var[i].flatten()[0].item() == pytest.approx(want_var, rel=1e-6)
        assert log_var[i].flatten()[0].item() == pytest.approx(math.log(want_var), rel=1e-6)
    # At t = 0 the posterior is a point mass at x_0; its log-variance is clipped to the t = 1 value (IDDPM).
    mean0, var0, log_var0 = d.q_posterior(x0, x_t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mean0, x0)
    assert var0.abs().max().item() == 0.0
    assert log_var0.flatten()[0].item() == pytest.approx(log_var[0].flatten()[0].item(), rel=1e-6)


def _learned_log_variance(t: int, v: float) -> float:
    """IDDPM learned range: v = -1 -> the posterior variance (its t = 1 value at t = 0), v = +1 -> beta_t."""
    beta_tilde = lambda s: BETAS[s] * (1 - abar(s - 1)) / (1 - abar(s))  # noqa: E731
    lo = math.log(beta_tilde(max(t, 1)))
    hi = math.log(BETAS[t])
    frac = (v + 1) / 2
    return frac * hi + (1 - frac) * lo


def test_vb_at_t0_is_the_discretized_gaussian_decoder_nll():
    """At t = 0 the bound is -log P(x_0) under N(mu, sigma^2) integrated over x_0's 8-bit bin (edges open-ended),
    in bits per dimension; computed here with math.erf (the module uses IDDPM's tanh approximation of the CDF)."""
    d = GaussianDiffusion()
    x0 = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0, 1.7, -2.2, 0.95]).reshape(1, 2, 2, 2)
    eps = torch.tensor([0.1, -0.3, 0.05, 0.2, -0.1, 0.0, 0.4, -0.2]).reshape(1, 2, 2, 2)
    v = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 0.2, -0.8, 0.9]).reshape(1, 2, 2, 2)
    t = torch.tensor([0])
    noise = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    x_t = d.q_sample(x0, t, noise)
    got = d.vb_terms_bpd(torch.cat([eps, v], 1), x0, x_t, t).item()

    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    a0 = abar(0)
    nll = []
    for x, xt, e, vi in zip(x0.flatten().tolist(), x_t.flatten().tolist(), eps.flatten().tolist(), v.flatten().tolist()):
        mu = (xt - math.sqrt(1 - a0) * e) / math.sqrt(a0)  # at t = 0 the model mean is the predicted x_0
        sigma = math.exp(0.5 * _learned_log_variance(0, vi))
        upper = 1.0 if x > 0.999 else cdf((x + 1 / 255 - mu) / sigma)
        lower = 0.0 if x < -0.999 else cdf((x - 1 / 255 - mu) / sigma)
        nll.append(-math.log(max(upper - lower, 1e-12)) / math.log(2))
    assert got == pytest.approx(np.mean(nll), rel=2e-3)


def test_vb_at_t_gt_0_is_the_gaussian_kl():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    eps, v = torch.randn(2, 2, 3, 3, generator=g), torch.rand(2, 2, 3, 3, generator=g) * 2 - 1
    t = torch.tensor([1, 600])
    x_t = d.q_sample(x0, t, noise)
    got = d.vb_terms_bpd(torch.cat([eps, v], 1), x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        beta, alpha, a, a_prev = BETAS[ti], 1 - BETAS[ti], abar(ti), abar(ti - 1)
        xt = x_t[i].double().numpy()
        pred_x0 = (xt - math.sqrt(1 - a) * eps[i].double().numpy()) / math.sqrt(a)
        c1, c2 = beta * math.sqrt(a_prev) / (1 - a), (1 - a_prev) * math.sqrt(alpha) / (1 - a)
        mu_q, var_q = c1 * x0[i].double().numpy() + c2 * xt, beta * (1 - a_prev) / (1 - a)
        mu_p = c1 * pred_x0 + c2 * xt
        var_p = np.exp(np.vectorize(lambda vi: _learned_log_variance(ti, vi))(v[i].double().numpy()))
        kl = 0.5 * (np.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1)
        assert got[i].item() == pytest.approx(kl.mean() / math.log(2), rel=1e-4)


def test_training_losses_split_gradients_between_mean_and_variance():
    """loss = mse + vb; the bound's gradient reaches only the variance channels and the MSE's only eps."""
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    out = torch.randn(3, 8, 4, 4, generator=g).requires_grad_()
    t = torch.tensor([0, 7, 900])
    seen_t = []

    def model_fn(x_t, timestep, **kwargs):
        seen_t.append(timestep)
        return out * 1.0

    losses = d.training_losses(model_fn, x0, t, noise=noise)
    torch.testing.assert_close(seen_t[0], t)
    torch.testing.assert_close(losses["mse"], ((out[:, :4] - noise) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert (losses["vb"] > 0).all()
    losses["vb"].sum().backward(retain_graph=True)
    assert out.grad[:, :4].abs().max().item() == 0.0 and out.grad[:, 4:].abs().max().item() > 0
    out.grad = None
    losses["mse"].sum().backward()
    assert out.grad[:, 4:].abs().max().item() == 0.0 and out.grad[:, :4].abs().max().item() > 0


def official_space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The rule of IDDPM's / PixArt's respace.py for one section, re-derived with numpy: the kept steps are the
    rounded prefix sums of the fractional stride, each prefix sum accumulated in order (np.add.accumulate adds
    left to right, as the official loop's `cur_idx += frac_stride` does)."""
    stride = 1.0 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    totals = np.concatenate([[0.0], np.add.accumulate(np.full(steps - 1, stride))])
    return sorted({round(float(v)) for v in totals})


def test_respacing_picks_the_official_timesteps_for_every_step_count():
    rounded_products_differ = 0
    for steps in range(1, 1001):
        kept = space_timesteps(1000, steps)
        assert kept == official_space_timesteps(1000, steps), steps
        assert len(kept) == steps and kept[0] == 0 and (steps == 1 or kept[-1] == 999)
        stride = 999 / max(steps - 1, 1)
        rounded_products_differ += kept != [round(i * stride) for i in range(steps)]
    # The count and the example the side-by-side comparison with the official code found.
    assert rounded_products_differ == 278
    assert space_timesteps(1000, 21)[10] == 499


def test_respacing_keeps_the_cumulative_alphas():
    assert space_timesteps(1000, 100)[:3] == [0, 10, 20] and space_timesteps(1000, 100)[-1] == 999
    assert space_timesteps(1000, 1) == [0]
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(1000, 0)
    d = GaussianDiffusion.respaced(100)
    kept = space_timesteps(1000, 100)
    assert d.num_timesteps == 100 and d.timestep_map.tolist() == kept
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ABAR[kept], rtol=1e-12)
    # The network is called with the original timestep.
    seen = []
    d.training_losses(lambda x, ts: seen.append(ts) or torch.zeros(1, 8, 2, 2), torch.zeros(1, 4, 2, 2),
                      torch.tensor([50]))
    assert seen[0].tolist() == [kept[50]]


def test_eps_only_models_get_the_fixed_large_variance_and_no_bound():
    d = GaussianDiffusion()
    x_t, t = torch.zeros(2, 4, 2, 2), torch.tensor([0, 100])
    out = d.p_mean_variance(torch.zeros(2, 4, 2, 2), x_t, t)
    beta_tilde_1 = BETAS[1] * (1 - abar(0)) / (1 - abar(1))
    assert out["log_variance"][0, 0, 0, 0].item() == pytest.approx(math.log(beta_tilde_1), rel=1e-6)
    assert out["log_variance"][1, 0, 0, 0].item() == pytest.approx(math.log(BETAS[100]), rel=1e-6)
    losses = d.training_losses(lambda x, ts: torch.zeros_like(x), torch.zeros(2, 4, 2, 2), t)
    assert (losses["vb"] == 0).all()
    with pytest.raises(ValueError, match="channels"):
        d.p_mean_variance(torch.zeros(2, 5, 2, 2), x_t, t)


def test_loss_falls_when_fitting_a_tiny_dataset():
    """A tiny PixArt fits four fixed latents: the loss on a fixed (t, noise) evaluation set must fall clearly."""
    from training.model import PRESETS, PixArt

    torch.manual_seed(0)
    model = PixArt(PRESETS["tiny"])
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(4, 4, 8, 8, generator=g).clamp(-2, 2)
    caption = torch.randn(4, 6, 32, generator=g)
    kwargs = {"caption": caption, "caption_mask": torch.ones(4, 6, dtype=torch.bool)}
    eval_t = torch.tensor([0, 50, 200, 400, 600, 800, 950, 999]).repeat_interleave(2)
    eval_noise = torch.randn(16, 4, 8, 8, generator=g)
    eval_x0 = x0.repeat(4, 1, 1, 1)
    eval_kwargs = {k: v.repeat(4, *([1] * (v.ndim - 1))) for k, v in kwargs.items()}

    def eval_loss() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            losses = d.training_losses(model, eval_x0, eval_t, eval_kwargs, noise=eval_noise)
        model.train()
        return {k: v.mean().item() for k, v in losses.items()}

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        t = d.sample_timesteps(4, generator=g)
        loss = d.training_losses(model, x0, t, kwargs, noise=torch.randn(x0.shape, generator=g))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after["mse"] < 0.6 * before["mse"], (before, after)
    assert after["loss"] < 0.7 * before["loss"], (before, after)


def test_v_prediction_target_and_its_eps():
    """v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022), and the eps it implies is the noise, to float error."""
    d = GaussianDiffusion(prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    a = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))[t].float().reshape(-1, 1, 1, 1)
    v = d.prediction_target(x0, t, noise)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.eps_from_prediction(x_t, t, v), noise, atol=1e-5, rtol=0)
    # An oracle v model has zero MSE, and the same bound as an oracle eps model with the same variance output.
    var = torch.rand(6, 4, 4, 4, generator=g) * 2 - 1
    oracle_v = d.training_losses(lambda x, ts: torch.cat([v, var], 1), x0, t, noise=noise)
    oracle_eps = GaussianDiffusion().training_losses(lambda x, ts: torch.cat([noise, var], 1), x0, t, noise=noise)
    assert oracle_v["mse"].abs().max() < 1e-10
    torch.testing.assert_close(oracle_v["vb"], oracle_eps["vb"], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianDiffusion(prediction_type="x0")


def test_min_snr_weight():
    """min(SNR, gamma) / SNR on the eps MSE, min(SNR, gamma) / (SNR + 1) on the v MSE."""
    t = torch.tensor([5, 300, 999])
    a = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()]
    snr = a / (1 - a)
    x0 = torch.zeros(3, 4, 2, 2)
    noise = torch.ones(3, 4, 2, 2)
    for kind, denominator in (("epsilon", snr), ("v_prediction", snr + 1)):
        d = GaussianDiffusion(prediction_type=kind)
        zero = lambda x, ts: torch.zeros(3, 4, 2, 2)  # noqa: E731
        plain = d.training_losses(zero, x0, t, noise=noise)
        weighted = d.training_losses(zero, x0, t, noise=noise, min_snr_gamma=5.0)
        expected = np.minimum(snr, 5.0) / denominator
        torch.testing.assert_close(weighted["loss"] / plain["mse"], torch.tensor(expected, dtype=torch.float32))
        torch.testing.assert_close(weighted["mse"], plain["mse"])


def test_x0_target_below_is_the_official_snr_loss():
    """Official `snr=True` (PixArt-alpha gaussian_diffusion.py): t > 249 eps target, t <= 249 the clean latent
    against x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), unweighted. Written out here in float64 numpy."""
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 100, 249, 250, 700, 999])
    x0 = torch.randn(6, 4, 2, 2, generator=g)
    noise = torch.randn(6, 4, 2, 2, generator=g)
    eps_pred = torch.randn(6, 8, 2, 2, generator=g)  # eps and variance halves
    d = GaussianDiffusion()
    got = d.training_losses(lambda x, ts: eps_pred, x0, t, noise=noise, x0_target_below=250)
    for i, ti in enumerate(t.tolist()):
        a = ABAR[ti]
        x_t = math.sqrt(a) * x0[i].double().numpy() + math.sqrt(1 - a) * noise[i].double().numpy()
        e = eps_pred[i, :4].double().numpy()
        if ti <= 249:
            want = np.mean((x0[i].double().numpy() - (x_t - math.sqrt(1 - a) * e) / math.sqrt(a)) ** 2)
        else:
            want = np.mean((noise[i].double().numpy() - e) ** 2)
        assert got["mse"][i].item() == pytest.approx(want, rel=1e-4)
    plain = d.training_losses(lambda x, ts: eps_pred, x0, t, noise=noise)
    torch.testing.assert_close(got["vb"], plain["vb"])  # the variance bound is untouched
    torch.testing.assert_close(got["loss"], got["mse"] + got["vb"])
    with pytest.raises(ValueError, match="choose one"):
        d.training_losses(lambda x, ts: eps_pred, x0, t, noise=noise, x0_target_below=250, min_snr_gamma=5.0)
