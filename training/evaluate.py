"""Evaluate a weights folder: FID against a folder of reference images and CLIP score against the prompts.

    python -m training.evaluate --checkpoint WEIGHTS --prompt-file prompts.txt --reference images/ --out eval/
        [--images-per-prompt 1] [--clip-model openai/clip-vit-large-patch14] [--fid-features inception]
        [--inception-weights pt_inception-2015-12-05-6726825d.pth] [sampling and device options]

Images are sampled from every prompt as `training.sample` samples them (same options), then:

- FID (torchmetrics' FrechetInceptionDistance): the Frechet distance between Gaussians fitted to the features of
  the reference images and of the samples. `--fid-features inception` is the standard 2048-d pool feature of the
  FID Inception network (torch-fidelity's; its weights are downloaded on first use, or read from
  --inception-weights); `module:callable` names a function returning another torch feature extractor
  ([N, 3, H, W] uint8 -> [N, d]). Every image is resized to --fid-size first. FID needs at least two images on
  each side and is only comparable between runs with the same feature extractor and image counts.
- CLIP score: 100 x max(cosine(image, prompt), 0) of CLIP's embeddings (torchmetrics' definition), averaged, with
  a transformers CLIPModel and its processor from --clip-model (hub id or folder).

Writes eval.json (figures and settings), eval.png (per-prompt CLIP scores, FID in the title) and the samples.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common.durable import atomic_write_bytes, publish, temp_name
from common.pretrained import MissingModelError, _load
from training import cli

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_FID_SIZE = 299


@dataclass
class Metrics:
    """What an evaluation measures: the metric objects, loaded once (the trainer reuses them every N steps)."""

    fid: object | None  # torchmetrics FrechetInceptionDistance with the reference features already added
    clip: tuple | None  # (transformers CLIPModel, CLIPProcessor)
    fid_size: int = DEFAULT_FID_SIZE
    reference_count: int = 0


def to_uint8_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> uint8 [N, 3, size, size] (bicubic resize; FID compares images at one size)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def read_reference(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--reference: {folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise ValueError(f"--reference: {folder} holds {len(files)} image(s); FID needs at least 2")
    return files


def fid_feature_extractor(spec: str, inception_weights: str | None):
    """torchmetrics' `feature` argument: 2048 (the Inception pool features) or a module from `module:callable`."""
    if spec == "inception":
        try:
            import torch_fidelity  # noqa: F401  (torchmetrics builds the FID Inception with it)
        except ImportError:
            raise MissingModelError("--fid-features inception: the FID Inception network needs torch-fidelity "
                                    "(pip install 'pixart-from-scratch[fid-inception]'), or pass "
                                    "--fid-features module:callable") from None
        return 2048
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--fid-features: {spec!r} is neither 'inception' nor 'module:callable'")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--fid-features: cannot import {spec!r}: {err}") from None
    extractor = factory()
    if not isinstance(extractor, torch.nn.Module):
        raise ValueError(f"--fid-features: {spec} returned a {type(extractor).__name__}, not a torch.nn.Module")
    return extractor.eval()


