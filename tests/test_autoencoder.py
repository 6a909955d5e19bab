"""common.autoencoder against diffusers' own classes: tiny random-init AutoencoderKL (SD), AutoencoderKL with a
shift (SD3/FLUX) and AutoencoderDC (Sana), saved with save_pretrained and loaded through the user's code path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.autoencoder import SD_VAE_SPACE, Autoencoder, LatentSpace, read_latent_space
from common.config import ConfigError
from common.pretrained import MissingModelError
from curation.encoders import VaeStage, check_vae
from curation.writer import sample_row
from tests.fixtures_data import gradient

pytestmark = pytest.mark.usefixtures("one_thread")

# kind -> (diffusers class, channels, downsample factor, scaling factor, shift factor): the real models' values.
EXPECTED = {
    "kl": ("AutoencoderKL", 4, 8, 0.18215, 0.0),
    "kl-shift": ("AutoencoderKL", 16, 8, 1.5305, 0.0609),
    "dc": ("AutoencoderDC", 32, 32, 0.41407, 0.0),
}


def reference(folder, kind):
    import diffusers

    return getattr(diffusers, EXPECTED[kind][0]).from_pretrained(folder).eval()


def pixels(h, w, seed=0):
    return torch.from_numpy(np.asarray(gradient(h, w, seed=seed)).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.mark.parametrize("kind", EXPECTED)
def test_latent_space_encode_and_decode_match_diffusers(kind, tiny_autoencoder_dirs):
    folder = tiny_autoencoder_dirs[kind]
    cls, channels, factor, scale, shift = EXPECTED[kind]
    ae = Autoencoder.from_pretrained(str(folder), model_class=cls)
    assert ae.space == LatentSpace(channels, factor, scale, shift)
    assert (ae.latent_channels, ae.downsample_factor, ae.scaling_factor, ae.shift_factor) == (channels, factor, scale,
                                                                                              shift)
    ref = reference(folder, kind)
    x = torch.cat([pixels(32, 64, 1), pixels(32, 64, 2)])
    mean, std = ae.encode(x)
    # The factor read from the config is the one the network applies.
    assert mean.shape == std.shape == (2, channels, 32 // factor, 64 // factor)
    with torch.no_grad():
        out = ref.encode(x)
        if kind == "dc":  # a deterministic encoder: its latent, std 0
            torch.testing.assert_close(mean, out.latent)
            assert torch.equal(std, torch.zeros_like(mean))
        else:
            torch.testing.assert_close(mean, out.latent_dist.mean)
            torch.testing.assert_close(std, out.latent_dist.std)
            assert (std > 0).all()
        torch.testing.assert_close(ae.decode(mean), ref.decode(mean).sample)


@pytest.mark.parametrize("kind", EXPECTED)
def test_the_latent_space_is_read_from_config_json_alone(kind, tiny_autoencoder_dirs, tmp_path):
    """No weights are read: a folder holding only config.json answers (the curation preflight relies on it)."""
    (tmp_path / "config.json").write_bytes((tiny_autoencoder_dirs[kind] / "config.json").read_bytes())
    cls, channels, factor, scale, shift = EXPECTED[kind]
    assert read_latent_space(str(tmp_path), model_class=cls) == LatentSpace(channels, factor, scale, shift)
    with pytest.raises(MissingModelError, match="vae.model"):
        read_latent_space(str(tmp_path / "nowhere"), model_class=cls, setting="vae.model")


def test_config_without_the_fields_is_refused_by_name(tmp_path):
    assert LatentSpace.from_config({"latent_channels": 4, "block_out_channels": [1, 2, 3, 4],
                                    "scaling_factor": 0.18215, "shift_factor": None}) == SD_VAE_SPACE
    with pytest.raises(ValueError, match="scaling_factor"):
        LatentSpace.from_config({"latent_channels": 4, "block_out_channels": [1, 2]})
    with pytest.raises(ValueError, match="block_out_channels"):
        LatentSpace.from_config({"latent_channels": 4, "scaling_factor": 1.0})
    with pytest.raises(ValueError, match="scaling_factor must be > 0"):
        LatentSpace(4, 8, 0.0)


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(1e-3, 1e3), shift=st.floats(-10, 10), seed=st.integers(0, 2**16))
def test_normalize_is_shift_then_scale_and_denormalize_inverts_it(scale, shift, seed):
    space = LatentSpace(channels=3, downsample_factor=8, scaling_factor=scale, shift_factor=shift)
    z = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5
    torch.testing.assert_close(space.normalize(z), (z - shift) * scale)
    torch.testing.assert_close(space.denormalize(space.normalize(z)), z)
    assert space.with_factors(None, None) == space
    assert space.with_factors(2.0, 0.5) == LatentSpace(3, 8, 2.0, 0.5)


@pytest.mark.parametrize("kind", EXPECTED)
def test_the_samplers_decode_through_the_latent_space(kind, tiny_autoencoder_dirs):
    """decode_latents(diffusion latents) = the reference decoder's pixels of z = x / scale + shift."""
    from training.sampling import decode_latents

    ae = Autoencoder.from_pretrained(str(tiny_autoencoder_dirs[kind]), model_class=EXPECTED[kind][0])
    ref = reference(tiny_autoencoder_dirs[kind], kind)
    z, _ = ae.encode(pixels(32, 32, 3))
    [image] = decode_latents(ae, ae.space.normalize(z))
    with torch.no_grad():
        expected = ((ref.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(image).astype(float) - expected).max() <= 1


@pytest.mark.parametrize("kind", EXPECTED)
def test_vae_stage_stores_each_kind_as_diffusers_encodes_it(kind, tiny_autoencoder_dirs):
    cls, channels, factor, *_ = EXPECTED[kind]
    rows = [sample_row(key, "u", {"key": key, "source": "t", "source_id": key, "bucket": [h, w], "captions": {}},
                       image=np.asarray(gradient(h, w, seed=i)))
            for i, (key, h, w) in enumerate([("a", 32, 32), ("b", 32, 64), ("c", 32, 32)])]
    out = VaeStage(str(tiny_autoencoder_dirs[kind]), model_class=cls, device="cpu")(
        {name: [row[name] for row in rows] for name in rows[0]})
    assert list(out["reject_stage"]) == ["", "", ""]
    ae = Autoencoder.from_pretrained(str(tiny_autoencoder_dirs[kind]), model_class=cls)
    for i, row in enumerate(rows):
        mean, std = ae.encode(torch.from_numpy(row["image"].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1)
        stored_mean, stored_std = out["latent_mean"][i], out["latent_std"][i]
        assert stored_mean.dtype == stored_std.dtype == np.float16
        h, w = json.loads(row["meta"])["bucket"]
        assert stored_mean.shape == (channels, h // factor, w // factor)
        assert json.loads(out["meta"][i])["latent_hw"] == [h // factor, w // factor]
        np.testing.assert_allclose(stored_mean, mean[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stored_std, std[0].numpy(), rtol=2e-3, atol=2e-3)
        assert (stored_std == 0).all() == (kind == "dc")


def test_curation_preflight_checks_buckets_against_the_downsample_factor(tiny_autoencoder_dirs):
    from curation.buckets import BucketConfig

    folder = str(tiny_autoencoder_dirs["dc"])
    space = check_vae(folder, "AutoencoderDC", None, BucketConfig(resolution=256, multiple=64).table())
    assert space.downsample_factor == 32
    with pytest.raises(ConfigError, match=r"^buckets.multiple: .* downsample factor 32"):
        check_vae(folder, "AutoencoderDC", None, BucketConfig(resolution=256).table())  # multiples of 16
    with pytest.raises(MissingModelError, match="vae.model"):
        check_vae(folder + "-missing", "AutoencoderDC", None, BucketConfig().table())


def test_the_demo_codec_is_read_like_any_autoencoder(tmp_path):
    """The weight-free codec fits the same interface through its config; production code has no branch for it."""
    from demo.codec import PoolingCodec

    PoolingCodec(downsample_factor=8, block_out_channels=(4, 4, 4, 4)).save_pretrained(tmp_path)
    assert read_latent_space(str(tmp_path), model_class="demo.codec:PoolingCodec") == LatentSpace(4, 8, 0.18215)
    ae = Autoencoder.from_pretrained(str(tmp_path), model_class="demo.codec:PoolingCodec")
    mean, std = ae.encode(pixels(32, 64))
    assert mean.shape == (1, 4, 4, 8) and torch.equal(std, torch.zeros_like(mean)) and ae.dtype == torch.float32


def test_training_follows_the_dataset_card_and_its_preflight_the_autoencoder(tmp_path):
    """The trainer normalizes with the card's latent space (curation wrote the autoencoder's config there), explicit
    factors win; the preflight refuses, in one line naming the field, a model whose in_channels differ from the
    latents' channels and buckets whose latents are not whole patches."""
    from tests.shard_fixtures import FixtureSpec, write_dataset
    from training.preflight import PreflightError, preflight
    from training.train_config import TrainConfig

    write_dataset(tmp_path / "data", FixtureSpec({(64, 64): 4}, units=1, latent_channels=16))

    def config(in_channels=16, root="data", **pretrained):
        return TrainConfig.model_validate({
            "stage": 2, "model": {"preset": "tiny", "overrides": {"in_channels": in_channels}},
            "data": {"root": str(tmp_path / root), "caption": "llava", "batch_size": 2},
            "pretrained": pretrained, "run": {"output_dir": str(tmp_path / "out"), "steps": 1}})

    card = {"vae": {"model": "x", "latent_channels": 16, "downsample_factor": 8, "scaling_factor": 1.5305,
                    "shift_factor": 0.0609}}
    (tmp_path / "data" / "dataset_card.json").write_text(json.dumps(card))
    assert config().latent_space() == LatentSpace(16, 8, 1.5305, 0.0609)
    assert config(scaling_factor=2.0, shift_factor=0.0).latent_space() == LatentSpace(16, 8, 2.0, 0.0)
    preflight(config())
    with pytest.raises(PreflightError, match=r"^model.overrides.in_channels: .* 16 channels, .* in_channels=32$"):
        preflight(config(in_channels=32))
    # A 544 px side of a 32x autoencoder is 17 latents: the fixture's 72 px at 8x (9 latents) is the same case.
    write_dataset(tmp_path / "odd", FixtureSpec({(72, 64): 4}, units=1, latent_channels=16))
    with pytest.raises(PreflightError, match=r"^data.root: latents of 9x8 are not whole patches \(model patch_size 2\)"):
        preflight(config(root="odd"))
    # A card from before the shift was recorded: SD's VAE, no shift.
    (tmp_path / "data" / "dataset_card.json").write_text(json.dumps(
        {"vae": {"scaling_factor": 0.18215, "latent_channels": 4, "downsample_factor": 8}}))
    assert config(in_channels=4).latent_space() == SD_VAE_SPACE
