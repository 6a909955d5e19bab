"""Export trained PixArt weights as a diffusers `PixArtAlphaPipeline` folder (transformer, VAE, T5, tokenizer,
scheduler), with a README.md that gives the exact call.

    python -m training.export --checkpoint WEIGHTS_FOLDER --out FOLDER [--weights ema|model]
                              [--vae ID_OR_PATH] [--text-encoder ID_OR_PATH]

The VAE and text encoder default to those named in the weights folder's pipeline.json (what the model was trained
with); both load through common.pretrained, so a missing model says which flag to set. The result loads with
`PixArtAlphaPipeline.from_pretrained(FOLDER)`; the call to make is printed and written to FOLDER/README.md:

- `clean_caption=False`: the model was trained on captions as written; diffusers' default would rewrite prompts
  (and, without Beautiful Soup and ftfy installed, warn on every call and skip the rewrite).
- A model whose native latent size is not one of diffusers' resolution-binning tables (32, 64, 128: 256, 512,
  1024 px) needs `height`, `width` and `use_resolution_binning=False`.
- A multi-scale model (micro_conditions) gets its size and aspect-ratio micro-conditions from PixArtAlphaPipeline
  only when the transformer's sample_size is 128; other sizes are exported declaring sample_size 128 with the
  position-embedding interpolation rescaled so the network computes the same function, and are called at their
  trained size with `use_resolution_binning=False`. diffusers feeds height / width as the aspect ratio, where the
  official code (and our training, by default) feeds the table's ratio key: the same for square images, within 1%
  for the bucket sizes.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from common.autoencoder import Autoencoder
from common.durable import publish_replacing
from common.pretrained import DEFAULT_T5, DEFAULT_VAE, MissingModelError, load_text_encoder
from training import cli
from training.checkpoint import to_diffusers
from training.flow import RectifiedFlow, flow_from_config
from training.model import PixArt, StateDictMismatchError
from training.sampling import dpm_solver_scheduler
from training.weights import EMA_NAME, MODEL_NAME, PipelineInfo, load_model, locate, read_pipeline_info

WEIGHT_FILES = {"ema": EMA_NAME, "model": MODEL_NAME}
# Latent sizes PixArtAlphaPipeline has resolution-binning tables for; 128 also gets the micro-conditions.
BINNED_SAMPLE_SIZES = (32, 64, 128)
MICRO_CONDITION_SAMPLE_SIZE = 128


@dataclass
class ExportSources:
    """Where the non-transformer components come from."""

    vae: str
    vae_class: str
    scaling_factor: float | None  # the latent space trained in (pipeline.json's); None: the VAE config's
    text_encoder: str
    prediction_type: str = "epsilon"
    vae_subfolder: str | None = None
    shift_factor: float | None = None
    flow: RectifiedFlow | None = None  # a rectified-flow model's objective (pipeline.json), else None


def export_scheduler(model: PixArt, sources: ExportSources):
    """The sampler training.sample uses by default, as a diffusers scheduler: DPM-Solver++ on the IDDPM schedule
    for the prediction type, or on the flow path (flow sigmas, velocity input, the time shift at the model's native
    size) for a rectified-flow model."""
    if sources.flow is not None:
        return sources.flow.scheduler("dpm++", sources.flow.tokens((model.config.input_size,) * 2))
    return dpm_solver_scheduler(prediction_type=sources.prediction_type)


def read_sources(checkpoint: Path, vae: str | None = None, text_encoder: str | None = None,
                 patch_size: int = 2) -> ExportSources:
    """Flags win over the weights folder's pipeline.json (training.weights.PipelineInfo), which wins over the
    PixArt-alpha defaults. A --vae flag names a VAE of its own, so pipeline.json's subfolder does not apply to it."""
    recorded = read_pipeline_info(checkpoint)
    info = recorded or PipelineInfo()
    return ExportSources(
        vae=vae or info.vae,
        vae_class=info.vae_class,
        scaling_factor=info.scaling_factor if recorded is not None else None,
        text_encoder=text_encoder or info.text_encoder or DEFAULT_T5,
        prediction_type=info.prediction_type,
        vae_subfolder=None if vae else info.vae_subfolder,
        shift_factor=info.vae_shift_factor if recorded is not None else None,
        flow=flow_from_config(info, patch_size),
    )


