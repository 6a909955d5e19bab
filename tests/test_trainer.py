"""The DeepSpeed ZeRO trainer on CPU (gloo): fitting, outputs, NaN handling, bad data, stages, 1 and 2 processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from curation.shard_format import SHARDS_DIR
from common.config import ConfigError
from tests.shard_fixtures import FixtureSpec, write_dataset
from common.autoencoder import SD_VAE_SPACE
from training.data import BatchPlan, draw_latents
from training.diffusion import GaussianDiffusion
from training.launch import deepspeed_command, launch, plan_substages
from training.model import PixArt
from training.train_config import load_train_config
from training.trainer import Trainer, TrainingDiverged, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKETS = {(64, 64): 16, (64, 96): 8}


def base_config(data_root, out, stage: int = 2, **sections) -> dict:
    """A tiny text-conditioned sub-stage: paper defaults except a larger lr and short warm-up to learn in tens of steps."""
    cfg = {
        "stage": stage, "name": "tiny",
        "model": {"preset": "tiny"},
        "data": {"root": str(data_root), "caption": "llava", "batch_size": 4, "num_workers": 0},
        "optimizer": {"lr": 2e-3, "warmup_steps": 2},
        "run": {"output_dir": str(out), "steps": 8, "checkpoint_every": 4, "keep_last": 2, "log_every": 2,
                "progress": False, "cpu_threads": 1},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def write_yaml(path, cfg: dict):
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, FixtureSpec(BUCKETS, units=2))
    return root


@pytest.mark.slow
def test_tiny_model_fits_and_writes_its_outputs(data_root, tmp_path, tiny_vae_dir, tiny_t5_dir):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "c.yaml", base_config(
        data_root, out, run={"steps": 40, "checkpoint_every": 15},
        pretrained={"vae": str(tiny_vae_dir), "text_encoder": str(tiny_t5_dir)},
        sampling={"every": 40, "prompts": ["pattern 0", "pattern 1"], "steps": 4}))
    result = train(load_train_config(cfg))

    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert len(result.losses) == 40 and last < 0.5 * first, (first, last)
    assert result.samples_accepted == 40 * 4 and result.samples_rejected == 0 and result.skipped_steps == 0

    # Weights folder: loads through the sampler's path; EMA differs from the model (decay 0.9999 barely moved).
    from training.sample import load_weights, read_pipeline_info

    final = out / "final"
    model, used_ema = load_weights(final)
    assert used_ema and model.config.caption_channels == 32
    weights, ema = load_file(str(final / "model.safetensors")), load_file(str(final / "ema.safetensors"))
    assert weights.keys() == ema.keys()
    info = read_pipeline_info(final)
    assert (info.vae, info.text_encoder, info.scaling_factor) == (str(tiny_vae_dir), str(tiny_t5_dir), 0.18215)
    assert info.prediction_type == "epsilon"  # the config's diffusion.prediction_type, PixArt's by default
    # keep_last=2: checkpoints at 15, 30 and 40 -> the last two remain; the periodic weights folders too.
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000030", "step_00000040"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000040"
    assert sorted(p.name for p in (out / "weights").iterdir()) == ["step_00000015", "step_00000030"]
    assert not [p for p in out.rglob(".*") if p.is_dir()]  # no temp folders left behind
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    grid = out / "samples" / "step_00000040.png"
    from PIL import Image

    assert Image.open(grid).size[0] > 2 * 64


@pytest.mark.slow
def test_consolidated_weights_match_the_zero_checkpoint(data_root, tmp_path):
    """The fast export path (module weights under fp32 ZeRO-2) equals DeepSpeed's zero_to_fp32 reassembly."""
    trainer = Trainer(load_train_config(write_yaml(tmp_path / "c.yaml", base_config(data_root, tmp_path / "run",
                                                                                     run={"steps": 2}))))
    trainer.fit()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    reassembled = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "run" / "checkpoints"), "step_00000002")
    exported = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert exported.keys() == reassembled.keys()
    for key, value in exported.items():
        assert torch.equal(value, reassembled[key].float()), key


