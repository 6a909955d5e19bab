"""Rectified flow and TREAD through the real trainer: the objective reaches pipeline.json, `training.sample` follows
it, and the exported diffusers pipeline samples the same images from the same noise."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from tests.test_trainer import base_config, data_root, write_yaml  # noqa: F401 (data_root is a fixture)
from training.train_config import load_train_config
from training.trainer import train


@pytest.fixture(scope="module")
def flow_weights(data_root, tmp_path_factory, tiny_vae_dir, tiny_t5_dir):  # noqa: F811
    tmp = tmp_path_factory.mktemp("flow")
    cfg = write_yaml(tmp / "c.yaml", base_config(
        data_root, tmp / "run", run={"steps": 6, "checkpoint_every": 6},
        diffusion={"objective": "rectified_flow", "flow_shift": 2.0, "logit_std": 0.8},
        routing={"rate": 0.5, "start": 0, "end": 1},
        pretrained={"vae": str(tiny_vae_dir), "text_encoder": str(tiny_t5_dir)},
        sampling={"every": 6, "prompts": ["pattern 0"], "steps": 2, "sampler": "euler"}))
    result = train(load_train_config(cfg))
    assert len(result.losses) == 6 and all(np.isfinite(result.losses))
    assert (tmp / "run" / "samples" / "step_00000006.png").is_file()  # the grid sampled the flow model
    return tmp / "run" / "final"


@pytest.mark.slow
def test_the_objective_is_recorded_and_followed_by_the_sampler(flow_weights, tmp_path):
    from training.sample import build_parser, run
    from training.weights import read_pipeline_info

    info = read_pipeline_info(flow_weights)
    assert (info.objective, info.flow_shift, info.logit_std) == ("rectified_flow", 2.0, 0.8)
    record = run(build_parser().parse_args(["--checkpoint", str(flow_weights), "--prompt", "pattern 1",
                                            "--out", str(tmp_path), "--sampler", "heun", "--steps", "2"]))
    assert record["objective"] == "rectified_flow" and (tmp_path / record["images"][0]["file"]).is_file()
    with pytest.raises(ValueError, match="rectified-flow"):
        run(build_parser().parse_args(["--checkpoint", str(flow_weights), "--prompt", "x", "--out", str(tmp_path),
                                       "--sampler", "iddpm"]))


@pytest.mark.slow
def test_an_exported_flow_model_samples_in_diffusers_like_training_sample(flow_weights, tmp_path):
    """Side by side, same weights, prompts, noise and 8 DPM-Solver++ steps: PixArtAlphaPipeline with the exported
    scheduler against training.sampling. Guidance 1: the pipeline guides against the T5 encoding of "", our sampler
    against the model's learned null caption (PixArt's), so only the conditional path is comparable."""
    from diffusers import PixArtAlphaPipeline

    from common.pretrained import load_text_encoder
    from training.export import export
    from training.flow import flow_from_config
    from training.sample import load_autoencoder
    from training.sampling import generate_images
    from training.weights import load_model, read_pipeline_info

    folder, _ = export(flow_weights, tmp_path / "pipe")
    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.config.use_flow_sigmas
    assert pipe.scheduler.config.flow_shift == 2.0
    prompts = ["pattern 0", "pattern 1"]
    theirs = pipe(prompts, num_inference_steps=8, height=64, width=64, guidance_scale=1.0, output_type="np",
                  use_resolution_binning=False, clean_caption=False,
                  generator=torch.Generator().manual_seed(3)).images

    info = read_pipeline_info(flow_weights)
    model, _ = load_model(flow_weights)
    ours = generate_images(model, load_autoencoder(info), load_text_encoder(info.text_encoder, max_length=120),
                           prompts, height=64, width=64, sampler="dpm++", steps=8, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(3), batch_size=2,
                           flow=flow_from_config(info, model.config.patch_size))
    ours = np.stack([np.asarray(image, dtype=np.float64) / 255.0 for image in ours])
    assert np.abs(ours - theirs).max() <= 1.5 / 255  # the same picture; ours is rounded to 8 bits
    assert ours.std() > 0.01
