"""`python -m training.export`: a diffusers PixArtAlphaPipeline folder built from our weights, loaded back and run."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import PixArtAlphaPipeline

from training.export import main as export_main
from training.model import PRESETS, PixArt


def random_model(seed: int) -> PixArt:
    torch.manual_seed(seed)
    model = PixArt(PRESETS["tiny"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_t5_dir, tiny_vae_dir):
    """A weights folder as the trainer writes it: model + EMA weights and pipeline.json naming VAE and T5."""
    folder = tmp_path_factory.mktemp("weights")
    random_model(0).save_pretrained(folder)
    random_model(1).save_pretrained(folder, filename="ema.safetensors")
    (folder / "pipeline.json").write_text(json.dumps({
        "vae": str(tiny_vae_dir), "vae_class": "AutoencoderKL", "scaling_factor": 0.3,
        "text_encoder": str(tiny_t5_dir)}))
    return folder


def transformer_outputs(ours: PixArt, pipeline: PixArtAlphaPipeline):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    caption = torch.randn(2, 120, 32, generator=g)
    mask = torch.arange(120)[None] < torch.tensor([[30], [120]])
    with torch.no_grad():
        a = ours(x, t, caption, mask)
        b = pipeline.transformer(x, encoder_hidden_states=caption, encoder_attention_mask=mask, timestep=t,
                                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return a, b


def test_export_loads_in_diffusers_and_matches_our_model(weights, tmp_path):
    out = export_main(["--checkpoint", str(weights), "--out", str(tmp_path / "pipe")])
    parts = {"transformer", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"}
    assert parts <= {p.name for p in out.iterdir()}
    pipe = PixArtAlphaPipeline.from_pretrained(out)
    # EMA weights by default (the folder has them), the trained scaling factor, DPM-Solver++ over the training betas
    a, b = transformer_outputs(PixArt.from_pretrained(weights, filename="ema.safetensors"), pipe)
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
    assert pipe.vae.config.scaling_factor == 0.3
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.beta_end == 0.02
    assert pipe.scheduler.config.prediction_type == "epsilon"  # PixArt's, when pipeline.json names none
    image = pipe("a red circle on a blue square", num_inference_steps=2, height=64, width=64, guidance_scale=4.5,
                 use_resolution_binning=False, clean_caption=False, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_no_ema_exports_the_model_weights_and_flags_override_pipeline_json(weights, tmp_path, tiny_vae_dir):
    out = export_main(["--checkpoint", str(weights), "--out", str(tmp_path / "pipe"), "--weights", "model",
                       "--vae", str(tiny_vae_dir)])
    pipe = PixArtAlphaPipeline.from_pretrained(out)
    a, b = transformer_outputs(PixArt.from_pretrained(weights), pipe)
    assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_mismatched_text_encoder_and_missing_models_give_clear_errors(tmp_path, tiny_t5_dir, tiny_vae_dir, capsys):
    wide = tmp_path / "wide"
    PixArt(dataclasses.replace(PRESETS["tiny"], caption_channels=64)).save_pretrained(wide)
    for args, needle in ((["--vae", str(tiny_vae_dir), "--text-encoder", str(tiny_t5_dir)], "caption_channels=64"),
                         (["--vae", str(tmp_path / "no-vae")], "--vae"),
                         (["--weights", "ema"], "ema.safetensors")):
        with pytest.raises(SystemExit) as exit_:
            export_main(["--checkpoint", str(wide), "--out", str(tmp_path / "a"), *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_a_v_prediction_model_exports_a_v_prediction_scheduler(weights, tmp_path):
    """pipeline.json's prediction_type (the trainer's diffusion.prediction_type) reaches the exported scheduler."""
    folder = tmp_path / "weights"
    shutil.copytree(weights, folder)
    info = json.loads((folder / "pipeline.json").read_text())
    (folder / "pipeline.json").write_text(json.dumps({**info, "prediction_type": "v_prediction"}))
    pipe = PixArtAlphaPipeline.from_pretrained(export_main(["--checkpoint", str(folder), "--out", str(tmp_path / "p")]))
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_the_weights_choice_is_printed_and_the_call_written_to_a_readme(weights, tmp_path, capsys):
    out = export_main(["--checkpoint", str(weights), "--out", str(tmp_path / "pipe")])
    printed = capsys.readouterr().out
    assert "exporting the EMA weights: using" in printed and "ema.safetensors" in printed
    # A 64-px model is not in diffusers' resolution-binning tables: the call says so.
    call = "pipe(prompt, height=64, width=64, use_resolution_binning=False, clean_caption=False)"
    assert call in printed and call in (out / "README.md").read_text()
    assert json.loads((out / "pixart_export.json").read_text())["call"] == call
    export_main(["--checkpoint", str(weights), "--out", str(tmp_path / "pipe"), "--weights", "model"])
    assert "exporting the model weights: using" in capsys.readouterr().out


def run_call(out, call: str, **extra):
    """Run the exported folder's README call as a user would (plus test-speed settings)."""
    pipe = PixArtAlphaPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    steps = dict(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **extra)
    return eval(call.replace("pipe(prompt", "pipe(prompt, **steps"), {"pipe": pipe, "prompt": "a red bus",
                                                                     "steps": steps}).images


