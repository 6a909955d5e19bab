"""Sample images from a trained PixArt weights folder.

    python -m training.sample --checkpoint runs/stage2/weights --prompt "a red bus in the snow"
        [--prompt ...] [--prompt-file prompts.txt] --out samples/ [--images-per-prompt 4] [--negative-prompt "blurry"]
        [--sampler dpm++|sa-solver|iddpm|euler|heun] [--steps N] [--cfg-scale 4.5] [--seed 0]

Writes one PNG per image (`000_a-red-bus-in-the-snow.png`, ...), `grid.png` with every image captioned, and
`samples.json` (prompts, files and settings). The VAE and the T5 encoder are the ones named in the folder's
`pipeline.json` (see "Weights on disk" in docs/ARCHITECTURE.md) unless --vae / --text-encoder say otherwise; each
is loaded with `from_pretrained` from a hub id or a local folder. EMA weights (`ema.safetensors`) are used when
present unless --no-ema.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common.autoencoder import Autoencoder
from common.durable import atomic_write_bytes
from common.pretrained import DEFAULT_T5, DEFAULT_VAE, MissingModelError, load_text_encoder
from training.flow import flow_from_config
from training.grid import image_grid, save_png
from training import cli
from training.model import PixArt, StateDictMismatchError
from training.sampling import check_image_size, check_sampler_args, generate_images
# The weights folder's contract lives in training.weights; these names are the sampler's public interface.
from training.weights import PIPELINE_NAME, PipelineInfo, locate, read_pipeline_info
from training.weights import EMA_NAME, write_pipeline_info  # noqa: F401  (names callers import from here)
from training.weights import load_model as load_weights


def load_autoencoder(info: PipelineInfo | None, name_or_path: str | None = None, subfolder: str | None = None,
                     model_class: str | None = None, in_channels: int | None = None, setting: str = "vae",
                     dtype: torch.dtype = torch.float32) -> Autoencoder:
    """The autoencoder pipeline.json names (or the one given), decoding in the latent space the model was trained
    in: pipeline.json's factors (without a pipeline.json, the autoencoder config's). Its latent channels must be
    the model's `in_channels`."""
    recorded = info is not None
    info = info or PipelineInfo()
    vae = Autoencoder.from_pretrained(name_or_path or info.vae, model_class=model_class or info.vae_class,
                                      subfolder=subfolder if name_or_path else (subfolder or info.vae_subfolder),
                                      dtype=dtype, setting=setting,
                                      scaling_factor=info.scaling_factor if recorded else None,
                                      shift_factor=info.vae_shift_factor if recorded else None)
    for expected in (in_channels, info.latent_channels):
        if expected is not None and vae.latent_channels != expected:
            raise ValueError(f"{setting}: {name_or_path or info.vae} has {vae.latent_channels} latent channels, the "
                             f"model takes {expected}")
    return vae


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "image"


def add_weights_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --ema and the models group: what load_parts reads."""
    p.add_argument("--checkpoint", required=True, help="a weights folder (config.json, model.safetensors, optional "
                   "ema.safetensors and pipeline.json), a run folder (its final weights) or a run's "
                   "checkpoints/step_N folder")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use ema.safetensors (default: when the folder has one)")
    models = p.add_argument_group("models (default: those named in the folder's pipeline.json)")
    models.add_argument("--vae", help=f"VAE hub id or folder (default: pipeline.json's, else {DEFAULT_VAE})")
    models.add_argument("--vae-class", help="diffusers class of the VAE (default: pipeline.json's, else "
                        "AutoencoderKL)")
    models.add_argument("--vae-subfolder", help="subfolder of --vae holding the VAE, e.g. vae (default: "
                        "pipeline.json's when --vae is not given)")
    models.add_argument("--text-encoder", help=f"T5 hub id or folder (default: pipeline.json's, else {DEFAULT_T5})")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("training.sample", __doc__)
    add_weights_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompt-file", help="a text file of prompts, one per line (blank lines and lines starting "
                   "with # are skipped); added after any --prompt")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images drawn for each prompt or class label")
    p.add_argument("--class-label", action="append", type=int, default=[],
                   help="a class index, for class-conditional (stage 1) checkpoints; repeat for several")
    p.add_argument("--out", required=True, help="output folder for the PNGs, grid.png and samples.json")
    cli.add_sampling_args(p)
    cli.add_device_args(p)
    return p


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a prompt file: one per line, blank lines and # comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt-file: {path} not found")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class Parts:
    """What sampling a weights folder needs, loaded as the CLI flags and the folder's pipeline.json say."""

    model: PixArt
    used_ema: bool
    info: PipelineInfo
    vae: object
    vae_id: str
    text_encoder: object | None
    encoder_id: str | None
    height: int
    width: int
    steps: int
    folder: Path  # the weights folder --checkpoint resolved to


