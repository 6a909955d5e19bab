"""The user story end to end: fine-tune a tiny model from a diffusers-format folder with LoRA (the trainer on
DeepSpeed, evaluated every few steps), export it, run it in diffusers' PixArtAlphaPipeline with the README call and
with the adapter loaded, and evaluate it with `training.evaluate`."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from diffusers import PixArtAlphaPipeline

from tests.shard_fixtures import FixtureSpec, write_dataset
from tests.test_evaluate import save_tiny_clip
from tests.test_init_sources import diffusers_tiny
from training.evaluate import main as evaluate_main
from training.export import export
from training.train_config import load_train_config
from training.trainer import train


@pytest.mark.slow
def test_finetune_a_diffusers_model_with_lora_export_and_evaluate(tmp_path, tiny_vae_dir, tiny_t5_dir):
    from PIL import Image

    data = tmp_path / "shards"
    write_dataset(data, FixtureSpec({(64, 64): 8}, units=1))
    released = tmp_path / "released"
    diffusers_tiny().save_pretrained(released / "transformer")
    (released / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200 - 30 * i)).save(reference / f"{i}.png")
    (tmp_path / "heldout.txt").write_text("pattern 0\npattern 1\n")
    clip = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "run"
    config = {
        "stage": 3, "name": "lora", "model": {"preset": "tiny"},
        "data": {"root": str(data), "caption": "llava", "batch_size": 4, "num_workers": 0},
        "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "init": {"weights": str(released)},
        "lora": {"rank": 4, "targets": ["self_attention", "cross_attention", "mlp"]},
        "pretrained": {"vae": str(tiny_vae_dir), "text_encoder": str(tiny_t5_dir)},
        "evaluation": {"every": 2, "prompt_file": str(tmp_path / "heldout.txt"), "reference": str(reference),
                       "clip_model": str(clip), "fid_features": "tests.test_evaluate:tiny_features",
                       "fid_size": 64, "steps": 2},
        "run": {"output_dir": str(out), "steps": 4, "checkpoint_every": 4, "progress": False, "cpu_threads": 1},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = train(load_train_config(tmp_path / "c.yaml"))
    assert result.steps == 4 and any("empty caption" in n for n in result.init_report["notes"])
    evaluations = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evaluations] == [2, 4] and all("fid" in e and "clip_score" in e for e in evaluations)
    final = out / "final"
    assert (final / "lora" / "adapter_model.safetensors").is_file() and (final / "lora_ema").is_dir()

    # Export the merged weights and run the README call; load the adapter onto the released transformer too.
    pipe_dir, call = export(final, tmp_path / "pipe", weights="model", log=lambda *_: None)
    assert call == "pipe(prompt, height=64, width=64, use_resolution_binning=False, clean_caption=False)"
    merged = PixArtAlphaPipeline.from_pretrained(pipe_dir)
    with_adapter = PixArtAlphaPipeline.from_pretrained(pipe_dir)
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    base = PixArtTransformer2DModel.from_pretrained(released / "transformer")
    with_adapter.transformer = PeftModel.from_pretrained(base, final / "lora")
    kwargs = dict(height=64, width=64, use_resolution_binning=False, clean_caption=False, num_inference_steps=2,
                  output_type="latent")
    a = merged("pattern 0", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = with_adapter("pattern 0", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())

    record = evaluate_main(["--checkpoint", str(final), "--prompt-file", str(tmp_path / "heldout.txt"),
                            "--reference", str(reference), "--out", str(tmp_path / "eval"), "--clip-model", str(clip),
                            "--fid-features", "tests.test_evaluate:tiny_features", "--fid-size", "64",
                            "--steps", "2"])
    assert record["num_images"] == 2 and "fid" in record and "clip_score" in record
