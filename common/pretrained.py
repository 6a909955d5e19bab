"""Loading pretrained models (VAE, T5) through their real `from_pretrained` APIs, with errors that say what to set.

Curation encodes with these and training samples with them, so both sides load them one way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_T5 = "DeepFloyd/t5-v1_1-xxl"  # PixArt-alpha's text encoder (T5 v1.1 XXL encoder, 4096 wide)
T5_MAX_LENGTH = 120


class MissingModelError(RuntimeError):
    """A model that could not be loaded; the message names the id tried and the setting that points elsewhere."""


def _load(loader, name_or_path: str, what: str, setting: str, **kwargs):
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise MissingModelError(
            f"could not load the {what} from {name_or_path!r}: {err.__class__.__name__}: {str(err).splitlines()[0]}\n"
            f"Set `{setting}` to a local folder saved with save_pretrained (or a hub id reachable from this machine; "
            f"HF_HOME/HF_HUB_OFFLINE control the cache)."
        ) from None


def vae_class(model_class: str = "AutoencoderKL"):
    """A class exported by diffusers by name, or a `module:Class` with the same interface (the demo's codec)."""
    if ":" in model_class:
        import importlib

        module, _, attr = model_class.partition(":")
        return getattr(importlib.import_module(module), attr)
    import diffusers

    return getattr(diffusers, model_class)


def load_vae(name_or_path: str = DEFAULT_VAE, setting: str = "vae", subfolder: str | None = None,
             model_class: str = "AutoencoderKL", dtype: torch.dtype = torch.float32):
    """A diffusers autoencoder of class `model_class` (see `vae_class`); common.autoencoder.Autoencoder wraps it
    in the interface curation and training use."""
    kwargs = {"torch_dtype": dtype}
    if subfolder:
        kwargs["subfolder"] = subfolder
    return _load(vae_class(model_class).from_pretrained, name_or_path, "VAE", setting, **kwargs).eval()


def load_vae_config(name_or_path: str = DEFAULT_VAE, setting: str = "vae", subfolder: str | None = None,
                    model_class: str = "AutoencoderKL") -> dict:
    """The autoencoder's config.json as a dict, without reading its weights."""
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return dict(_load(vae_class(model_class).load_config, name_or_path, "VAE config", setting, **kwargs))


@dataclass
class TextEncoder:
    """A T5 tokenizer + encoder pair; `encode` returns PixArt's caption features and their padding mask."""

    tokenizer: object
    model: torch.nn.Module
    max_length: int = T5_MAX_LENGTH

    @property
    def width(self) -> int:
        return int(self.model.config.d_model)

    @torch.inference_mode()
    def encode(self, texts: list[str], device: torch.device | str | None = None):
        """-> (features float [B, max_length, D], mask bool [B, max_length]); padded to max_length, truncated past it."""
        tokens = self.tokenizer(
            list(texts), max_length=self.max_length, padding="max_length", truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )
        device = device or next(self.model.parameters()).device
        ids = tokens.input_ids.to(device)
        mask = tokens.attention_mask.to(device)
        features = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return features, mask.bool()

    def token_counts(self, texts: list[str]) -> list[int]:
        """Untruncated token counts (with the end-of-sequence token), for truncation statistics."""
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True).input_ids]


def load_text_encoder(name_or_path: str = DEFAULT_T5, setting: str = "text_encoder", max_length: int = T5_MAX_LENGTH,
                      dtype: torch.dtype = torch.float32, tokenizer_subfolder: str | None = None,
                      encoder_subfolder: str | None = None) -> TextEncoder:
    """T5 tokenizer (AutoTokenizer) and `T5EncoderModel`, from a hub id or a local folder (a diffusers pipeline
    folder works with subfolders `tokenizer` and `text_encoder`)."""
    from transformers import AutoTokenizer, T5EncoderModel

    tok_kwargs = {"subfolder": tokenizer_subfolder} if tokenizer_subfolder else {}
    enc_kwargs = {"subfolder": encoder_subfolder} if encoder_subfolder else {}
    tokenizer = _load(AutoTokenizer.from_pretrained, name_or_path, "T5 tokenizer", setting, **tok_kwargs)
    model = _load(T5EncoderModel.from_pretrained, name_or_path, "T5 encoder", setting, dtype=dtype, **enc_kwargs)
    return TextEncoder(tokenizer=tokenizer, model=model.eval(), max_length=max_length)
