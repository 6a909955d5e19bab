"""What the training command lines share: one help style and the sampling and device options.

Every entry point (`training.sample`, `training.evaluate`, `training.export`, `training.checkpoint`) builds its
parser with `parser(prog, doc)`, so `--help` looks the same everywhere: the module's usage block verbatim, and
each option's default printed once, by argparse, unless its help already says what the default is.
"""
from __future__ import annotations

import argparse

import torch

from training.sampling import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, SAMPLER_HELP, SAMPLERS


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written; "(default: X)" appended once, only where the help does not already say
    "default" and there is a default worth printing (not None, False or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser for `python -m prog` whose description is the module docstring."""
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=doc, formatter_class=HelpFormatter)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --cfg-scale, --negative-prompt, --seed, --height, --width, --batch-size."""
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=SAMPLERS, default="dpm++", help=f"{SAMPLER_HELP} (default: dpm++)")
    g.add_argument("--steps", type=int, help="sampling steps (default: the sampler's: " +
                   ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    g.add_argument("--cfg-scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                   help="classifier-free guidance scale; 1 samples the conditional model alone")
    g.add_argument("--negative-prompt", help="guide away from this prompt instead of the model's null caption "
                   "(default: the null caption, as PixArt-alpha samples)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random stream every image is drawn from in "
                   "turn: the same seed, prompts and settings give the same images on any device")
    g.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    g.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    g.add_argument("--batch-size", type=int, default=4, help="images sampled together (memory, not results: "
                   "a prompt's image depends only on its place in the list)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype."""
    g = p.add_argument_group("device")
    g.add_argument("--device", default=default_device(), help="torch device the models run on, e.g. cuda, "
                   "cuda:1, cpu (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the transformer, VAE and text encoder")