def build_metrics(reference: Sequence[Path], fid_features: str = "inception", inception_weights: str | None = None,
                  clip_model: str | None = DEFAULT_CLIP, fid_size: int = DEFAULT_FID_SIZE,
                  batch_size: int = 16, progress: bool = True) -> Metrics:
    """Load the feature extractors and add the reference images' FID features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    feature = fid_feature_extractor(fid_features, inception_weights)
    try:
        fid = FrechetInceptionDistance(feature=feature, reset_real_features=False,
                                       feature_extractor_weights_path=inception_weights)
    except (OSError, RuntimeError, ValueError) as err:  # no network for the download, a bad weights file
        raise MissingModelError(f"--inception-weights: could not load the FID Inception weights "
                                f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                f"give a local copy of pt_inception-2015-12-05-6726825d.pth") from None
    for start in tqdm(range(0, len(reference), batch_size), desc="reference features", disable=not progress):
        chunk = []
        for path in reference[start:start + batch_size]:
            with Image.open(path) as im:
                chunk.append(im.convert("RGB"))
        fid.update(to_uint8_batch(chunk, fid_size), real=True)
    clip = None
    if clip_model:
        from transformers import CLIPModel, CLIPProcessor

        clip = (_load(CLIPModel.from_pretrained, clip_model, "CLIP model", "--clip-model").eval(),
                _load(CLIPProcessor.from_pretrained, clip_model, "CLIP processor", "--clip-model"))
    return Metrics(fid=fid, clip=clip, fid_size=fid_size, reference_count=len(reference))


@torch.no_grad()
def score(metrics: Metrics, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
    """{"fid", "clip_score", "clip_per_image"} of generated images (prompts[i] made images[i]); the metrics'
    generated-image state is reset first, so one Metrics serves many evaluations."""
    out: dict = {"num_images": len(images), "num_reference": metrics.reference_count}
    if metrics.fid is not None:
        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 generated images, got {len(images)}")
        metrics.fid.reset()  # keeps the reference features (reset_real_features=False)
        metrics.fid.update(to_uint8_batch(images, metrics.fid_size), real=False)
        out["fid"] = float(metrics.fid.compute())
    if metrics.clip is not None:
        per_image = clip_scores(*metrics.clip, images, prompts)
        out["clip_score"] = float(np.mean(per_image))
        out["clip_per_image"] = per_image
    return out


@torch.no_grad()
def clip_scores(model, processor, images: Sequence[Image.Image], prompts: Sequence[str],
                batch_size: int = 16) -> list[float]:
    """CLIP score of each (image, prompt): 100 x max(cosine of CLIP's projected image and text embeddings, 0)
    (Hessel et al. 2021, torchmetrics' definition; its CLIPScore class does not run on transformers 5)."""
    scores: list[float] = []
    for start in range(0, len(images), batch_size):
        inputs = processor(text=list(prompts[start:start + batch_size]),
                           images=[im.convert("RGB") for im in images[start:start + batch_size]],
                           return_tensors="pt", padding=True, truncation=True)
        out = model(**inputs)  # image_embeds and text_embeds come L2-normalized
        cosine = (out.image_embeds * out.text_embeds).sum(dim=-1)
        scores += (100 * cosine.clamp(min=0)).tolist()
    return scores


def plot(result: dict, prompts: Sequence[str], path: Path) -> Path:
    """Per-prompt mean CLIP scores as bars, FID in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unique = list(dict.fromkeys(prompts))
    scores = result.get("clip_per_image")
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(unique) + 2), 4))
    if scores:
        means = [float(np.mean([s for s, p in zip(scores, prompts) if p == u])) for u in unique]
        ax.bar(range(len(unique)), means)
        ax.set_xticks(range(len(unique)), [u[:24] for u in unique], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("CLIP score")
    title = [f"FID {result['fid']:.2f}" if "fid" in result else None,
             f"CLIP score {result['clip_score']:.2f}" if "clip_score" in result else None]
    ax.set_title(", ".join(t for t in title if t) + f"  ({result['num_images']} images)")
    fig.tight_layout()
    tmp = temp_name(path)
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    publish(tmp, path)
    return path


def sample_prompts(generate: Callable[[list[str]], list[Image.Image]], prompts: Sequence[str], batch: int,
                   progress: bool = True) -> list[Image.Image]:
    """generate(chunk) over the prompts, `batch` at a time, with a progress bar."""
    images: list[Image.Image] = []
    for start in tqdm(range(0, len(prompts), batch), desc="sampling", unit="batch", disable=not progress):
        images += generate(list(prompts[start:start + batch]))
    return images


def build_parser() -> argparse.ArgumentParser:
    from training.sample import add_weights_args

    p = cli.parser("training.evaluate", __doc__)
    add_weights_args(p)
    p.add_argument("--prompt-file", required=True, help="prompts, one per line (blank lines and # comments skipped)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images sampled for each prompt")
    p.add_argument("--reference", required=True, help="folder of reference images (png, jpg, webp, searched "
                   "recursively) for FID")
    p.add_argument("--out", required=True, help="output folder: eval.json, eval.png and the samples")
    m = p.add_argument_group("metrics")
    m.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIPModel hub id or folder for the CLIP score "
                   "(with its processor); 'none' skips the CLIP score")
    m.add_argument("--fid-features", default="inception", help="FID feature extractor: inception (torch-fidelity's "
                   "FID Inception, 2048-d) or module:callable returning a torch module")
    m.add_argument("--inception-weights", help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth); "
                   "default: torch-fidelity's download")
    m.add_argument("--fid-size", type=int, default=DEFAULT_FID_SIZE, help="side every image is resized to for FID")
    cli.add_sampling_args(p)
    cli.add_device_args(p)
    return p


def run(args: argparse.Namespace) -> dict:
    from training.grid import save_png
    from training.sample import load_parts, read_prompt_file
    from training.sampling import generate_images

    prompts = read_prompt_file(args.prompt_file)
    if not prompts:
        raise ValueError(f"--prompt-file: {args.prompt_file} holds no prompts")
    if args.images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt: must be >= 1, got {args.images_per_prompt}")
    reference = read_reference(args.reference)
    # Metrics first: a missing Inception or CLIP model stops the run before any sampling.
    metrics = build_metrics(reference, args.fid_features, args.inception_weights,
                            None if args.clip_model == "none" else args.clip_model, args.fid_size, args.batch_size)
    parts = load_parts(args)
    if not parts.model.config.text_conditioned:
        raise ValueError("--checkpoint: a class-conditional checkpoint has no prompts to evaluate")
    generator = torch.Generator("cpu").manual_seed(args.seed)
    expanded = [p for p in prompts for _ in range(args.images_per_prompt)]
    images = sample_prompts(lambda chunk: generate_images(
        parts.model, parts.vae, parts.text_encoder, chunk, height=parts.height, width=parts.width,
        sampler=args.sampler, steps=parts.steps, guidance_scale=args.cfg_scale, generator=generator,
        batch_size=args.batch_size,
        prediction_type=parts.info.prediction_type, negative_prompt=args.negative_prompt), expanded, args.batch_size)
    result = score(metrics, images, expanded)
    out = Path(args.out)
    for i, image in enumerate(images):
        save_png(image, out / "samples" / f"{i:04d}.png")
    record = {**result, "checkpoint": str(parts.folder.resolve()), "ema": parts.used_ema,
              "prompt_file": str(args.prompt_file), "reference": str(args.reference),
              "images_per_prompt": args.images_per_prompt, "clip_model": args.clip_model,
              "fid_features": args.fid_features, "fid_size": args.fid_size, "sampler": args.sampler,
              "steps": parts.steps, "cfg_scale": args.cfg_scale, "seed": args.seed, "height": parts.height,
              "width": parts.width, "prompts": expanded}
    atomic_write_bytes(out / "eval.json", (json.dumps(record, indent=2) + "\n").encode())
    plot(result, expanded, out / "eval.png")
    return record


def main(argv: list[str] | None = None) -> dict:
    from training.model import StateDictMismatchError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        record = run(args)
    except (ValueError, FileNotFoundError, MissingModelError, StateDictMismatchError) as err:
        parser.error(" ".join(str(err).split("\n")))  # one line, naming the setting
    figures = ", ".join(f"{k} {record[k]:.3f}" for k in ("fid", "clip_score") if k in record)
    print(f"{figures} over {record['num_images']} images; wrote {Path(args.out) / 'eval.json'} and eval.png")
    return record


if __name__ == "__main__":
    main()


class HeldOutEvaluation:
    """The trainer's periodic evaluation (config `evaluation`, rank 0): FID and CLIP score of the current weights on
    a small held-out prompt file and reference folder. Everything is loaded once, at the start of the run (a missing
    model stops it before training): the reference features, CLIP, the VAE, and the prompts' T5 features (the
    encoder is freed afterwards)."""

    def __init__(self, config, model_config, latent_space, device: torch.device, dtype: torch.dtype):
        from common.autoencoder import Autoencoder
        from common.pretrained import load_text_encoder
        from training.model import PixArt
        from training.sample import read_prompt_file

        section, pre = config.evaluation, config.pretrained
        self.config, self.section = config, section
        self.prompts = [p for p in read_prompt_file(section.prompt_file) for _ in range(section.images_per_prompt)]
        self.metrics = build_metrics(read_reference(section.reference), section.fid_features,
                                     section.inception_weights, section.clip_model, section.fid_size,
                                     progress=False)
        # Decodes in the data's latent space, as the sample grids do (training.sample_grids).
        self.vae = Autoencoder.from_pretrained(pre.vae, model_class=pre.vae_class, subfolder=pre.vae_subfolder,
                                               setting="pretrained.vae", scaling_factor=latent_space.scaling_factor,
                                               shift_factor=latent_space.shift_factor).to(device)
        encoder = load_text_encoder(pre.text_encoder, setting="pretrained.text_encoder",
                                    max_length=model_config.caption_length, dtype=dtype)
        encoder.model.to(device)
        unique = list(dict.fromkeys(self.prompts))
        self.encoded = (unique, *encoder.encode(unique), model_config.caption_length)
        del encoder
        with torch.random.fork_rng(devices=[]):
            self.model = PixArt(model_config).to(device).eval()

    @torch.no_grad()
    def __call__(self, weights: dict[str, torch.Tensor]) -> dict:
        from training.sampling import generate_images
        from training.sample_grids import FixedPrompts

        s = self.section
        self.model.load_state_dict(weights, strict=True)
        generator = torch.Generator("cpu").manual_seed(s.seed)  # the same noise at every evaluation
        images = sample_prompts(lambda chunk: generate_images(
            self.model, self.vae, FixedPrompts(*self.encoded), chunk, sampler=s.sampler, steps=s.steps,
            guidance_scale=s.guidance_scale, generator=generator,
            prediction_type=self.config.diffusion.prediction_type), self.prompts, 8, progress=False)
        result = score(self.metrics, images, self.prompts)
        result.pop("clip_per_image", None)
        return result
