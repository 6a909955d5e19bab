"""Export trained PixArt weights as a diffusers `PixArtAlphaPipeline` folder (transformer, VAE, T5, tokenizer, scheduler).

    python -m training.export --checkpoint WEIGHTS_FOLDER --out FOLDER [--vae ID_OR_PATH] [--text-encoder ID_OR_PATH]
                              [--ema/--no-ema]

The VAE and text encoder default to those named in the weights folder's pipeline.json (what the model was trained
with); both load through common.pretrained, so a missing model says which flag to set. The result loads with
`PixArtAlphaPipeline.from_pretrained(FOLDER)`.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from common.autoencoder import Autoencoder
from common.pretrained import DEFAULT_T5, DEFAULT_VAE, load_text_encoder
from training.checkpoint import to_diffusers
from training.flow import RectifiedFlow, flow_from_config
from training.model import PixArt
from training.sampling import dpm_solver_scheduler
from training.weights import EMA_NAME, MODEL_NAME, PipelineInfo, load_model, locate, read_pipeline_info


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
    if cfg.micro_conditions and cfg.input_size != 128:
        # PixArtAlphaPipeline passes resolution/aspect ratio only when transformer sample_size == 128 (1024 px).
        raise ValueError(f"PixArtAlphaPipeline feeds micro-conditions only to 1024-px models (input_size=128); this "
                         f"model has micro_conditions=True and input_size={cfg.input_size}")
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
    return PixArtAlphaPipeline(tokenizer=text.tokenizer, text_encoder=text.model, vae=vae.model,
                               transformer=to_diffusers(model.float()),
                               scheduler=export_scheduler(model, sources))


def export(checkpoint: str | Path, out: str | Path, vae: str | None = None, text_encoder: str | None = None,
           ema: bool | None = None) -> Path:
    """Write the pipeline folder `out` (through a temp folder renamed when complete). ema=None uses
    ema.safetensors when the weights folder has one."""
    located, out = locate(checkpoint), Path(out)
    checkpoint = located.folder
    model, ema = load_model(checkpoint, ema)
    print(located.describe(ema), flush=True)
    pipeline = build_pipeline(model, read_sources(checkpoint, vae, text_encoder, model.config.patch_size))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    (tmp / "pixart_export.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint.resolve()), "weights": EMA_NAME if ema else MODEL_NAME,
         "pixart_config": model.config.to_dict()}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Export PixArt weights as a diffusers PixArtAlphaPipeline folder.")
    parser.add_argument("--checkpoint", required=True, help="a weights folder (config.json + model.safetensors), a run "
                        "folder (its final weights) or a run's checkpoints/step_N folder")
    parser.add_argument("--out", required=True, help="pipeline folder to write")
    parser.add_argument("--vae", help="VAE hub id or folder (default: pipeline.json's, else %s)" % DEFAULT_VAE)
    parser.add_argument("--text-encoder", help="T5 hub id or folder (default: pipeline.json's, else %s)" % DEFAULT_T5)
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="export ema.safetensors (default: when the weights folder has it)")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_dir():
        parser.error(f"--checkpoint {args.checkpoint}: not a folder")
    out = export(args.checkpoint, args.out, args.vae, args.text_encoder, args.ema)
    print(f"wrote {out}  (load with diffusers.PixArtAlphaPipeline.from_pretrained({str(out)!r}))")
    return out


if __name__ == "__main__":
    main()
