"""The trainer's periodic sample grids: fixed prompts (or class labels), the current EMA or model weights, a PNG."""
from __future__ import annotations

from pathlib import Path

import torch

from common.autoencoder import Autoencoder, LatentSpace
from common.config import ConfigError
from training.model import PixArt
from training.train_config import TrainConfig


class SampleGrids:
    """What rank 0 needs for sample grids, loaded once at start (so a missing VAE or T5 fails before training):
    the VAE named in the config, the fixed prompts' T5 features (the encoder itself is freed, T5-XXL is large),
    and a PixArt to load the weights into."""

    def __init__(self, config: TrainConfig, model_config, latent_space: LatentSpace, device: torch.device,
                 dtype: torch.dtype):
        from common.pretrained import load_text_encoder

        self.config, self.model_config, self.device = config, model_config, device
        pre = config.pretrained
        # Decodes in the data's latent space: the dataset card's factors, whatever the VAE's config says.
        self.vae = Autoencoder.from_pretrained(pre.vae, model_class=pre.vae_class, subfolder=pre.vae_subfolder,
                                               setting="pretrained.vae", scaling_factor=latent_space.scaling_factor,
                                               shift_factor=latent_space.shift_factor).to(device)
        if self.vae.space != latent_space:
            raise ConfigError(f"pretrained.vae: {pre.vae} has the latent space {self.vae.space}, the data's is "
                              f"{latent_space}")
        self.prompts = None
        if model_config.text_conditioned:
            encoder = load_text_encoder(pre.text_encoder, setting="pretrained.text_encoder",
                                        max_length=model_config.caption_length, dtype=dtype)
            encoder.model.to(device)
            self.prompts = FixedPrompts(config.sampling.prompts, *encoder.encode(config.sampling.prompts),
                                        max_length=model_config.caption_length)
            del encoder
            if device.type == "cuda":
                torch.cuda.empty_cache()
        with torch.random.fork_rng(devices=[]):
            self.model = PixArt(model_config).to(device).eval()

    @torch.no_grad()
    def __call__(self, weights: dict[str, torch.Tensor], path: Path):
        """(the grid image, its PNG path)."""
        from training.grid import image_grid, save_png
        from training.sampling import generate_images

        cfg, text = self.config.sampling, self.model_config.text_conditioned
        self.model.load_state_dict(weights, strict=True)
        height, width = cfg.size or (None, None)  # None: the model's native size, through the VAE's factor
        images = generate_images(self.model, self.vae, self.prompts, cfg.prompts if text else None,
                                 class_labels=None if text else cfg.class_labels, height=height, width=width,
                                 sampler=cfg.sampler, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                                 seed=cfg.seed,
                                 prediction_type=self.config.diffusion.prediction_type)
        captions = cfg.prompts if text else [f"class {c}" for c in cfg.class_labels]
        grid = image_grid(images, captions=captions)
        return grid, save_png(grid, path)


class FixedPrompts:
    """A text encoder stand-in for generate_images that returns precomputed features of a fixed prompt list."""

    def __init__(self, prompts: list[str], features: torch.Tensor, mask: torch.Tensor, max_length: int):
        self.index = {p: i for i, p in enumerate(prompts)}
        self.features, self.mask, self.max_length = features.float().cpu(), mask.cpu(), max_length

    def encode(self, texts: list[str], device: torch.device | str | None = None):
        rows = torch.tensor([self.index[t] for t in texts])
        return self.features[rows].to(device), self.mask[rows].to(device)
