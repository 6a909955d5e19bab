"""training.sampling and training.grid: samplers on models whose exact eps is known in closed form, guidance
against separate conditional/unconditional passes, DPM-Solver++ side by side with diffusers' PixArtAlphaPipeline,
and text-to-image generation through the tiny T5 / VAE fixtures."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from training.grid import image_grid, save_png
from training.model import PRESETS, PixArt
from training.sampling import (GuidedDenoiser, classifier_free_guidance, dpm_solver_scheduler, generate_images,
                               sample)

BETAS = np.linspace(1e-4, 0.02, 1000)
ABAR = np.cumprod(1.0 - BETAS)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_pixart(preset: str, seed: int = 0) -> PixArt:
    """A PixArt whose zero-initialized output layers are perturbed, so it depends on its caption/class."""
    torch.manual_seed(seed)
    model = PixArt(PRESETS[preset]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def gaussian_data_eps(mu: float, s: float, abar_of: Callable[[torch.Tensor], np.ndarray]):
    """Exact eps*(x_t, t) when the data are N(mu, s^2) per element: x_t ~ N(sqrt(a) mu, a s^2 + 1 - a), so
    eps* = -sqrt(1 - a) * score = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a). s = 0 is a point mass at mu."""
    def eps(x, timestep):
        a = torch.as_tensor(abar_of(timestep), dtype=torch.float32).reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)
    return eps


# -- samplers on analytic models ------------------------------------------------------------------------------------


def test_dpm_solver_on_a_point_mass_lands_on_it():
    x0 = torch.linspace(-1.5, 1.5, 4 * 8 * 8).reshape(1, 4, 8, 8)
    abar = torch.from_numpy(ABAR)

    def model(x, timestep, **_):
        a = abar[timestep.long()].float().reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = sample(model, (8, 8), batch_size=3, latent_channels=4, sampler="dpm++", steps=20, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


def _v_of(eps_model, abar_of):
    """The v-prediction model equivalent to an eps model: v = (eps - sqrt(1 - a) x_t) / sqrt(a), written from
    x_t = sqrt(a) x0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) x0."""
    def v(x, timestep, **kw):
        a = torch.as_tensor(abar_of(timestep), dtype=torch.float32).reshape(-1, 1, 1, 1)
        return (eps_model(x, timestep) - (1 - a).sqrt() * x) / a.sqrt()
    return v


@pytest.mark.parametrize("sampler, steps", [("dpm++", 20), ("iddpm", 100)])
def test_v_prediction_models_land_on_a_point_mass(sampler, steps):
    x0 = torch.linspace(-1.5, 1.5, 4 * 8 * 8).reshape(1, 4, 8, 8)
    eps = gaussian_data_eps(x0, 0.0, lambda t: ABAR[t.long().cpu().numpy()])
    v = _v_of(eps, lambda t: ABAR[t.long().cpu().numpy()])
    out = sample(v, (8, 8), batch_size=2, latent_channels=4, sampler=sampler, steps=steps, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), prediction_type="v_prediction")
    torch.testing.assert_close(out, x0.expand(2, -1, -1, -1), atol=2e-3, rtol=0)
    if sampler == "iddpm":
        return  # ancestral steps near t = 0, where v ~ eps, repair even a misread model on a point mass
    # The same model read as an eps model does not land there.
    wrong = sample(v, (8, 8), batch_size=2, latent_channels=4, sampler=sampler, steps=steps, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert (wrong - x0).abs().max() > 0.5


def test_v_prediction_follows_the_same_probability_flow_ode():
    mu, s = 0.7, 0.5
    abar_of = lambda t: ABAR[t.long().cpu().numpy()]  # noqa: E731
    eps = gaussian_data_eps(mu, s, abar_of)
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    by_eps = sample(lambda x, t, **_: eps(x, t), (8, 8), noise=noise, latent_channels=4, steps=20, guidance_scale=1.0)
    by_v = sample(_v_of(eps, abar_of), (8, 8), noise=noise, latent_channels=4, steps=20, guidance_scale=1.0,
                  prediction_type="v_prediction")
    torch.testing.assert_close(by_v, by_eps, atol=1e-3, rtol=0)


def test_dpm_solver_converges_to_the_probability_flow_ode_solution():
    """For N(mu, s^2) data the probability-flow ODE keeps z = (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a) fixed, so
    each sample must end at mu + s z(x_T): the solver's error against that falls with steps and is ~1e-3 at 50."""
    mu, s = 0.7, 0.5
    eps = gaussian_data_eps(mu, s, lambda t: ABAR[t.long().cpu().numpy()])
    noise = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a_T = ABAR[999]
    exact = mu + s * (noise - math.sqrt(a_T) * mu) / math.sqrt(a_T * s * s + 1 - a_T)
    errors = [(sample(lambda x, t, **_: eps(x, t), (8, 8), noise=noise, latent_channels=4, sampler="dpm++",
                      steps=n, guidance_scale=1.0) - exact).abs().max().item() for n in (10, 20, 50)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 5e-3, errors


def _respaced_100():
    """IDDPM's 100-step respacing, written out: kept steps round(i * 999 / 99) and their betas."""
    kept = [round(i * 999 / 99) for i in range(100)]
    abar = ABAR[kept]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1 - abar / abar_prev
    post = betas * (1 - abar_prev) / (1 - abar)
    return kept, abar, abar_prev, betas, post


def test_iddpm_on_a_point_mass_lands_on_it():
    kept, abar, *_ = _respaced_100()
    index = {t: i for i, t in enumerate(kept)}
    x0 = torch.linspace(-2, 2, 4 * 4 * 6).reshape(1, 4, 4, 6)

    def model(x, timestep, **_):
        a = torch.tensor(abar[[index[int(t)] for t in timestep]], dtype=torch.float32).reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, -torch.ones_like(x)], dim=1)  # v = -1: the posterior variance, exact for a point

    out = sample(model, (4, 6), batch_size=2, latent_channels=4, sampler="iddpm", steps=100, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, x0.expand(2, -1, -1, -1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("v_mode, exact", [("optimal", True), (-1.0, False), (1.0, False)])
def test_iddpm_with_the_exact_reverse_variance_samples_the_data_distribution(v_mode, exact):
    """For N(mu, s^2) data each reverse step is exactly Gaussian, with variance beta_tilde + c1^2 Var(x_0 | x_t).
    Expressed as the model's learned-range v, 100 respaced ancestral steps must reproduce N(mu, s^2); either end
    of the range (v = -1 or +1) must miss the standard deviation."""
    mu, s = 0.7, 0.5
    kept, abar, abar_prev, betas, post = _respaced_100()
    index = {t: i for i, t in enumerate(kept)}
    lo, hi = np.log(np.append(post[1], post[1:])), np.log(betas)
    c1 = betas * np.sqrt(abar_prev) / (1 - abar)
    eps_of = gaussian_data_eps(mu, s, lambda t: abar[[index[int(k)] for k in t]])

    def model(x, timestep, **_):
        k = [index[int(t)] for t in timestep]
        eps = eps_of(x, timestep)
        if v_mode != "optimal":
            return torch.cat([eps, torch.full_like(x, v_mode)], dim=1)
        a = abar[k]
        variance = post[k] + c1[k] ** 2 * s * s * (1 - a) / (a * s * s + 1 - a)
        v = 2 * (np.log(variance) - lo[k]) / (hi[k] - lo[k]) - 1
        return torch.cat([eps, torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1, 1).expand_as(x)], dim=1)

    out = sample(model, (16, 16), batch_size=32, latent_channels=4, sampler="iddpm", guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(3))  # 32768 draws; std's standard error ~0.002
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert (abs(out.std().item() - s) < 0.005) is exact, out.std().item()


# -- classifier-free guidance ---------------------------------------------------------------------------------------


def test_guidance_formula():
    cond, uncond = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([0.5, 2.5, 1.0])
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 4.5), torch.tensor([2.75, 0.25, -17.0]))


