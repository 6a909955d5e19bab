"""Shared fixtures: tiny random-init models saved with save_pretrained and loaded back the way a user's run loads
real ones, and the real photographs in ../shared/fixtures/photos."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "fixtures" / "photos"

# Tiny text encoder width; tiny DiT presets used in tests take caption_channels=TINY_T5_WIDTH.
TINY_T5_WIDTH = 32

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    if not PHOTOS.is_dir():
        pytest.skip(f"real photo fixtures not found at {PHOTOS}")
    return PHOTOS


def save_tiny_t5(folder: Path, width: int = TINY_T5_WIDTH) -> Path:
    """A random-init T5 encoder and a ByT5 tokenizer (which needs no vocabulary file), saved with save_pretrained."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=384, d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    T5EncoderModel(config).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def save_tiny_vae(folder: Path) -> Path:
    """A random-init AutoencoderKL with the SD VAE's 8x downsampling and 4 latent channels, at toy width."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64, scaling_factor=0.18215,
    )
    vae.save_pretrained(folder)
    return folder


# Tiny random-init autoencoders of each kind the system supports, with the real models' latent layout:
# SD's KL VAE (4 channels, 8x), SD3's / FLUX's shifted KL VAE (16 channels, 8x, shift_factor) and Sana's DC-AE
# (32 channels, 32x, deterministic encoder). Scaling and shift factors are the real models'.
AUTOENCODER_KINDS = ("kl", "kl-shift", "dc")


def save_tiny_autoencoder(folder: Path, kind: str) -> Path:
    import torch
    from diffusers import AutoencoderDC, AutoencoderKL

    if kind == "kl":
        return save_tiny_vae(folder)
    torch.manual_seed(0)
    if kind == "kl-shift":  # stabilityai/stable-diffusion-3-medium-diffusers, subfolder vae
        model = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8, layers_per_block=1,
            block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609,
            use_quant_conv=False, use_post_quant_conv=False)
    elif kind == "dc":  # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers, at toy width and depth
        levels = 6
        model = AutoencoderDC(
            in_channels=3, latent_channels=32, attention_head_dim=8,
            encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            encoder_block_out_channels=(8, 16, 16, 16, 32, 32), decoder_block_out_channels=(8, 16, 16, 16, 32, 32),
            encoder_layers_per_block=(1,) * levels, decoder_layers_per_block=(1,) * levels,
            encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3, decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
            upsample_block_type="interpolate", downsample_block_type="Conv",
            decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3, decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
            scaling_factor=0.41407)
    else:
        raise ValueError(f"unknown autoencoder kind {kind!r}; one of {AUTOENCODER_KINDS}")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_autoencoder_dirs(tmp_path_factory, tiny_vae_dir) -> dict[str, Path]:
    dirs = {kind: save_tiny_autoencoder(tmp_path_factory.mktemp(f"tiny_{kind}"), kind)
            for kind in AUTOENCODER_KINDS if kind != "kl"}
    return {"kl": tiny_vae_dir, **dirs}


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module, sized for the 2-core CI machine; jobs started as subprocesses join it
    through RAY_ADDRESS, as `ray job submit` makes them."""
    from pipelines.ray_cluster import init_ray

    ray = init_ray(num_cpus=2, object_store_memory=300 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a 2-core machine shared with Ray workers: more torch threads than free cores makes them tens
    of times slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
