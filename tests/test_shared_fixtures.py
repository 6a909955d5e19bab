import torch

from common.pretrained import MissingModelError, load_text_encoder, load_vae
from tests.conftest import TINY_T5_WIDTH


def test_tiny_models_load_through_the_user_path(tiny_t5_dir, tiny_vae_dir):
    enc = load_text_encoder(str(tiny_t5_dir))
    feats, mask = enc.encode(["a red circle", "x" * 500])
    assert feats.shape == (2, 120, TINY_T5_WIDTH) and mask.shape == (2, 120)
    # ByT5: one token per byte plus </s>; the long caption is truncated to exactly 120.
    assert mask[0].sum().item() == len("a red circle") + 1 and mask[1].all()
    vae = load_vae(str(tiny_vae_dir))
    z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist
    assert z.mean.shape == (1, 4, 8, 8)


def test_missing_model_names_the_setting(tmp_path):
    import pytest

    with pytest.raises(MissingModelError, match="text_encoder"):
        load_text_encoder(str(tmp_path / "nope"))
    with pytest.raises(MissingModelError, match="vae"):
        load_vae(str(tmp_path / "nope"))
