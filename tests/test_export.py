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
    out = export_main(["--checkpoint", str(weights), "--out", str(tmp_path / "pipe"), "--no-ema",
                       "--vae", str(tiny_vae_dir)])
    pipe = PixArtAlphaPipeline.from_pretrained(out)
    a, b = transformer_outputs(PixArt.from_pretrained(weights), pipe)
    assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_mismatched_text_encoder_and_missing_models_give_clear_errors(tmp_path, tiny_t5_dir, tiny_vae_dir):
    from common.pretrained import MissingModelError

    wide = tmp_path / "wide"
    PixArt(dataclasses.replace(PRESETS["tiny"], caption_channels=64)).save_pretrained(wide)
    with pytest.raises(ValueError, match="caption_channels=64"):
        export_main(["--checkpoint", str(wide), "--out", str(tmp_path / "a"),
                     "--vae", str(tiny_vae_dir), "--text-encoder", str(tiny_t5_dir)])
    with pytest.raises(MissingModelError, match="--vae"):
        export_main(["--checkpoint", str(wide), "--out", str(tmp_path / "b"), "--vae", str(tmp_path / "no-vae")])
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        export_main(["--checkpoint", str(wide), "--out", str(tmp_path / "c"), "--ema"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_v_prediction_model_exports_a_v_prediction_scheduler(weights, tmp_path):
    """pipeline.json's prediction_type (the trainer's diffusion.prediction_type) reaches the exported scheduler."""
    folder = tmp_path / "weights"
    shutil.copytree(weights, folder)
    info = json.loads((folder / "pipeline.json").read_text())
    (folder / "pipeline.json").write_text(json.dumps({**info, "prediction_type": "v_prediction"}))
    pipe = PixArtAlphaPipeline.from_pretrained(export_main(["--checkpoint", str(folder), "--out", str(tmp_path / "p")]))
    assert pipe.scheduler.config.prediction_type == "v_prediction"


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
