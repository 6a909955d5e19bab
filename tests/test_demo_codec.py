"""The demo's weight-free latent codec: closed-form block means, a round trip the evaluator can read, unit-variance
scaled latents, and AutoencoderKL's interface as the rest of the system (and diffusers) uses it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from demo.codec import SD_SCALING_FACTOR, PoolingCodec
from common.pretrained import load_vae
from demo import evaluator
from demo.scenes import SceneSampler, held_out_scenes, render
from common.autoencoder import Autoencoder
from training.sampling import decode_latents


def _pixels(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])


RESOLUTION = 64  # the demo's: 16x16 latents, where small shapes are a few latent pixels wide


@pytest.fixture(scope="module")
def scenes_and_pixels():
    scenes = SceneSampler(seed=21).scenes(300) + held_out_scenes()
    return scenes, _pixels([render(s, RESOLUTION) for s in scenes])


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory, scenes_and_pixels):
    _, pixels = scenes_and_pixels
    folder = tmp_path_factory.mktemp("codec")
    PoolingCodec.calibrated([pixels[:128], pixels[128:256]]).save_pretrained(folder)
    return folder


def test_block_means_in_closed_form():
    codec = PoolingCodec(channel_scales=(1.0, 1.0, 1.0, 1.0))
    rgb = torch.tensor([0.5, -0.25, 0.75])
    y = 0.299 * 0.5 + 0.587 * -0.25 + 0.114 * 0.75
    expected = torch.tensor([y, (0.75 - y) / 1.772, (0.5 - y) / 1.402, y])  # BT.601: Cb = (B-Y)/1.772, Cr = (R-Y)/1.402
    flat = rgb.view(1, 3, 1, 1).expand(2, 3, 16, 24)
    latent = codec.encode(flat).latent_dist
    assert latent.mean.shape == (2, 4, 4, 6)
    torch.testing.assert_close(latent.mean, expected.view(1, 4, 1, 1).expand(2, 4, 4, 6), atol=1e-4, rtol=0)
    torch.testing.assert_close(codec.decode(latent.mean).sample, flat, atol=1e-5, rtol=0)

    # A left/right split: each block mean is the share of each colour in that block.
    split = torch.full((1, 3, 8, 8), -1.0)
    split[..., 6:] = 1.0  # the right block's last two columns are white
    raw = codec.encode(split).latent_dist.mean
    torch.testing.assert_close(raw[0, 0, :, 0], torch.full((2,), -1.0))
    torch.testing.assert_close(raw[0, 0, :, 1], torch.full((2,), 0.0), atol=1e-6, rtol=0)


def test_round_trip_is_read_back_by_the_evaluator(codec_dir, scenes_and_pixels):
    scenes, pixels = scenes_and_pixels
    codec = load_vae(str(codec_dir), model_class="demo.codec:PoolingCodec")
    assert isinstance(codec, PoolingCodec)
    latents = codec.encode(pixels).latent_dist.mean * SD_SCALING_FACTOR
    decoded = decode_latents(Autoencoder(codec), latents, batch_size=64)  # the samplers' decode path
    graded = [evaluator.score(image, scene) for image, scene in zip(decoded, scenes)]
    everything = evaluator.accuracy([s for scores in graded for s in scores])
    # Colour and position survive exactly; a rare small shape (3 latent pixels across) may blur past recognition.
    assert everything["colour"] == everything["position"] == 1.0 and everything["all"] >= 0.99, everything
    held_out = evaluator.accuracy([s for scores in graded[-len(held_out_scenes()):] for s in scores])
    assert held_out["all"] == held_out["size"] == 1.0
    psnr = 10 * torch.log10(4 / ((_pixels(decoded) - pixels) ** 2).mean())
    assert psnr > 22, psnr
    # At 128 px every object comes back.
    big = SceneSampler(seed=22).scenes(60)
    pixels128 = _pixels([render(s, 128) for s in big])
    decoded128 = decode_latents(Autoencoder(codec), codec.encode(pixels128).latent_dist.mean * SD_SCALING_FACTOR, batch_size=60)
    assert evaluator.accuracy([s for im, sc in zip(decoded128, big) for s in evaluator.score(im, sc)])["all"] == 1.0


def test_back_projection_and_the_offset_grid_earn_their_place(codec_dir, scenes_and_pixels):
    """Against references written here with torch alone: bicubic upsampling of the block means, and the same
    back-projection using the main grid only. The codec's decode beats both."""
    assert PoolingCodec().config.decode_iterations == 1
    _, pixels = scenes_and_pixels
    codec = PoolingCodec.from_pretrained(codec_dir)
    ours = codec.decode(codec.encode(pixels).latent_dist.mean).sample

    def up(t):
        return F.interpolate(t, scale_factor=4, mode="bicubic", align_corners=False)

    means = F.avg_pool2d(pixels, 4)
    bicubic = up(means)
    main_only = bicubic.clone()
    for _ in range(codec.config.decode_iterations):
        main_only = main_only + up(means - F.avg_pool2d(main_only, 4))

    def mse(x):
        return ((x - pixels) ** 2).mean()

    assert mse(ours) < 0.9 * mse(bicubic)
    assert mse(ours) < 0.95 * mse(main_only)
    # Back-projection makes the reconstruction agree with the stored block means (to 1/200 of the [-1, 1] range).
    gain = codec.config.channel_scales[0]
    drift = (codec.encode(ours).latent_dist.mean - codec.encode(pixels).latent_dist.mean).abs().mean() / gain
    assert drift < 0.01, drift