@pytest.mark.parametrize("preset", ["tiny-MS", "tiny-class"])
def test_guided_denoiser_matches_separate_passes_on_all_channels(preset):
    """One batched forward (cond + null via force_drop_ids) equals two separate passes; every eps channel is
    guided (the official code guides 3 of 4); the variance channels are the conditional pass's."""
    model = random_pixart(preset)
    g = torch.Generator().manual_seed(4)
    B = 3
    x, t = torch.randn(B, 4, 8, 6, generator=g), torch.tensor([999, 500, 3])
    if model.config.text_conditioned:
        mask = torch.ones(B, 16, dtype=torch.bool)
        mask[1, 5:] = False
        cond = {"caption": torch.randn(B, 16, 32, generator=g), "caption_mask": mask,
                "resolution": torch.tensor([[64.0, 48.0]] * B), "aspect_ratio": torch.tensor([[64 / 48]] * B)}
    else:
        cond = {"class_labels": torch.tensor([0, 3, 9])}
    with torch.no_grad():
        c = model(x, t, **cond)
        u = model(x, t, force_drop_ids=torch.ones(B, dtype=torch.bool), **cond)
        if not model.config.text_conditioned:  # the null class is row num_classes
            torch.testing.assert_close(u, model(x, t, class_labels=torch.full((B,), 10)))
        assert (c[:, :4] - u[:, :4]).abs().amax(dim=(0, 2, 3)).min() > 1e-4  # every channel is conditional
        guided = GuidedDenoiser(model, cond, 4.5)(x, t)
        plain = GuidedDenoiser(model, cond, 1.0)(x, t)
    torch.testing.assert_close(guided[:, :4], u[:, :4] + 4.5 * (c[:, :4] - u[:, :4]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[:, 4:], c[:, 4:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain, c)


def tiny_pipeline(model: PixArt, scheduler):
    """diffusers' PixArtAlphaPipeline around `model` (converted) with a tiny random T5 and VAE."""
    from diffusers import AutoencoderKL, PixArtAlphaPipeline
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    from training.checkpoint import to_diffusers

    text_encoder = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                           is_encoder_decoder=False))
    vae = AutoencoderKL(latent_channels=4, norm_num_groups=8, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = PixArtAlphaPipeline(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae,
                               transformer=to_diffusers(model), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dpm_solver_with_guidance_matches_diffusers_pixart_pipeline():
    """The same tiny network as a diffusers PixArtTransformer2DModel in PixArtAlphaPipeline (its guidance, its
    learned-sigma handling, our scheduler config) from the same initial latents gives the same latents."""
    model = random_pixart("tiny")
    pipe = tiny_pipeline(model, dpm_solver_scheduler())
    g = torch.Generator().manual_seed(5)
    B, L = 2, 16
    caption = torch.randn(B, L, 32, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 9:] = 0
    z = torch.randn(B, 4, 8, 12, generator=g)
    # Our null pass is the first L rows of the null embedding under the caption's mask (as the official
    # forward_with_cfg: one mask for both halves).
    null = model.y_embedder.y_embedding[:L][None].expand(B, -1, -1)
    ref = pipe(negative_prompt=None, prompt_embeds=caption, prompt_attention_mask=mask, negative_prompt_embeds=null,
               negative_prompt_attention_mask=mask, latents=z.clone(), height=64, width=96, num_inference_steps=20,
               guidance_scale=4.5, output_type="latent", use_resolution_binning=False).images
    ours = sample(model, (8, 12), caption=caption, caption_mask=mask.bool(), noise=z, sampler="dpm++", steps=20,
                  guidance_scale=4.5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_scheduler_is_configured_like_pixart():
    cfg = dpm_solver_scheduler().config
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (1000, 1e-4, 0.02, "linear")
    assert (cfg.algorithm_type, cfg.solver_order, cfg.prediction_type) == ("dpmsolver++", 2, "epsilon")
    np.testing.assert_allclose(dpm_solver_scheduler().alphas_cumprod.numpy(), ABAR, rtol=1e-5)


def test_sample_restores_train_mode_and_rejects_bad_arguments():
    model = random_pixart("tiny").train()
    caption = torch.randn(1, 16, 32)
    out = sample(model, (4, 4), caption=caption, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 4, 4, 4) and torch.isfinite(out).all() and model.training
    one_step = sample(model, (4, 4), caption=caption, sampler="iddpm", steps=1)
    assert torch.isfinite(one_step).all()
    with pytest.raises(ValueError, match="sampler"):
        sample(model, (4, 4), caption=caption, sampler="ddim")
    with pytest.raises(ValueError, match="steps"):
        sample(model, (4, 4), caption=caption, steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample(model, (4, 4), caption=caption, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="latent_hw"):
        sample(model, (5, 4), caption=caption)


# -- text to image --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts(tiny_t5_dir, tiny_vae_dir):
    from common.autoencoder import Autoencoder
    from common.pretrained import load_text_encoder

    return Autoencoder.from_pretrained(str(tiny_vae_dir)), load_text_encoder(str(tiny_t5_dir))


def test_generate_images_text_to_image(tiny_parts):
    vae, text_encoder = tiny_parts
    model = random_pixart("tiny-MS")
    prompts = ["a red bus", "a bowl of ramen", "a dog on a beach"]
    kwargs = dict(height=32, width=48, sampler="iddpm", steps=3, batch_size=2)
    images = generate_images(model, vae, text_encoder, prompts, seed=7, **kwargs)
    assert [im.size for im in images] == [(48, 32)] * 3 and all(im.mode == "RGB" for im in images)
    again = generate_images(model, vae, text_encoder, prompts, seed=7, **kwargs)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    other = generate_images(model, vae, text_encoder, prompts[:1], seed=8, **kwargs)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))
    native = generate_images(model, vae, text_encoder, prompts[:1], steps=1)  # dpm++ at the native 64 px
    assert native[0].size == (64, 64)


def test_generate_images_rejects_bad_input(tiny_parts):
    vae, text_encoder = tiny_parts
    model = random_pixart("tiny")
    with pytest.raises(ValueError, match="height"):
        generate_images(model, vae, text_encoder, ["x"], height=40, width=32)  # 8 (VAE) x 2 (patch) = 16
    with pytest.raises(ValueError, match="width"):
        generate_images(model, vae, text_encoder, ["x"], height=32, width=0)
    with pytest.raises(ValueError, match="sampler"):
        generate_images(model, vae, text_encoder, ["x"], sampler="euler")
    with pytest.raises(ValueError, match="prompts"):
        generate_images(model, vae, text_encoder, class_labels=[1])
    with pytest.raises(ValueError, match="class_labels"):
        generate_images(random_pixart("tiny-class"), vae, class_labels=[10])


def test_generate_images_class_conditional(tiny_parts):
    vae, _ = tiny_parts
    images = generate_images(random_pixart("tiny-class"), vae, class_labels=[1, 2], steps=2, height=32, width=32)
    assert [im.size for im in images] == [(32, 32)] * 2


# -- grid -----------------------------------------------------------------------------------------------------------


def test_image_grid_layout_and_atomic_save(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 100, 0)]
    images = [Image.new("RGB", (10, 8), c) for c in colours]
    images[4] = Image.new("RGB", (6, 4), colours[4])  # smaller images are centred in their cell
    grid = image_grid(images, cols=3, pad=2)
    assert grid.size == (3 * 10 + 4 * 2, 2 * 8 + 3 * 2)
    for i, colour in enumerate(colours):
        row, col = divmod(i, 3)
        centre = (2 + col * 12 + 5, 2 + row * 10 + 4)
        assert grid.getpixel(centre) == colour
    assert grid.getpixel((2 + 1 * 12 + 0, 2 + 1 * 10 + 0)) == (255, 255, 255)  # the small image's padding
    assert grid.getpixel((0, 0)) == (255, 255, 255)
    captioned = image_grid(images, captions=["a"] * 5)
    assert captioned.size[0] == 3 * 10 + 4 * 2 and captioned.size[1] > 2 * 8 + 3 * 2
    path = save_png(grid, tmp_path / "sub" / "grid.png")
    assert Image.open(path).size == grid.size and sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]
    with pytest.raises(ValueError, match="images"):
        image_grid([])
    with pytest.raises(ValueError, match="captions"):
        image_grid(images, captions=["a"])


