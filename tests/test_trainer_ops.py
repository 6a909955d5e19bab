"""What an operator relies on: gradient accumulation equals the large batch it stands for, finished runs exit 0
every time, and a run reports to its log file, TensorBoard and wandb (offline) with throughput and MFU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from common.autoencoder import SD_VAE_SPACE
from tests.shard_fixtures import FixtureSpec, write_dataset
from tests.test_trainer import ROOT, base_config, write_yaml
from training.data import BatchPlan, ShardBatches, draw_latents
from training.diffusion import GaussianDiffusion
from training.model import PixArt, forward_flops
from training.train_config import load_train_config
from training.trainer import train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    write_dataset(root, FixtureSpec({(64, 64): 16}, units=2, tokens=(5, 5)))  # one bucket, 5-token captions
    return root


@pytest.mark.slow
def test_gradient_accumulation_equals_the_update_of_the_large_batch(data_root, tmp_path):
    """2 micro-batches of 2 through DeepSpeed's gradient_accumulation_steps give the weights of one AdamW update
    on the 4 samples together (same latents, timesteps and noise), computed in plain PyTorch."""
    cfg_dict = base_config(data_root, tmp_path / "run", model={"preset": "tiny", "overrides": {"caption_dropout": 0.0}},
                           data={"batch_size": 2}, optimizer={"lr": 1e-3, "warmup_steps": 0,
                                                              "gradient_accumulation_steps": 2},
                           run={"steps": 1, "checkpoint_every": 1})
    config = load_train_config(write_yaml(tmp_path / "c.yaml", cfg_dict))
    result = train(config)
    assert result.steps == 1 and result.samples_accepted == 4 and len(result.losses) == 1
    ds = json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 4
    loader = json.loads((tmp_path / "run" / "checkpoints" / "step_00000001" / "loader_rank0.json").read_text())
    assert loader["position"] == 2  # two micro-batches consumed by one update

    torch.manual_seed(0)
    model = PixArt(config.pixart_config()).train()
    plan = BatchPlan.from_dataset(data_root, "llava", 2, 1, seed=0)
    diffusion, generator = GaussianDiffusion(), torch.Generator().manual_seed(0)
    parts = []
    for position in (0, 1):  # what the trainer draws, micro-batch by micro-batch
        batch = ShardBatches(plan, data_root, 0, 0, "llava", 16, 32).load(position)
        x0 = draw_latents(batch, generator, SD_VAE_SPACE)
        t = diffusion.sample_timesteps(len(x0), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        parts.append((x0, t, noise, batch["caption"], batch["caption_mask"]))
    x0, t, noise, caption, mask = (torch.cat(column) for column in zip(*parts))
    loss = diffusion.training_losses(model, x0, t, {"caption": caption, "caption_mask": mask}, noise=noise)["loss"]
    loss.mean().backward()
    assert result.losses[0] == pytest.approx(loss.mean().item(), rel=1e-5)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-10, weight_decay=0.03).step()
    after = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_finished_runs_exit_0_every_time(data_root, tmp_path):
    """Short trainings back to back, each its own process as `make train-stage2` runs it: every exit status is 0
    and no C++ thread aborts the interpreter at exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT
    for i in range(3):
        cfg = write_yaml(tmp_path / f"c{i}.yaml", base_config(data_root, tmp_path / f"run{i}",
                                                              data={"num_workers": 1}, run={"steps": 2}))
        proc = subprocess.run([sys.executable, "-m", "training.launch", "--stage", "2", "--config", str(cfg),
                               "--set", "run.checkpoint_every=1"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "terminate called" not in proc.stderr
        assert sorted(p.name for p in (tmp_path / f"run{i}" / "checkpoints").glob("step_*")) == [
            "step_00000001", "step_00000002"]  # the --set override reached the trainer


def test_make_passes_overrides_through(tmp_path):
    out = subprocess.run(["make", "-n", "train-stage2", "CONFIG=c.yaml", "SET=run.steps=3 data.batch_size=2",
                          "STAMP=", "PY=python"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--set run.steps=3 --set data.batch_size=2" in out and "--config c.yaml" in out


@pytest.mark.slow
def test_a_run_reports_to_its_log_file_tensorboard_and_wandb(data_root, tmp_path, tiny_vae_dir, tiny_t5_dir,
                                                             monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    config = load_train_config(write_yaml(tmp_path / "c.yaml", base_config(
        data_root, out, run={"steps": 2, "log_every": 2, "report_to": ["tensorboard", "wandb"], "peak_tflops": 0.5},
        pretrained={"vae": str(tiny_vae_dir), "text_encoder": str(tiny_t5_dir)},
        sampling={"every": 2, "prompts": ["pattern 0"], "steps": 2})))
    train(config)

    log_text = (out / "logs" / "train.log").read_text()
    assert "step 2: train/loss" in log_text and "checkpoint" in log_text
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "perf/images_per_s_per_device", "perf/tflops_per_device",
            "perf/mfu"} <= set(tags["scalars"])
    assert "samples" in tags["images"] and "config/text_summary" in tags["tensors"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    value = {tag: events.Scalars(tag)[-1].value for tag in tags["scalars"]}
    # MFU from the analytic FLOPs: every image costs 3x forward_flops at its bucket (8x8 latents, 5 tokens).
    per_image = 3 * forward_flops(config.pixart_config(), (8, 8), 5)
    images_per_s = value["perf/images_per_s_per_device"]
    assert value["perf/tflops_per_device"] == pytest.approx(images_per_s * per_image / 1e12, rel=1e-3)
    assert value["perf/mfu"] == pytest.approx(value["perf/tflops_per_device"] / 0.5, rel=1e-3)
    assert "hparam/final_loss" in tags["scalars"]
    assert any(b"_hparams_/experiment" in f.read_bytes() for f in (out / "tensorboard").glob("events.out.*"))
    offline = list((out / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))
    assert (out / "wandb_id").read_text().strip() in offline[0].name