def load_parts(args: argparse.Namespace) -> Parts:
    """Load the model, VAE and T5 for `args` (add_weights_args, cli.add_sampling_args, cli.add_device_args),
    checking the sampling arguments first. Errors name the argument at fault."""
    dtype = getattr(torch, args.dtype)
    located = locate(args.checkpoint)
    model, used_ema = load_weights(located.folder, args.ema, args.device, dtype)
    print(located.describe(used_ema), file=sys.stderr)
    cfg = model.config
    if args.negative_prompt is not None and not cfg.text_conditioned:
        raise ValueError("negative-prompt: a class-conditional checkpoint takes no prompts")
    if not args.cfg_scale >= 0:  # also NaN
        raise ValueError(f"--cfg-scale: must be >= 0 (1 = no guidance), got {args.cfg_scale}")
    steps = check_sampler_args(args.sampler, args.steps, args.cfg_scale)
    if args.batch_size < 1:
        raise ValueError(f"batch-size: must be >= 1, got {args.batch_size}")

    info = read_pipeline_info(located.folder)
    if info is None:
        print(f"{located.folder} has no {PIPELINE_NAME}; using the defaults unless flags say otherwise",
              file=sys.stderr)
    vae_id = args.vae or (info or PipelineInfo()).vae
    vae = load_autoencoder(info, args.vae, args.vae_subfolder, args.vae_class, cfg.in_channels, "--vae",
                           dtype).to(args.device)
    info = info or PipelineInfo()
    factor = vae.downsample_factor
    height = args.height if args.height is not None else cfg.input_size * factor
    width = args.width if args.width is not None else cfg.input_size * factor
    check_image_size(height, width, factor, cfg.patch_size)  # before the (large) text encoder loads

    text_encoder = None
    encoder_id = None
    if cfg.text_conditioned:
        encoder_id = args.text_encoder or info.text_encoder
        if not encoder_id:
            raise ValueError("text-encoder: pipeline.json names no text encoder; pass --text-encoder")
        text_encoder = load_text_encoder(encoder_id, setting="--text-encoder", max_length=cfg.caption_length,
                                         dtype=dtype)
        text_encoder.model.to(args.device)
    return Parts(model, used_ema, info, vae, vae_id, text_encoder, encoder_id, height, width, steps, located.folder)


def run(args: argparse.Namespace) -> dict:
    """Sample as the CLI does; returns the samples.json record. Raises ValueError/FileNotFoundError/
    MissingModelError/StateDictMismatchError with a message naming the argument at fault."""
    prompts = list(args.prompt) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if args.images_per_prompt < 1:
        raise ValueError(f"images-per-prompt: must be >= 1, got {args.images_per_prompt}")
    parts = load_parts(args)
    model, cfg, info = parts.model, parts.model.config, parts.info
    if cfg.text_conditioned and (not prompts or args.class_label):
        raise ValueError("prompt: this is a text-to-image checkpoint; give --prompt or --prompt-file "
                         "(and no --class-label)")
    if not cfg.text_conditioned and (not args.class_label or prompts):
        raise ValueError(f"class-label: this is a class-conditional checkpoint ({cfg.num_classes} classes); "
                         "give --class-label (and no --prompt)")
    vae, text_encoder, height, width, steps = parts.vae, parts.text_encoder, parts.height, parts.width, parts.steps
    vae_id, encoder_id, used_ema = parts.vae_id, parts.encoder_id, parts.used_ema

    images = generate_images(
        model, vae, text_encoder, prompts=prompts or None, class_labels=args.class_label or None,
        height=height, width=width, sampler=args.sampler, steps=steps, guidance_scale=args.cfg_scale,
        seed=args.seed, batch_size=args.batch_size, progress=True,
        prediction_type=info.prediction_type, flow=flow_from_config(info, cfg.patch_size),
        negative_prompt=args.negative_prompt, images_per_prompt=args.images_per_prompt,
    )

    out = Path(args.out)
    values = prompts if cfg.text_conditioned else args.class_label
    values = [v for v in values for _ in range(args.images_per_prompt)]  # generate_images' order
    labels = values if cfg.text_conditioned else [f"class {c}" for c in values]
    files = []
    for i, (image, label) in enumerate(zip(images, labels)):
        files.append(save_png(image, out / f"{i:03d}_{_slug(label)}.png").name)
    save_png(image_grid(images, captions=labels), out / "grid.png")
    record = {
        "checkpoint": str(parts.folder.resolve()), "ema": used_ema, "vae": vae_id,
        "text_encoder": encoder_id, "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor,
        "sampler": args.sampler, "steps": steps, "objective": info.objective,
        "cfg_scale": args.cfg_scale, "negative_prompt": args.negative_prompt, "seed": args.seed,
        "images_per_prompt": args.images_per_prompt, "height": height, "width": width, "dtype": args.dtype,
        "images": [{"file": f, ("prompt" if cfg.text_conditioned else "class_label"): v}
                   for f, v in zip(files, values)],
        "grid": "grid.png",
    }
    atomic_write_bytes(out / "samples.json", (json.dumps(record, indent=2) + "\n").encode())
    return record


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        record = run(args)
    except (ValueError, FileNotFoundError, MissingModelError, StateDictMismatchError) as err:
        parser.error(str(err))
    print(f"wrote {len(record['images'])} images and grid.png to {args.out}")


if __name__ == "__main__":
    main()
