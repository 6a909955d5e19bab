"""Where the project once differed from the official PixArt-alpha code, checked against the official rules
re-derived here: the stored position embedding, the MS aspect-ratio micro-condition, and the loss options.
(Timestep respacing is in test_diffusion.py.)"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from common.config import ConfigError, validate_config
from curation.buckets import ASPECT_RATIO_256, bucket_table
from curation.shard_format import aspect_ratio_key
from training.checkpoint import load_official_checkpoint
from training.model import PRESETS, PixArt, PixArtConfig, StateDictMismatchError
from training.train_config import DiffusionSection

pytestmark = pytest.mark.usefixtures("one_thread")


def official_pos_embed(dim: int, grid: int, lewei_scale: float, base_size: int) -> np.ndarray:
    """The official get_2d_sincos_pos_embed (MAE's, with PixArt's base_size / lewei_scale stretch), in numpy: the
    w coordinate fills the first half of the channels, h the second; each half is [sin, cos]."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid, dtype=np.float32) / (grid / base_size) / lewei_scale
    w, h = np.meshgrid(coords, coords)  # w first, as the official code
    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)


def official_checkpoint(tmp_path, config: PixArtConfig, lewei_scale: float):
    """An official-layout .pth of a random model of `config`, whose pos_embed is the official one for lewei_scale."""
    torch.manual_seed(0)
    state = PixArt(config).state_dict()
    grid = config.input_size // config.patch_size
    state["pos_embed"] = torch.from_numpy(official_pos_embed(config.hidden_size, grid, lewei_scale, grid)).float()[None]
    path = tmp_path / "official.pth"
    torch.save({"state_dict": state}, path)
    return path


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_a_matching_pos_embed_loads(tmp_path, scale):
    config = dataclasses.replace(PRESETS["tiny-MS"], pe_interpolation=scale)
    model = load_official_checkpoint(official_checkpoint(tmp_path, config, scale), config)
    assert model.config.pe_interpolation == scale


def test_a_wrong_pe_interpolation_or_input_size_is_refused_naming_both(tmp_path):
    trained = dataclasses.replace(PRESETS["tiny-MS"], pe_interpolation=2.0)
    path = official_checkpoint(tmp_path, trained, 2.0)
    with pytest.raises(StateDictMismatchError, match="pe_interpolation") as err:
        load_official_checkpoint(path, PRESETS["tiny-MS"])  # pe_interpolation 1
    assert "input_size" in str(err.value) and "pe_interpolation=2" in str(err.value)
    with pytest.raises(StateDictMismatchError, match="input_size=16"):
        load_official_checkpoint(path, dataclasses.replace(trained, input_size=16))


def test_bucket_key_is_the_official_closest_ratio():
    """get_closest_ratio: the table key (a string like '0.57') nearest to h / w, as a float."""
    for h, w in [(192, 336), (1000, 1000), (480, 640), (4000, 900), (100, 700), (333, 500)]:
        want = float(min(ASPECT_RATIO_256, key=lambda k: abs(float(k) - h / w)))
        assert aspect_ratio_key(h, w) == want
    assert aspect_ratio_key(192, 336) == 0.57 and 192 / 336 != 0.57
    # In the official tables every bucket's own ratio leads back to the key it is filed under.
    for resolution in (256, 512, 1024):
        for key, (h, w) in bucket_table(resolution).items():
            assert aspect_ratio_key(h, w) == float(key)


def test_the_model_config_chooses_key_or_height_over_width():
    assert PRESETS["tiny-MS"].aspect_ratio(192, 336) == 0.57
    hw = dataclasses.replace(PRESETS["tiny-MS"], aspect_ratio_input="height_width")
    assert hw.aspect_ratio(192, 336) == 192 / 336
    with pytest.raises(ValueError, match="aspect_ratio_input"):
        dataclasses.replace(PRESETS["tiny-MS"], aspect_ratio_input="hw")


def test_sampling_feeds_the_bucket_key(tiny_vae_dir, tiny_t5_dir):
    from common.autoencoder import Autoencoder
    from common.pretrained import load_text_encoder
    from training.sampling import generate_images

    seen = []
    for mode, want in (("bucket_key", 0.68), ("height_width", 32 / 48)):
        model = PixArt(dataclasses.replace(PRESETS["tiny-MS"], aspect_ratio_input=mode)).eval()
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["aspect_ratio"]) or None,
                                        with_kwargs=True)
        generate_images(model, Autoencoder.from_pretrained(str(tiny_vae_dir)), load_text_encoder(str(tiny_t5_dir)), ["x"],
                        height=32, width=48, steps=1, guidance_scale=1.0)
        assert seen[-1].flatten().tolist() == pytest.approx([want])


def test_training_batches_carry_the_key_of_the_original_size(tmp_path):
    from tests.shard_fixtures import FixtureSpec, write_dataset
    from training.data import BatchPlan, make_loader

    samples = {s.key: s for s in write_dataset(tmp_path, FixtureSpec({(64, 96): 4, (96, 64): 4}, units=1))}
    plan = BatchPlan.from_dataset(tmp_path, "llava", 4, 1, seed=0)
    for batch in itertools.islice(make_loader(plan, tmp_path, 0, 0, "llava", 16, 32, num_workers=0), 2):
        for key, got in zip(batch["keys"], batch["aspect_ratio_key"][:, 0].tolist()):
            h, w = samples[key].meta["orig_size"]
            assert got == pytest.approx(float(min(ASPECT_RATIO_256, key=lambda k: abs(float(k) - h / w))))


def test_loss_options_are_named_by_what_they_do():
    assert DiffusionSection().loss_options() == {"min_snr_gamma": None, "x0_target_below": None}
    assert DiffusionSection(x0_target_below=250).loss_options()["x0_target_below"] == 250
    assert DiffusionSection(min_snr_gamma=5).loss_options()["min_snr_gamma"] == 5
    with pytest.raises(ConfigError, match="min_snr_gamma is the Min-SNR weighting"):
        validate_config({"snr_gamma": 5}, DiffusionSection)
    with pytest.raises(ConfigError, match="two different losses"):
        validate_config({"min_snr_gamma": 5, "x0_target_below": 250}, DiffusionSection)