def choose_weights(checkpoint: Path, weights: str | None) -> str:
    """'ema' or 'model': as asked, else EMA when the folder has it. Asking for absent EMA weights is an error."""
    if weights is None:
        return "ema" if (checkpoint / EMA_NAME).is_file() else "model"
    if weights not in WEIGHT_FILES:
        raise ValueError(f"--weights: {weights!r} is not one of {', '.join(WEIGHT_FILES)}")
    if not (checkpoint / WEIGHT_FILES[weights]).is_file():
        raise FileNotFoundError(f"--weights {weights}: {checkpoint} has no {WEIGHT_FILES[weights]}"
                                + (f"; export {MODEL_NAME} with --weights model" if weights == "ema" else ""))
    return weights


def declared_sample_size(model: PixArt) -> int:
    """The transformer sample_size the export declares: the model's own, or 128 for a multi-scale model, the only
    size PixArtAlphaPipeline passes micro-conditions to."""
    cfg = model.config
    return MICRO_CONDITION_SAMPLE_SIZE if cfg.micro_conditions else cfg.input_size


def pipeline_call(model: PixArt, vae_factor: int) -> str:
    """The PixArtAlphaPipeline call that samples this model as it was trained."""
    cfg = model.config
    args = ["prompt"]
    if declared_sample_size(model) != cfg.input_size or cfg.input_size not in BINNED_SAMPLE_SIZES:
        side = cfg.input_size * vae_factor
        args += [f"height={side}", f"width={side}", "use_resolution_binning=False"]
    args.append("clean_caption=False")
    return f"pipe({', '.join(args)})"


def pixart_pipeline_refusal(vae: Autoencoder) -> str | None:
    """Why PixArtAlphaPipeline cannot decode this model's latents, or None. The pipeline declares an AutoencoderKL,
    sizes latents by 2 ** (len(vae.config.block_out_channels) - 1) and decodes vae.decode(latents / scaling_factor):
    it has no shift."""
    from diffusers import AutoencoderKL

    if type(vae.model) is not AutoencoderKL:
        return (f"PixArtAlphaPipeline takes an AutoencoderKL; this model was trained on {type(vae.model).__name__} "
                f"latents (sample with python -m training.sample instead)")
    if vae.shift_factor:
        return (f"PixArtAlphaPipeline decodes latents / scaling_factor without a shift; this model's latents have "
                f"shift_factor {vae.shift_factor} (sample with python -m training.sample instead)")
    return None


def build_pipeline(model: PixArt, sources: ExportSources):
    """A PixArtAlphaPipeline around `model` (converted to PixArtTransformer2DModel) and the named VAE and T5."""
    from diffusers import PixArtAlphaPipeline

    cfg = model.config
    vae = Autoencoder.from_pretrained(sources.vae, model_class=sources.vae_class, subfolder=sources.vae_subfolder,
                                      setting="--vae (or 'vae' in pipeline.json)",
                                      scaling_factor=sources.scaling_factor, shift_factor=sources.shift_factor)
    refusal = pixart_pipeline_refusal(vae)
    if refusal:
        raise ValueError(f"--vae: {refusal}")
    if vae.latent_channels != cfg.in_channels:
        raise ValueError(f"--vae {sources.vae}: {vae.latent_channels} latent channels, the model expects "
                         f"{cfg.in_channels}")
    # The latents were scaled with pipeline.json's factor during training; the pipeline must unscale with it.
    vae.model.register_to_config(scaling_factor=vae.scaling_factor)
    text = load_text_encoder(sources.text_encoder, setting="--text-encoder (or 'text_encoder' in pipeline.json)")
    if text.width != cfg.caption_channels:
        raise ValueError(f"--text-encoder {sources.text_encoder}: {text.width}-wide features, the model expects "
                         f"caption_channels={cfg.caption_channels}")
    transformer = to_diffusers(model.float(), sample_size=declared_sample_size(model))
    return PixArtAlphaPipeline(tokenizer=text.tokenizer, text_encoder=text.model, vae=vae.model, transformer=transformer,
                               scheduler=export_scheduler(model, sources))