def test_scaled_latents_have_unit_variance(codec_dir):
    codec = PoolingCodec.from_pretrained(codec_dir)
    unseen = _pixels([render(s, RESOLUTION) for s in SceneSampler(seed=99).scenes(96)])
    scaled = codec.encode(unseen).latent_dist.mean * codec.config.scaling_factor
    assert 0.9 < scaled.std() < 1.1, scaled.std()
    # One gain for all channels: brightness varies more than colour differences, which stay within a few units.
    assert len(set(codec.config.channel_scales)) == 1
    assert scaled[:, 1:3].abs().max() < 3 < scaled[:, 0].std() * 10


def test_autoencoder_kl_interface(codec_dir):
    codec = PoolingCodec.from_pretrained(codec_dir)
    # What common.autoencoder reads from the config, as from any diffusers autoencoder's.
    space = Autoencoder(codec).space
    assert (space.downsample_factor, space.channels) == (codec.config.downsample_factor, 4) == (4, 4)
    assert (space.scaling_factor, space.shift_factor) == (SD_SCALING_FACTOR, 0.0)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    posterior = codec.encode(x).latent_dist
    assert posterior.std.abs().max() == 0 and torch.equal(posterior.sample(), posterior.mean)
    (same,) = codec.encode(x, return_dict=False)
    assert torch.equal(same.mean, posterior.mean)
    (pixels,) = codec.decode(posterior.mean, return_dict=False)
    assert pixels.shape == x.shape and torch.equal(codec(x).sample, pixels)

    with pytest.raises(ValueError, match="divisible by downsample_factor"):
        codec.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        codec.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="block_out_channels"):
        PoolingCodec(downsample_factor=8)
    with pytest.raises(ValueError, match="channel_scales"):
        PoolingCodec(channel_scales=(1.0, 1.0))


def test_diffusers_pixart_pipeline_runs_on_the_codec(codec_dir, tiny_t5_dir):
    """The codec stands in for the SD VAE in diffusers' own PixArtAlphaPipeline."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    from tests.conftest import TINY_T5_WIDTH

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=TINY_T5_WIDTH, norm_type="ada_norm_single", patch_size=2)
    pipe = PixArtAlphaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(tiny_t5_dir), text_encoder=T5EncoderModel.from_pretrained(tiny_t5_dir),
        vae=PoolingCodec.from_pretrained(codec_dir), transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    image = pipe("a red circle", height=32, width=32, num_inference_steps=2, output_type="np",
                 use_resolution_binning=False, max_sequence_length=16).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
