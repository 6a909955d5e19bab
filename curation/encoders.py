"""Model stages: captioner, autoencoder latents, T5 features. Each is a plain class built once per worker (a Ray actor in
the pipeline) and called per batch of sample rows; the device is chosen at construction (a GPU when the worker
has one, else CPU).

Rows already rejected pass through untouched; a row a stage cannot handle is rejected with that stage's name, never
dropped, so the writer can record it.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from curation.captioners.base import register_captioner
from common.autoencoder import Autoencoder, LatentSpace, read_latent_space
from common.config import ConfigError
from common.pretrained import MissingModelError, load_text_encoder
from curation.writer import RowBatch, object_array

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, gpu_default: str = "float32") -> torch.dtype:
    """`auto` is float32 on CPU (half precision is slow there) and `gpu_default` on a GPU."""
    if dtype == "auto":
        dtype = gpu_default if device.type == "cuda" else "float32"
    return DTYPES[dtype]


def load_pretrained(loader, name_or_path: str, what: str, setting: str, **kwargs):
    """`loader(name_or_path)` with the project's missing-model error: what failed and which setting to change."""
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise MissingModelError(f"could not load the {what} from {name_or_path!r}: {type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}\nSet `{setting}` to a local folder "
                                f"saved with save_pretrained, or a hub id reachable from this machine.") from None


def check_vae(model: str, model_class: str, subfolder: str | None, buckets: dict[str, tuple[int, int]]) -> LatentSpace:
    """Preflight, on the driver: the autoencoder's config resolves (no weights are read) and every bucket side is a
    whole number of latent cells. Returns its latent space, which the dataset card records."""
    space = read_latent_space(model, model_class=model_class, subfolder=subfolder, setting="vae.model")
    factor = space.downsample_factor
    bad = sorted({side for hw in buckets.values() for side in hw if side % factor})
    if bad:
        raise ConfigError(f"buckets.multiple: bucket sides {bad[:5]} are not multiples of the autoencoder's "
                          f"downsample factor {factor} ({model}); set buckets.multiple to a multiple of {factor}")
    return space