def test_sa_solver_with_a_negative_prompt_matches_diffusers_pixart_pipeline():
    """SA-Solver (diffusers' SASolverScheduler as we configure it) guided against a negative caption, side by side
    with PixArtAlphaPipeline given the same negative embeddings, initial latents and generator seed (SA-Solver
    draws noise on the way, from the generator)."""
    from training.sampling import sa_solver_scheduler

    model = random_pixart("tiny")
    pipe = tiny_pipeline(model, sa_solver_scheduler())
    g = torch.Generator().manual_seed(6)
    B, L = 2, 16
    caption, negative = torch.randn(B, L, 32, generator=g), torch.randn(B, L, 32, generator=g)
    mask, negative_mask = torch.ones(B, L, dtype=torch.long), torch.ones(B, L, dtype=torch.long)
    mask[1, 9:] = 0
    negative_mask[:, 4:] = 0
    z = torch.randn(B, 4, 8, 12, generator=g)
    ref = pipe(negative_prompt=None, prompt_embeds=caption, prompt_attention_mask=mask,
               negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask, latents=z.clone(),
               height=64, width=96, num_inference_steps=25, guidance_scale=4.5, output_type="latent",
               use_resolution_binning=False, generator=torch.Generator().manual_seed(11)).images
    ours = sample(model, (8, 12), caption=caption, caption_mask=mask.bool(), noise=z, sampler="sa-solver",
                  guidance_scale=4.5, negative_caption=negative, negative_caption_mask=negative_mask.bool(),
                  generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # The noise it injects matters: another seed, other latents.
    other = sample(model, (8, 12), caption=caption, caption_mask=mask.bool(), noise=z, sampler="sa-solver",
                   guidance_scale=4.5, generator=torch.Generator().manual_seed(12))
    assert (other - ours).abs().max() > 1e-3


def test_sa_solver_on_a_point_mass_lands_on_it():
    """Even with the noise SA-Solver injects, the exact eps of a point mass brings every sample onto it, up to the
    noise left at its last timestep t = 0 (sigma = sqrt(1 - abar_0) / sqrt(abar_0) = 0.01; it stops there)."""
    x0 = torch.linspace(-1.5, 1.5, 4 * 4 * 4).reshape(1, 4, 4, 4)
    abar = torch.from_numpy(ABAR)

    def model(x, timestep, **_):
        a = abar[timestep.long()].float().reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = sample(model, (4, 4), batch_size=3, latent_channels=4, sampler="sa-solver", guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0))
    error = out - x0
    assert error.abs().max() < 5 * 0.01 and error.std().item() == pytest.approx(0.01, rel=0.3)


def test_generate_images_per_prompt_and_negative_prompt(tiny_parts):
    vae, text_encoder = tiny_parts
    model = random_pixart("tiny")
    kwargs = dict(height=32, width=32, steps=2, seed=3)
    two = generate_images(model, vae, text_encoder, ["a", "b"], images_per_prompt=2, **kwargs)
    assert len(two) == 4
    listed = generate_images(model, vae, text_encoder, ["a", "a", "b", "b"], **kwargs)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(two, listed))
    negative = generate_images(model, vae, text_encoder, ["a"], negative_prompt="blurry", **kwargs)
    assert not np.array_equal(np.asarray(negative[0]), np.asarray(two[0]))
    with pytest.raises(ValueError, match="images_per_prompt"):
        generate_images(model, vae, text_encoder, ["a"], images_per_prompt=0)