@pytest.mark.slow
def test_zero3_trains_the_same_model_and_exports_whole_weights(data_root, tmp_path):
    runs = {}
    for stage in (2, 3):
        cfg = base_config(data_root, tmp_path / f"z{stage}", deepspeed={"zero_stage": stage},
                          run={"steps": 3, "checkpoint_every": 100})
        runs[stage] = train(load_train_config(write_yaml(tmp_path / f"z{stage}.yaml", cfg)))
    # Same data, noise and initial weights: ZeRO-3 differs from ZeRO-2 only in reduction order.
    torch.testing.assert_close(runs[3].losses, runs[2].losses, rtol=1e-4, atol=0)
    z2 = load_file(str(tmp_path / "z2" / "final" / "model.safetensors"))
    z3 = load_file(str(tmp_path / "z3" / "final" / "model.safetensors"))  # reassembled from the partitions
    assert z3.keys() == z2.keys()
    for key in z2:
        torch.testing.assert_close(z3[key], z2[key], rtol=1e-3, atol=1e-5, msg=key)


@pytest.mark.slow
def test_nan_losses_are_skipped_then_stop_the_run_with_a_checkpoint(data_root, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = GaussianDiffusion.training_losses

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        losses = real(self, *args, **kwargs)
        if calls["n"] in (3, 4) or calls["n"] >= 8:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    monkeypatch.setattr(GaussianDiffusion, "training_losses", flaky)
    out = tmp_path / "run"
    cfg = load_train_config(write_yaml(tmp_path / "c.yaml", base_config(
        data_root, out, run={"steps": 20, "max_bad_steps": 3, "checkpoint_every": 100})))
    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses in a row at step 5 \(run.max_bad_steps\)"):
        train(cfg)
    # Calls 1, 2, 5, 6, 7 updated; 3, 4 were skipped; 8, 9, 10 were skipped and stopped the run.
    state = json.loads((out / "checkpoints" / "step_00000005" / "state_rank0.json").read_text())
    loader = json.loads((out / "checkpoints" / "step_00000005" / "loader_rank0.json").read_text())
    assert state["step"] == 5 and state["skipped_steps"] == 5 and loader["position"] == 10
    assert (out / "checkpoints" / "latest").read_text() == "step_00000005"


@pytest.mark.slow
def test_corrupt_shard_is_skipped_and_counted(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, FixtureSpec({(64, 64): 12}, units=3))
    tar = root / SHARDS_DIR / "unit-0001.tar"
    tar.write_bytes(tar.read_bytes()[:2000])  # keeps the first sample's header, loses the rest
    plan = BatchPlan.from_dataset(root, "llava", 4, 1, seed=0)
    result = train(load_train_config(write_yaml(tmp_path / "c.yaml", base_config(
        root, tmp_path / "run", data={"batch_size": 4}, run={"steps": 6, "checkpoint_every": 100}))))
    # Hand count: 6 steps need at least 24 good samples of the 8 good per epoch; the 4 of unit-0001 are
    # rejected every time they are drawn. Every drawn sample is accounted for.
    assert result.steps == 6 and result.samples_rejected > 0
    drawn = sum(len(plan.rank_batch(0, k)[1]) for k in range(json.loads(
        (tmp_path / "run" / "checkpoints" / "step_00000006" / "loader_rank0.json").read_text())["position"]))
    assert result.samples_accepted + result.samples_rejected == drawn
    assert set(result.rejected_by_reason) == {"unreadable shard"}
    lines = (tmp_path / "run" / "logs" / "rejected_rank0.jsonl").read_text().splitlines()
    assert len(lines) == result.samples_rejected and all("unit-0001" in json.loads(l)["detail"] for l in lines)


@pytest.mark.slow
def test_stage1_to_stage2_through_the_trainer(tmp_path):
    class_root, text_root = tmp_path / "imagenet", tmp_path / "sa1b"
    write_dataset(class_root, FixtureSpec({(64, 64): 8}, units=1, num_classes=10, caption_names=()))
    write_dataset(text_root, FixtureSpec({(64, 64): 8}, units=1))
    stage1 = base_config(class_root, tmp_path / "s1", stage=1, model={"preset": "tiny-class"},
                         data={"caption": None}, run={"steps": 2})
    train(load_train_config(write_yaml(tmp_path / "s1.yaml", stage1)))
    stage2 = base_config(text_root, tmp_path / "s2", init={"weights": str(tmp_path / "s1" / "final")},
                         run={"steps": 2})
    result = train(load_train_config(write_yaml(tmp_path / "s2.yaml", stage2)))
    report = result.init_report
    assert report["transition"] == "class_to_text" and report["dropped"] == ["y_embedder.embedding_table.weight"]
    assert json.loads((tmp_path / "s2" / "init_report.json").read_text()) == report
    assert json.loads((tmp_path / "s2" / "final" / "trainer.json").read_text())["init"]["transition"] == "class_to_text"


@pytest.mark.slow
def test_stage3_plan_runs_its_substages_in_order(data_root, tmp_path):
    multi = {(64, 64): 8, (64, 96): 8, (96, 64): 8}
    write_dataset(tmp_path / "hq", FixtureSpec(multi, units=1))
    write_dataset(tmp_path / "hq2x", FixtureSpec({(128, 128): 8, (128, 192): 8}, units=1))
    sub_a = base_config(tmp_path / "hq", tmp_path / "3a", stage=3, run={"steps": 2})
    sub_b = base_config(tmp_path / "hq2x", tmp_path / "3b", stage=3, run={"steps": 2},
                        model={"preset": "tiny-MS", "overrides": {"input_size": 16}},  # "2x the resolution"
                        init={"weights": "ignored/when/run/from/the/plan"})
    write_yaml(tmp_path / "3a.yaml", sub_a)
    write_yaml(tmp_path / "3b.yaml", sub_b)
    write_yaml(tmp_path / "plan.yaml", {"stage": 3, "substages": ["3a.yaml", "3b.yaml"]})

    subs = plan_substages(3, tmp_path / "plan.yaml", ["run.log_every=1"])
    assert [s.config.name for s in subs] == ["tiny", "tiny"]
    assert subs[1].config.init.weights == str(tmp_path / "3a" / "final")
    assert launch(3, tmp_path / "plan.yaml", num_gpus=1) == 0
    report = json.loads((tmp_path / "3b" / "init_report.json").read_text())
    assert report["transition"] == "continue" and report["source"] == str(tmp_path / "3a" / "final")
    assert sorted({k.split(".")[0] for k in report["new"]}) == ["ar_embedder", "csize_embedder"]
    assert PixArt.from_pretrained(tmp_path / "3b" / "final").config.micro_conditions

    with pytest.raises(ConfigError, match="the plan is for stage 3, launched as stage 2"):
        plan_substages(2, tmp_path / "plan.yaml")
    with pytest.raises(ConfigError, match="the config is for stage 3, launched as stage 1"):
        plan_substages(1, tmp_path / "3a.yaml")


def test_config_errors_name_the_field(data_root, tmp_path):
    good = base_config(data_root, tmp_path / "x")
    for change, needle in [
        ({"model": {"preset": "PixArt-XXL"}}, "model.preset"),
        ({"model": {"preset": "tiny", "overrides": {"depht": 3}}}, "model.overrides"),
        ({"data": {**good["data"], "caption": None}}, "data.caption"),
        ({"optimizer": {"lr": -1}}, "optimizer.lr"),
        ({"deepspeed": {"zero_stage": 1}}, "deepspeed.zero_stage"),
        ({"run": {**good["run"], "stepz": 3}}, "run.stepz"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            load_train_config(write_yaml(tmp_path / "bad.yaml", {**good, **change}))


def test_shipped_stage_configs(tmp_path):
    """configs/train: stage 1 class-conditional, stage 2 from it by class_to_text, stage 3 as 256 -> 512 -> 1024
    with pos-embed interpolation 1, 1, 2 and micro-conditions on the multi-aspect sub-stages."""
    from pathlib import Path

    configs = Path(ROOT) / "configs" / "train"
    (s1,) = plan_substages(1, configs / "stage1.yaml")
    (s2,) = plan_substages(2, configs / "stage2.yaml")
    s3 = plan_substages(3, configs / "stage3.yaml")
    assert s1.config.pixart_config().num_classes == 1000 and s1.config.data.caption is None
    assert s2.config.init.transition == "class_to_text" and s2.config.init.weights == s1.config.run.output_dir + "/final"
    models = [s.config.pixart_config() for s in s3]
    assert [m.input_size * 8 for m in models] == [256, 512, 1024]
    assert [m.pe_interpolation for m in models] == [1.0, 1.0, 2.0]
    assert [m.micro_conditions for m in models] == [False, True, True]
    assert s3[0].config.init.weights == s2.config.run.output_dir + "/final"
    assert [s.config.init.weights for s in s3[1:]] == [str(Path(s.config.run.output_dir) / "final") for s in s3[:2]]
    for s in (s1, s2, *s3):  # the paper's hyper-parameters
        o = s.config.optimizer
        assert (o.lr, o.weight_decay, o.grad_clip, o.warmup_steps, s.config.ema.decay) == (2e-5, 0.03, 0.01, 1000, 0.9999)
        assert s.config.deepspeed.zero_stage == 2


def test_launcher_builds_the_deepspeed_command(data_root, tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", base_config(data_root, tmp_path / "x"))
    (sub,) = plan_substages(2, cfg, ["run.steps=3"])
    cmd = deepspeed_command(sub, num_gpus=8, hostfile="hosts", master_port=29600)
    assert cmd[1:] == ["-u", "-m", "deepspeed.launcher.runner", "--hostfile", "hosts", "--num_gpus", "8",
                       "--master_port", "29600", "--module", "training.trainer", "--config", str(cfg),
                       "--set", "run.steps=3"]
    assert sub.config.run.steps == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_zero2_match_a_hand_computed_update(data_root, tmp_path):
    """Two gloo ranks under ZeRO-2: after one step the weights equal plain PyTorch's update from the average of the
    two ranks' gradients (clipped to 0.01 in global norm, AdamW), each rank's batch, noise and dropout
    reproduced from its seeds."""
    out = tmp_path / "run"
    cfg_dict = base_config(data_root, out, optimizer={"lr": 1e-3, "warmup_steps": 0},
                           run={"steps": 2, "checkpoint_every": 1, "keep_last": 5})
    cfg_file = write_yaml(tmp_path / "c.yaml", cfg_dict)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "training.launch", "--stage", "2", "--config", str(cfg_file),
                           "--num-gpus", "2", "--master-port", str(_free_port())],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    states = [json.loads((ckpt / f"loader_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["position"] for s in states] == [2, 2] and all(s["world_size"] == 2 for s in states)

    # The reference: the same initial weights and per-rank randomness, in plain PyTorch.
    config = load_train_config(cfg_file)
    torch.manual_seed(0)
    model = PixArt(config.pixart_config()).train()
    plan = BatchPlan.from_dataset(data_root, "llava", 4, 2, seed=0)
    diffusion = GaussianDiffusion()
    grads = []
    for rank in (0, 1):
        _, rows = plan.rank_batch(rank, 0)
        from training.data import ShardBatches

        batch = ShardBatches(plan, data_root, rank, 0, "llava", 16, 32).load(0)
        generator = torch.Generator().manual_seed(rank)
        torch.manual_seed(rank + 1)
        x0 = draw_latents(batch, generator, SD_VAE_SPACE)
        t = diffusion.sample_timesteps(len(rows), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        model.zero_grad()
        loss = diffusion.training_losses(model, x0, t, {"caption": batch["caption"], "caption_mask": batch["caption_mask"]},
                                         noise=noise)["loss"].mean()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for p, g0, g1 in zip(model.parameters(), *grads):
        p.grad = (g0 + g1) / 2
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-10, weight_decay=0.03).step()

    step2_before = load_file(str(out / "final" / "model.safetensors"))  # the first launch ended at step 2
    after_one = load_file(str(out / "weights" / "step_00000001" / "model.safetensors"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(after_one[name], value, rtol=1e-5, atol=1e-6, msg=name)

    # Rank 1's RNG state of the newest checkpoint is damaged: both ranks fall back to step 1 together and
    # step 2 comes out as before, bit for bit.
    (ckpt / "rng_rank1.pt").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "training.launch", "--stage", "2", "--config", str(cfg_file),
                           "--num-gpus", "2", "--master-port", str(_free_port()), "--set", "run.steps=3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log_text = (out / "logs" / "train.log").read_text()
    assert f"resumed from {out / 'checkpoints' / 'step_00000001'}" in log_text and "rng_rank1.pt" in log_text
    redone = load_file(str(out / "weights" / "step_00000002" / "model.safetensors"))
    assert list((out / "checkpoints").glob("step_00000002.damaged-*"))
    assert all(torch.equal(redone[k], step2_before[k]) for k in step2_before)