class VaeStage:
    """Bucketed images -> the autoencoder's latent mean and std (float16 [C, H/f, W/f]); the image column is dropped.

    Any diffusers autoencoder (common.autoencoder): a KL autoencoder's posterior is stored whole, so the trainer
    draws a fresh latent every epoch; a deterministic one (DC-AE) stores its latent with std 0.
    """

    def __init__(self, model: str, model_class: str = "AutoencoderKL", subfolder: str | None = None,
                 dtype: str = "float32", device: str = "auto"):
        self.device = resolve_device(device)
        self.autoencoder = Autoencoder.from_pretrained(model, model_class=model_class, subfolder=subfolder,
                                                       dtype=resolve_dtype(dtype, self.device),
                                                       setting="vae.model").to(self.device)
        self.factor = self.autoencoder.downsample_factor

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, H, W, 3] -> (mean, std) float32 numpy [B, C, H/f, W/f]."""
        pixels = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        mean, std = self.autoencoder.encode(pixels)
        return mean.float().cpu().numpy(), std.float().cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        rows = RowBatch(batch)
        means = [np.zeros((0, 0, 0), np.float16)] * len(rows)
        stds = list(means)
        groups: dict[tuple, list[int]] = {}
        for i in rows.alive():
            groups.setdefault(np.asarray(rows.columns["image"][i]).shape, []).append(i)
        for shape, members in sorted(groups.items()):
            images = np.stack([np.asarray(rows.columns["image"][i], dtype=np.uint8) for i in members])
            mean, std = self.encode(images)
            for j, i in enumerate(members):
                bucket_h, bucket_w = rows.metas[i]["bucket"]
                if bucket_h % self.factor or bucket_w % self.factor:
                    rows.reject(i, "vae", f"bucket {bucket_h}x{bucket_w} is not divisible by the VAE factor {self.factor}")
                    continue
                latent_hw = [bucket_h // self.factor, bucket_w // self.factor]
                m, s = mean[j].astype(np.float16), std[j].astype(np.float16)
                if list(m.shape[1:]) != latent_hw:
                    rows.reject(i, "vae", f"latent {m.shape} does not match bucket/{self.factor} = {latent_hw}")
                elif not (np.isfinite(m).all() and np.isfinite(s).all()):
                    rows.reject(i, "vae", "latent mean or std holds NaN or inf (in float16)")
                else:
                    means[i], stds[i] = m, s
                    rows.metas[i]["latent_hw"] = latent_hw
        out = rows.to_batch()
        out.pop("image")
        out["latent_mean"], out["latent_std"] = object_array(means), object_array(stds)
        return out


class T5Stage:
    """Captions -> T5 features of the valid tokens only (float16 [n, D], n <= max_length), one column per caption
    name (`t5_<name>`), with the counts in `meta.t5_tokens`. A sample lacking a caption to encode is rejected."""

    def __init__(self, model: str, captions: list[str], max_length: int = 120, dtype: str = "auto",
                 device: str = "auto", tokenizer_subfolder: str | None = None, encoder_subfolder: str | None = None):
        self.device = resolve_device(device)
        # T5 v1.1 overflows in float16; bfloat16 keeps float32's range on GPUs.
        self.encoder = load_text_encoder(model, setting="t5.model", max_length=max_length,
                                         dtype=resolve_dtype(dtype, self.device, gpu_default="bfloat16"),
                                         tokenizer_subfolder=tokenizer_subfolder, encoder_subfolder=encoder_subfolder)
        self.encoder.model.to(self.device)
        self.captions = list(captions)

    def __call__(self, batch: dict) -> dict:
        rows = RowBatch(batch)
        empty = np.zeros((0, self.encoder.width), np.float16)
        for name in self.captions:
            column = [empty] * len(rows)
            todo = []
            for i in rows.alive():
                text = rows.metas[i].get("captions", {}).get(name)
                if text is None:
                    rows.reject(i, "t5", f"no caption {name!r} to encode")
                elif not str(text).strip():
                    rows.reject(i, "t5", f"caption {name!r} is empty")
                else:
                    todo.append(i)
            if todo:
                features, mask = self.encoder.encode([rows.metas[i]["captions"][name] for i in todo], device=self.device)
                features = features.float().cpu().numpy()
                counts = mask.sum(dim=1).cpu().numpy()
                for j, i in enumerate(todo):
                    valid = features[j, : int(counts[j])].astype(np.float16)
                    if not np.isfinite(valid).all():
                        rows.reject(i, "t5", f"T5 features of caption {name!r} hold NaN or inf (in float16)")
                        continue
                    column[i] = valid
                    rows.metas[i].setdefault("t5_tokens", {})[name] = int(counts[j])
            rows.columns[f"t5_{name}"] = object_array(column)
        return rows.to_batch()


class CaptionStage:
    """Images -> a new caption `config.name` from the captioner a `caption` section describes.

    The section is curation.captioners.config.CaptionStageConfig (the recaption job's too); its backend is a
    registered one or a "module:factory". With `inject_source_caption`, the sample's own caption (`source_caption`,
    or its first caption) goes to the captioner, e.g. a JourneyDB prompt to condition on. A captioner exception on
    a batch is retried sample by sample, so one bad image only rejects itself.
    """

    def __init__(self, config, source_caption: str | None = None):
        if ":" in config.backend:
            register_captioner(config.backend, config.backend)
        self.captioner = config.build()
        self.name = config.name
        self.inject = config.inject_source_caption
        self.source_caption = source_caption

    def _source_caption(self, meta: dict) -> str | None:
        captions = meta.get("captions", {})
        if not self.inject:
            return None
        if self.source_caption:
            return captions.get(self.source_caption)
        return next((text for name, text in captions.items() if name != self.name), None)

    def _caption(self, images, sources, metas) -> list:
        try:
            results = self.captioner(images, sources, metas)
            if len(results) != len(images):
                raise RuntimeError(f"captioner returned {len(results)} results for {len(images)} images")
            return results
        except Exception:  # noqa: BLE001 - isolate the sample that breaks the captioner
            if len(images) == 1:
                raise
            out = []
            for image, source, meta in zip(images, sources, metas):
                try:
                    out.extend(self._caption([image], [source], [meta]))
                except Exception as err:  # noqa: BLE001
                    out.append(err)
            return out

    def __call__(self, batch: dict) -> dict:
        rows = RowBatch(batch)
        alive = rows.alive()
        column = "caption_image" if "caption_image" in rows.columns else "image"
        if alive:
            images = [Image.fromarray(np.asarray(rows.columns[column][i], dtype=np.uint8)) for i in alive]
            sources = [self._source_caption(rows.metas[i]) for i in alive]
            metas = [rows.metas[i] for i in alive]
            try:
                results = self._caption(images, sources, metas)
            except Exception as err:  # noqa: BLE001 - a single-sample batch whose caption raised
                results = [err]
            provenance = self.captioner.provenance()
            for i, result in zip(alive, results):
                if isinstance(result, Exception):
                    rows.reject(i, "caption", f"captioner raised {type(result).__name__}: {result}")
                elif not result.ok or not result.text:
                    rows.reject(i, "caption", f"caption failed after {result.attempts} attempts: {result.reason}")
                else:
                    rows.metas[i].setdefault("captions", {})[self.name] = result.text
                    rows.metas[i].setdefault("caption_provenance", {})[self.name] = provenance
        out = rows.to_batch()
        out.pop("caption_image", None)
        return out
