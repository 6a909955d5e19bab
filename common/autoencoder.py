"""Any diffusers autoencoder behind one interface, and the latent space it defines for diffusion.

`Autoencoder` wraps a loaded model (AutoencoderKL, SD3's and FLUX's shifted AutoencoderKL, Sana's AutoencoderDC, or
any class with the same `encode` / `decode` / config conventions, such as the demo's codec) and exposes:

    encode(pixels) -> (mean, std)   the encoder's latent distribution, unnormalized; a deterministic encoder
                                    (DC-AE's `encode(x).latent`) is a point: std 0
    decode(z) -> pixels             from unnormalized latents
    space                           the LatentSpace: channels, downsample factor, scaling and shift factor

Diffusion runs on normalized latents x = (z - shift_factor) * scaling_factor (diffusers' SD3 and FLUX pipelines'
convention; SD's and DC-AE's shift is 0) and the samplers decode z = x / scaling_factor + shift_factor. Every value
comes from the model's config, so a new autoencoder needs no code here:

    scaling_factor, shift_factor    the config's (an absent or null shift is 0)
    latent_channels                 the config's
    downsample factor               2 ** (levels - 1), levels = len(encoder_block_out_channels) (DC-AE) or
                                    len(block_out_channels) (KL): each level but the last halves the resolution,
                                    the rule diffusers' pipelines size latents with
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch

from common.config import ConfigError
from common.pretrained import load_vae, load_vae_config


@dataclass(frozen=True)
class LatentSpace:
    """What diffusion needs to know about an autoencoder's latents."""

    channels: int
    downsample_factor: int
    scaling_factor: float
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        if not self.scaling_factor > 0:  # also NaN
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        if self.channels < 1 or self.downsample_factor < 1:
            raise ValueError(f"channels and downsample_factor must be >= 1, got {self.channels}, "
                             f"{self.downsample_factor}")

    @classmethod
    def from_config(cls, config: Mapping) -> "LatentSpace":
        """From an autoencoder's config (a diffusers FrozenDict or the dict of its config.json)."""
        levels = config.get("encoder_block_out_channels") or config.get("block_out_channels")
        missing = [name for name, value in (("latent_channels", config.get("latent_channels")),
                                            ("scaling_factor", config.get("scaling_factor")),
                                            ("block_out_channels or encoder_block_out_channels", levels))
                   if value is None]
        if missing:
            raise ValueError(f"the autoencoder's config has no {', '.join(missing)}")
        return cls(channels=int(config["latent_channels"]), downsample_factor=2 ** (len(levels) - 1),
                   scaling_factor=float(config["scaling_factor"]),
                   shift_factor=float(config.get("shift_factor") or 0.0))

    def with_factors(self, scaling_factor: float | None = None, shift_factor: float | None = None) -> "LatentSpace":
        """The same space with the given normalization (None keeps this one's)."""
        return dataclasses.replace(
            self, scaling_factor=self.scaling_factor if scaling_factor is None else float(scaling_factor),
            shift_factor=self.shift_factor if shift_factor is None else float(shift_factor))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents -> diffusion latents."""
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> autoencoder latents."""
        return x / self.scaling_factor + self.shift_factor

    def to_card(self) -> dict:
        """The fields the dataset card's `vae` section and pipeline.json record."""
        return {"latent_channels": self.channels, "downsample_factor": self.downsample_factor,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}


# PixArt-alpha's autoencoder, stabilityai/sd-vae-ft-ema: what a dataset that records no latent space holds.
SD_VAE_SPACE = LatentSpace(channels=4, downsample_factor=8, scaling_factor=0.18215)


def read_latent_space(name_or_path: str, model_class: str = "AutoencoderKL", subfolder: str | None = None,
                      setting: str = "vae") -> LatentSpace:
    """The latent space of a saved autoencoder from its config.json alone (no weights are read)."""
    config = load_vae_config(name_or_path, model_class=model_class, subfolder=subfolder, setting=setting)
    try:
        return LatentSpace.from_config(config)
    except ValueError as err:
        raise ConfigError(f"{setting}: {name_or_path!r}: {err}") from None


class Autoencoder:
    """A diffusers autoencoder with one interface for every class (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, space: LatentSpace | None = None):
        self.model = model.eval()
        self.space = space or LatentSpace.from_config(model.config)

    @classmethod
    def from_pretrained(cls, name_or_path: str, model_class: str = "AutoencoderKL", subfolder: str | None = None,
                        dtype: torch.dtype = torch.float32, setting: str = "vae", scaling_factor: float | None = None,
                        shift_factor: float | None = None) -> "Autoencoder":
        """Load with the class's `from_pretrained`; the factors, when given, replace the config's (a model trained
        with other factors decodes with those)."""
        model = load_vae(name_or_path, setting=setting, subfolder=subfolder, model_class=model_class, dtype=dtype)
        return cls(model, LatentSpace.from_config(model.config).with_factors(scaling_factor, shift_factor))

    @property
    def latent_channels(self) -> int:
        return self.space.channels

    @property
    def downsample_factor(self) -> int:
        return self.space.downsample_factor

    @property
    def scaling_factor(self) -> float:
        return self.space.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.space.shift_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, *args, **kwargs) -> "Autoencoder":
        self.model.to(*args, **kwargs)
        return self

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] [B, 3, H, W] -> (mean, std) [B, C, H/f, W/f] of the unnormalized latent."""
        out = self.model.encode(pixels.to(device=self.device, dtype=self.dtype))
        posterior = getattr(out, "latent_dist", None)
        if posterior is not None:  # a diagonal Gaussian (KL autoencoders)
            return posterior.mean, posterior.std
        return out.latent, torch.zeros_like(out.latent)  # a deterministic encoder (DC-AE)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalized latents [B, C, h, w] -> images [B, 3, h*f, w*f], about [-1, 1] (not clamped)."""
        return self.model.decode(z.to(device=self.device, dtype=self.dtype)).sample