def readme(call: str, weights: str, checkpoint: Path, model: PixArt, declared: int) -> str:
    cfg = model.config
    lines = [
        "# PixArt-alpha pipeline exported by training.export", "",
        f"Weights: {WEIGHT_FILES[weights]} ({'EMA' if weights == 'ema' else 'model'}) of `{checkpoint}`.", "",
        "```python", "from diffusers import PixArtAlphaPipeline", "",
        "pipe = PixArtAlphaPipeline.from_pretrained(\"<this folder>\")",
        f"image = {call}.images[0]", "```", "",
        "- `clean_caption=False`: the model was trained on captions as written; diffusers' default (True) rewrites "
        "the prompt, and without Beautiful Soup and ftfy warns on every call.",
    ]
    if "use_resolution_binning=False" in call:
        lines.append(f"- Trained at {cfg.input_size} latents per side: call with that size and "
                     "`use_resolution_binning=False` (diffusers bins only 256, 512 and 1024 px models).")
    if declared != cfg.input_size:
        lines.append(f"- Multi-scale model: the transformer declares sample_size {declared} (diffusers passes the "
                     "micro-conditions only then) with interpolation_scale rescaled so its position embedding is "
                     f"the trained one; the trained size is {cfg.input_size}.")
    if cfg.micro_conditions and cfg.aspect_ratio_input == "bucket_key":
        lines.append("- diffusers feeds height / width as the aspect-ratio micro-condition; the model was trained "
                     "with the official table's ratio key (equal for square images, within 1% for bucket sizes).")
    return "\n".join(lines) + "\n"


def export(checkpoint: str | Path, out: str | Path, vae: str | None = None, text_encoder: str | None = None,
           weights: str | None = None, log=print) -> tuple[Path, str]:
    """Write the pipeline folder `out` (through a temp folder renamed when complete); returns (folder, the call to
    make). weights: 'ema', 'model', or None for EMA when the weights folder has it; the choice is logged."""
    located, out = locate(checkpoint), Path(out)
    checkpoint = located.folder
    weights = choose_weights(checkpoint, weights)
    model, _ = load_model(checkpoint, weights == "ema")
    log(f"exporting the {'EMA' if weights == 'ema' else 'model'} weights: {located.describe(weights == 'ema')}")
    pipeline = build_pipeline(model, read_sources(checkpoint, vae, text_encoder, model.config.patch_size))
    call = pipeline_call(model, pipeline.vae_scale_factor)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    (tmp / "pixart_export.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint.resolve()), "weights": WEIGHT_FILES[weights], "call": call,
         "pixart_config": model.config.to_dict()}, indent=2) + "\n")
    (tmp / "README.md").write_text(readme(call, weights, checkpoint, model, declared_sample_size(model)))
    publish_replacing(tmp, out)  # the old export stays whole until the new one is complete and synced
    return out, call


def main(argv: list[str] | None = None) -> Path:
    parser = cli.parser("training.export", __doc__)
    parser.add_argument("--checkpoint", required=True, help="a weights folder (config.json + model.safetensors), a run "
                        "folder (its final weights) or a run's checkpoints/step_N folder")
    parser.add_argument("--out", required=True, help="pipeline folder to write")
    parser.add_argument("--weights", choices=tuple(WEIGHT_FILES), help="which weights to export: ema "
                        "(ema.safetensors) or model (model.safetensors) (default: ema when the folder has it)")
    parser.add_argument("--vae", help=f"VAE hub id or folder (default: pipeline.json's, else {DEFAULT_VAE})")
    parser.add_argument("--text-encoder", help=f"T5 hub id or folder (default: pipeline.json's, else {DEFAULT_T5})")
    args = parser.parse_args(argv)
    try:
        out, call = export(args.checkpoint, args.out, args.vae, args.text_encoder, args.weights)
    except (ValueError, FileNotFoundError, MissingModelError, StateDictMismatchError) as err:
        parser.error(str(err))
    print(f"wrote {out}; sample with (also in {out / 'README.md'}):\n"
          f"    pipe = diffusers.PixArtAlphaPipeline.from_pretrained({str(out)!r})\n    {call}", file=sys.stdout)
    return out


if __name__ == "__main__":
    main()