def test_a_binned_size_works_with_the_default_call(tmp_path, tiny_t5_dir, tiny_vae_dir, capsys, caplog):
    folder = tmp_path / "w256"
    torch.manual_seed(0)
    PixArt(dataclasses.replace(PRESETS["tiny"], input_size=32)).save_pretrained(folder)
    (folder / "pipeline.json").write_text(json.dumps({"vae": str(tiny_vae_dir), "text_encoder": str(tiny_t5_dir)}))
    out = export_main(["--checkpoint", str(folder), "--out", str(tmp_path / "pipe")])
    assert "pipe(prompt, clean_caption=False)" in capsys.readouterr().out
    pipe = PixArtAlphaPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING"):
        image = pipe("a red bus", num_inference_steps=2, clean_caption=False, output_type="np").images
    assert image.shape == (1, 256, 256, 3) and not [r for r in caplog.records if "clean_caption" in r.getMessage()]


def test_a_multi_scale_model_below_1024_px_gets_its_micro_conditions(tmp_path, tiny_t5_dir, tiny_vae_dir, capsys):
    """tiny-MS (8 latents, 64 px) as stage3_512's models are: exported declaring sample_size 128 so that diffusers
    passes resolution and aspect ratio, with the same position embedding; the README call samples it."""
    folder = tmp_path / "ms"
    torch.manual_seed(0)
    ours = PixArt(PRESETS["tiny-MS"]).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    ours.save_pretrained(folder)
    (folder / "pipeline.json").write_text(json.dumps({"vae": str(tiny_vae_dir), "text_encoder": str(tiny_t5_dir)}))
    out = export_main(["--checkpoint", str(folder), "--out", str(tmp_path / "pipe")])
    assert "use_resolution_binning=False" in capsys.readouterr().out
    pipe = PixArtAlphaPipeline.from_pretrained(out)
    assert pipe.transformer.config.sample_size == 128 and pipe.transformer.use_additional_conditions
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([10, 900])  # also a grid of another shape
    caption = torch.randn(2, 120, 32, generator=g)
    res, ar = torch.tensor([[64.0, 96.0]] * 2), torch.tensor([[64 / 96]] * 2)
    with torch.no_grad():
        a = ours(x, t, caption, resolution=res, aspect_ratio=ar)
        b = pipe.transformer(x, encoder_hidden_states=caption, timestep=t,
                             added_cond_kwargs={"resolution": res, "aspect_ratio": ar}).sample
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
    call = json.loads((out / "pixart_export.json").read_text())["call"]
    image = run_call(out, call)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_a_vae_in_a_subfolder_of_a_pipeline_folder_exports(weights, tmp_path, tiny_vae_dir, tiny_t5_dir):
    """pipeline.json's vae_subfolder (a diffusers pipeline folder or repo holding the VAE under vae/) is honoured."""
    from training.weights import PipelineInfo, write_pipeline_info

    folder = tmp_path / "weights"
    shutil.copytree(weights, folder)
    shutil.copytree(tiny_vae_dir, tmp_path / "sd" / "vae")
    write_pipeline_info(folder, PipelineInfo(vae=str(tmp_path / "sd"), vae_subfolder="vae", scaling_factor=0.3,
                                             text_encoder=str(tiny_t5_dir)))
    out = export_main(["--checkpoint", str(folder), "--out", str(tmp_path / "pipe")])
    vae = PixArtAlphaPipeline.from_pretrained(out).vae
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.3
