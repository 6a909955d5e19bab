"""The DeepSpeed ZeRO trainer: one training sub-stage, on any number of processes, GPU or CPU.

    python -m training.trainer --config configs/train/stage2.yaml [--set run.steps=10 ...]   # one process per rank
    training.trainer.train(config)                                                            # one process, in Python

Per rank it builds the PixArt model (initialized from the previous stage through training.stages when the config
says so), wraps it in a DeepSpeed engine (ZeRO-2 by default or ZeRO-3, bf16 on GPU, fp32 on CPU with gloo; torch's
AdamW, so DeepSpeed builds no optimizer kernels), and runs a plain loop:

    batch  -> z = (mean + std * eps) * 0.18215, t ~ U[0, 1000), noise      (the rank's own torch.Generator)
           -> IDDPM loss (MSE + VB) of the model's prediction               (the model drops captions itself)
           -> all ranks agree the loss is finite, else the step is skipped and counted
           -> engine.backward / engine.step (clip 0.01, AdamW, warm-up then constant) -> EMA update

Every `run.checkpoint_every` steps it saves a DeepSpeed checkpoint (model, optimizer, scheduler; plus per rank the
loader position, counters and RNG states, and the EMA) under a temp tag that is renamed when every rank has written,
and a consolidated weights folder (config.json, model.safetensors, ema.safetensors, pipeline.json). A run started
again with the same output_dir continues from the latest checkpoint and, on CPU, reproduces bit for bit the losses
the uninterrupted run would have had. Rank 0 shows a progress bar, writes TensorBoard scalars and sample grids.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.pretrained import MissingModelError
from common.durable import atomic_write_bytes
from curation.shard_format import CARD_FILE
from common.config import ConfigError, dump_config
from training.data import BatchPlan, DataError, draw_latents, make_loader
from training.diffusion import GaussianDiffusion
from training.ema import EMA
from training.evaluate import HeldOutEvaluation
from training.lora import ADAPTER_DIR, EMA_ADAPTER_DIR, add_lora, save_adapter, split_state
from training.model import WEIGHTS_NAME, PixArt
from training.init_sources import init_model
from training.stages import EMA_WEIGHTS_NAME, TransitionError
from training.train_config import TrainConfig, load_train_config

log = logging.getLogger("training.trainer")

CHECKPOINTS = "checkpoints"
WEIGHTS = "weights"
FINAL = "final"
LATEST = "latest"


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint of the last good state was written first."""


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cpu_threads: int | None = None) -> DistInfo:
    """Join the process group the DeepSpeed launcher described in the environment, or make a one-process group
    (gloo on CPU, nccl on GPU: DeepSpeed's accelerator picks)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        elif "OMP_NUM_THREADS" not in os.environ:
            # Processes on one host share its cores; oversubscribing them slows every rank down.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    deepspeed.init_distributed(verbose=False)
    return DistInfo(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                    local_rank=local_rank, local_world_size=local_world, device=device)


def _barrier() -> None:
    torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------------------------
# State that is not DeepSpeed's
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Per-rank progress saved next to each DeepSpeed checkpoint (state_rank<r>.json)."""

    step: int = 0  # optimizer updates done
    position: int = 0  # the next batch of this rank's stream (training.data)
    skipped_steps: int = 0  # non-finite losses, in total
    consecutive_bad: int = 0
    samples_accepted: int = 0
    samples_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    world_size: int = 1
    batch_size: int = 0
    data_seed: int = 0

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode()


@dataclass
class TrainResult:
    """What a finished run did; rank 0's view (the counts are summed over ranks)."""

    output_dir: Path
    weights: Path | None  # the consolidated final weights folder
    steps: int
    losses: list[float]  # mean loss over all ranks of every update this process ran, in order
    skipped_steps: int
    samples_accepted: int
    samples_rejected: int
    rejected_by_reason: dict[str, int]
    resumed_from: str | None
    init_report: dict | None


def deepspeed_config(config: TrainConfig, bf16: bool) -> dict:
    """The DeepSpeed config a TrainConfig implies (deepspeed.extra merged last)."""
    ds = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # torch's AdamW under ZeRO: sound (ZeRO partitions its state like any torch optimizer's) and JIT-free.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }

    def merge(base: dict, extra: dict) -> dict:
        for key, value in extra.items():
            base[key] = merge(dict(base.get(key) or {}), value) if isinstance(value, dict) else value
        return base

    return merge(ds, config.deepspeed.extra)


class WarmupThenConstant:
    """The learning-rate factor of step s: s / warmup during the warm-up, then 1 (diffusers'
    get_constant_schedule_with_warmup, which PixArt-alpha trains with)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0


class Trainer:
    """One sub-stage's training on this rank. `fit()` runs it; `train_step(batch)` is one update (benchmarks)."""

    def __init__(self, config: TrainConfig, with_data: bool = True):
        import deepspeed

        self.config = config
        self.dist = dist = setup_distributed(config.run.cpu_threads)
        self.is_main = dist.rank == 0
        self.out = Path(config.run.output_dir)
        self.model_config = config.pixart_config()
        self.bf16 = config.deepspeed.precision == "bf16" or (
            config.deepspeed.precision == "auto" and dist.device.type == "cuda")
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.diffusion = GaussianDiffusion(prediction_type=config.diffusion.prediction_type)
        self.state = TrainState(world_size=dist.world_size, batch_size=config.data.batch_size,
                                data_seed=config.data.seed)
        self.losses: list[float] = []
        self.plan = self._plan() if with_data else None
        if with_data and self.is_main:
            self._check_dataset_card()
        # Loaded before anything else so that a VAE or T5 that cannot be found stops the run at once.
        self._grids = (SampleGrids(config, self.model_config, dist.device, self.dtype)
                       if self.is_main and config.sampling.every else None)
        self._evaluation = (HeldOutEvaluation(config, self.model_config, dist.device, self.dtype)
                            if self.is_main and config.evaluation.every else None)

        # Identical initial weights on every rank: the same seed, then the same previous-stage weights.
        torch.manual_seed(config.run.seed)
        model = PixArt(self.model_config)
        latest = self._latest_checkpoint()
        if latest is not None and not config.run.resume:
            raise ConfigError(f"run.resume: {self.out} already holds checkpoints (latest {latest}); resume from them "
                              f"(run.resume=true) or choose a new run.output_dir")
        self.init_report = None
        if latest is None and config.init.weights:
            report = init_model(model, config.init, config.pretrained)
            self.init_report = report.to_dict()
            if self.is_main:
                log.info("%s", report.summary())
                atomic_write_bytes(self.out / "init_report.json", json.dumps(self.init_report, indent=1).encode())
        elif latest is not None and (self.out / "init_report.json").is_file():
            self.init_report = json.loads((self.out / "init_report.json").read_text())
        if config.lora.enabled:
            add_lora(model, config.lora)  # adapters only train; the weights folders hold them merged and apart

        global_batch = config.data.batch_size * dist.world_size
        lr = config.optimizer.effective_lr(global_batch)
        opt = config.optimizer
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=opt.betas, eps=opt.eps,
                                      weight_decay=opt.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupThenConstant(opt.warmup_steps))
        self.engine, _, _, _ = deepspeed.initialize(model=model.to(dist.device), optimizer=optimizer,
                                                    lr_scheduler=scheduler, config=deepspeed_config(config, self.bf16))
        self.ema = EMA(self.engine.module, config.ema.decay) if config.ema.enabled else None
        # Each rank draws its own noise; the model's caption dropout uses the global RNG, seeded per rank too.
        self.generator = torch.Generator(dist.device).manual_seed(config.run.seed * 1_000_003 + dist.rank)
        torch.manual_seed(config.run.seed * 1_000_003 + dist.rank + 1)
        self.resumed_from = self._resume(latest) if latest is not None else None
        if self.is_main:
            log.info("stage %s (%s): %d process(es) x batch %d, lr %.3g, %s, ZeRO-%d, %s parameters",
                     config.stage, config.name, dist.world_size, config.data.batch_size, lr,
                     "bf16" if self.bf16 else "fp32", config.deepspeed.zero_stage,
                     f"{model.num_parameters():,}")
            atomic_write_bytes(self.out / "config.json", json.dumps(dump_config(config), indent=1).encode())
        self._writer = None

    # --- data ------------------------------------------------------------------------------------------------------

    def _plan(self) -> BatchPlan:
        data = self.config.data
        return BatchPlan.from_dataset(data.root, data.caption, data.batch_size, self.dist.world_size, data.seed,
                                      num_classes=self.model_config.num_classes)

    def _check_dataset_card(self) -> None:
        """Warn when the models the shards were encoded with are not those the config names for sampling/export
        (a hub id and a local copy of it legitimately differ, so this is a warning)."""
        card_file = Path(self.config.data.root) / CARD_FILE
        if not card_file.is_file():
            return
        card = json.loads(card_file.read_text())
        pre = self.config.pretrained
        vae, t5 = card.get("vae") or {}, card.get("text_encoder") or {}
        for field, ours, theirs in (("pretrained.vae", pre.vae, vae.get("model")),
                                    ("pretrained.vae_class", pre.vae_class, vae.get("model_class")),
                                    ("pretrained.scaling_factor", pre.scaling_factor, vae.get("scaling_factor")),
                                    ("pretrained.text_encoder", pre.text_encoder, t5.get("model"))):
            if theirs is not None and theirs != ours:
                log.warning("%s is %r but %s was encoded with %r", field, ours, card_file.parent, theirs)

    def _loader(self):
        data = self.config.data
        cfg = self.model_config
        return make_loader(self.plan, data.root, self.dist.rank, self.state.position, data.caption,
                           cfg.caption_length, cfg.caption_channels, num_workers=data.num_workers,
                           prefetch_factor=data.prefetch_factor, pin_memory=self.dist.device.type == "cuda")

    def _next_batch(self, batches) -> dict:
        """The next batch with at least one sample; rejected samples are counted and logged on the way."""
        empty = 0
        while True:
            batch = next(batches)
            self.state.position = batch["position"] + 1
            if batch["rejected"]:
                self._record_rejected(batch["rejected"])
            if batch["keys"]:
                self.state.samples_accepted += len(batch["keys"])
                return batch
            empty += 1
            if empty > self.plan.batches_per_rank:
                raise DataError(f"{self.config.data.root}: a whole epoch of batches held no readable sample; "
                                f"see {self.out / 'logs'}")

    def _record_rejected(self, rejected: list[dict]) -> None:
        self.state.samples_rejected += len(rejected)
        reasons = Counter(self.state.rejected_by_reason)
        reasons.update(r["reason"] for r in rejected)
        self.state.rejected_by_reason = dict(reasons)
        path = self.out / "logs" / f"rejected_rank{self.dist.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.writelines(json.dumps({**r, "step": self.state.step}) + "\n" for r in rejected)
        log.warning("rank %d: %d sample(s) skipped (%d in all): %s", self.dist.rank, len(rejected),
                    self.state.samples_rejected, rejected[0]["detail"])

    # --- one step --------------------------------------------------------------------------------------------------

    def model_kwargs(self, batch: dict) -> dict:
        device, cfg = self.dist.device, self.model_config
        if cfg.text_conditioned:
            kwargs = {"caption": batch["caption"].to(device, self.dtype, non_blocking=True),
                      "caption_mask": batch["caption_mask"].to(device, non_blocking=True)}
        else:
            kwargs = {"class_labels": batch["class_labels"].to(device, non_blocking=True)}
        if cfg.micro_conditions:
            kwargs["resolution"] = batch["resolution"].to(device, non_blocking=True)
            key = "aspect_ratio_key" if cfg.aspect_ratio_input == "bucket_key" else "aspect_ratio"
            kwargs["aspect_ratio"] = batch[key].to(device, non_blocking=True)
        return kwargs

    def _forward(self, x_t: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.engine(x_t.to(self.dtype), timestep, **kwargs)

    def train_step(self, batch: dict) -> dict:
        """One update from a loader batch: {"loss": global mean, "skipped": bool, "images": local count}."""
        device = self.dist.device
        x0 = draw_latents(batch, self.generator, self.config.pretrained.scaling_factor, device)
        if x0.shape[1] != self.model_config.in_channels:
            raise ConfigError(f"model.overrides.in_channels: the data's latents have {x0.shape[1]} channels, the "
                              f"model takes {self.model_config.in_channels}")
        n = x0.shape[0]
        t = self.diffusion.sample_timesteps(n, device, generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator, device=device)
        losses = self.diffusion.training_losses(self._forward, x0, t, self.model_kwargs(batch), noise=noise,
                                                **self.config.diffusion.loss_options())
        loss = losses["loss"].mean()
        # Every rank must take the same branch, or the others would wait forever in the gradient all-reduce.
        stats = torch.stack([loss.detach().float() * n, torch.tensor(float(n), device=device),
                             (~torch.isfinite(loss.detach())).float()]).to(device)
        torch.distributed.all_reduce(stats)
        loss_sum, count, bad = stats.tolist()
        if bad:
            self.state.skipped_steps += 1
            self.state.consecutive_bad += 1
            return {"loss": float("nan"), "skipped": True, "images": n}
        self.engine.backward(loss)
        self.engine.step()
        if self.ema is not None:
            self.ema.update(self.engine.module)
        self.state.step += 1
        self.state.consecutive_bad = 0
        mean = loss_sum / count
        self.losses.append(mean)
        return {"loss": mean, "skipped": False, "images": n, "mse": losses["mse"].mean().item(),
                "vb": losses["vb"].mean().item()}

    # --- the loop --------------------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        run = self.config.run
        final = self.out / FINAL
        if self.state.step >= run.steps:
            if not final.is_dir():
                self.save(final_weights=True)
            return self._result(final)
        from tqdm.auto import tqdm

        batches = iter(self._loader())
        bar = tqdm(total=run.steps, initial=self.state.step, desc=f"{self.config.name}", unit="step",
                   disable=not (self.is_main and run.progress), dynamic_ncols=True)
        window = {"loss": 0.0, "n": 0, "images": 0, "start": time.perf_counter()}
        try:
            while self.state.step < run.steps:
                out = self.train_step(self._next_batch(batches))
                window["images"] += out["images"]
                if out["skipped"]:
                    log.warning("rank %d: non-finite loss at step %d, update skipped (%d in a row, %d in all)",
                                self.dist.rank, self.state.step, self.state.consecutive_bad, self.state.skipped_steps)
                    if self.state.consecutive_bad >= run.max_bad_steps:
                        self.save()
                        raise TrainingDiverged(
                            f"{run.max_bad_steps} non-finite losses in a row at step {self.state.step} "
                            f"(run.max_bad_steps); stopped with a checkpoint of the last good state in "
                            f"{self.out / CHECKPOINTS}. Lower optimizer.lr or check the data.")
                    continue
                window["loss"] += out["loss"]
                window["n"] += 1
                elapsed = time.perf_counter() - window["start"]
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}", img_s=f"{window['images'] / max(elapsed, 1e-9):.1f}")
                step = self.state.step
                if step % run.log_every == 0 or step == run.steps:
                    self._log_scalars(window, out)
                    window = {"loss": 0.0, "n": 0, "images": 0, "start": time.perf_counter()}
                last = step == run.steps
                if step % run.checkpoint_every == 0 or last:
                    self.save(final_weights=last)
                if self.config.sampling.every and (step % self.config.sampling.every == 0 or last):
                    with self._rng_untouched():
                        self.sample_grid()
                if self.config.evaluation.every and (step % self.config.evaluation.every == 0 or last):
                    with self._rng_untouched():
                        self.evaluate()
        finally:
            bar.close()
            if self._writer is not None:
                self._writer.close()
        return self._result(final)

    def _log_scalars(self, window: dict, out: dict) -> None:
        if not self.is_main or window["n"] == 0:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"))
        step, elapsed = self.state.step, time.perf_counter() - window["start"]
        grad_norm = self.engine.get_global_grad_norm()
        scalars = {
            "train/loss": window["loss"] / window["n"], "train/mse": out["mse"], "train/vb": out["vb"],
            "train/lr": self.engine.get_lr()[0], "train/images_per_s_per_process": window["images"] / max(elapsed, 1e-9),
            "train/skipped_steps": self.state.skipped_steps, "data/rejected_samples": self.state.samples_rejected,
        }
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def _result(self, final: Path) -> TrainResult:
        totals = torch.tensor([self.state.samples_accepted, self.state.samples_rejected], dtype=torch.float64,
                              device=self.dist.device)
        torch.distributed.all_reduce(totals)
        reasons: list[dict] = [None] * self.dist.world_size  # type: ignore[list-item]
        torch.distributed.all_gather_object(reasons, self.state.rejected_by_reason)
        merged = sum((Counter(r) for r in reasons), Counter())
        result = TrainResult(output_dir=self.out, weights=final if final.is_dir() else None, steps=self.state.step,
                             losses=list(self.losses), skipped_steps=self.state.skipped_steps,
                             samples_accepted=int(totals[0]), samples_rejected=int(totals[1]),
                             rejected_by_reason=dict(merged), resumed_from=self.resumed_from,
                             init_report=self.init_report)
        if self.is_main:
            log.info("%s: %d steps, %d skipped; samples %d accepted + %d rejected%s; weights %s", self.config.name,
                     result.steps, result.skipped_steps, result.samples_accepted, result.samples_rejected,
                     f" {dict(merged)}" if merged else "", result.weights)
        return result

    # --- checkpoints and weights -----------------------------------------------------------------------------------

    def _rng_untouched(self):
        """Side work (building a model to export, sampling) must not move the training RNG: a resumed run, which
        does not repeat it, would otherwise diverge from the uninterrupted one."""
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _latest_checkpoint(self) -> str | None:
        path = self.out / CHECKPOINTS / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        return tag if (self.out / CHECKPOINTS / tag).is_dir() else None

    def save(self, final_weights: bool = False) -> Path:
        """A DeepSpeed checkpoint of the current step and a consolidated weights folder (all ranks must call)."""
        root = self.out / CHECKPOINTS
        tag = f"step_{self.state.step:08d}"
        tmp_tag = f"tmp-{tag}"
        if self.is_main:
            shutil.rmtree(root / tmp_tag, ignore_errors=True)  # a half-written one from a crash
        _barrier()
        self.engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
        rank = self.dist.rank
        atomic_write_bytes(root / tmp_tag / f"state_rank{rank}.json", self.state.to_json())
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.dist.device)
        torch.save(rng, root / tmp_tag / f"rng_rank{rank}.pt")
        if self.is_main and self.ema is not None:
            from safetensors.torch import save_file

            save_file(self.ema.state_dict(), str(root / tmp_tag / EMA_WEIGHTS_NAME))
        _barrier()
        if self.is_main:
            if (root / tag).exists():
                shutil.rmtree(root / tag)
            os.replace(root / tmp_tag, root / tag)
            atomic_write_bytes(root / LATEST, tag.encode())
            _prune(root, "step_", self.config.run.keep_last)
            target = self.out / FINAL if final_weights else self.out / WEIGHTS / tag
            with self._rng_untouched():
                self.export_weights(target, root, tag)
            if not final_weights:
                _prune(self.out / WEIGHTS, "step_", self.config.run.keep_last)
            log.info("checkpoint %s, weights %s", root / tag, target)
        _barrier()
        return root / tag

    def _resume(self, tag: str) -> str:
        from safetensors.torch import load_file

        root = self.out / CHECKPOINTS
        state_file = root / tag / f"state_rank{self.dist.rank}.json"
        if not state_file.is_file():
            raise ConfigError(f"run.output_dir: checkpoint {root / tag} has no state for rank {self.dist.rank}; "
                              f"resume with the number of processes that wrote it")
        state = TrainState(**json.loads(state_file.read_text()))
        for name, now in (("world_size", self.dist.world_size), ("batch_size", self.config.data.batch_size),
                          ("data_seed", self.config.data.seed)):
            if getattr(state, name) != now:
                raise ConfigError(f"run.output_dir: checkpoint {root / tag} was written with {name}="
                                  f"{getattr(state, name)}, this run has {now}; the data position would not "
                                  f"continue the same stream (use a new run.output_dir or run.resume=false)")
        load_path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
        self.state = state
        rng = torch.load(root / tag / f"rng_rank{self.dist.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], self.dist.device)
        if self.ema is not None:
            ema_file = root / tag / EMA_WEIGHTS_NAME
            if ema_file.is_file():
                self.ema.load_state_dict(load_file(str(ema_file)))
            else:
                log.warning("checkpoint %s has no EMA; the average restarts from the current weights", tag)
        if self.is_main:
            log.info("resumed from %s at step %d (data position %d)", root / tag, state.step, state.position)
        return str(root / tag)

    def consolidated_state_dict(self, checkpoint_root: Path, tag: str) -> dict[str, torch.Tensor]:
        """The full fp32 model weights: the module's own under ZeRO-2 in fp32 (they are the master weights), else
        reassembled from the ZeRO checkpoint's fp32 partitions."""
        if self.config.deepspeed.zero_stage == 2 and not self.bf16:
            return {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.engine.module.state_dict().items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root), tag=tag)
        return {k: v.to(torch.float32) for k, v in state.items()}

    def export_weights(self, folder: Path, checkpoint_root: Path, tag: str) -> Path:
        """Rank 0: config.json + model.safetensors (PixArt.save_pretrained), ema.safetensors, pipeline.json and
        trainer.json, written into a temp folder that replaces `folder` when complete. A LoRA run's folder holds
        the merged full weights and the adapters apart (training/lora.py)."""
        from training.sample import PipelineInfo, write_pipeline_info

        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        model = PixArt(self.model_config)
        lora = self.config.lora
        trained = add_lora(PixArt(self.model_config), lora) if lora.enabled else model  # the engine's layout
        trained.load_state_dict(self.consolidated_state_dict(checkpoint_root, tag), strict=True)
        weights = {"model": trained.state_dict()}
        if self.ema is not None:
            weights["ema"] = self.ema.full_state_dict(trained)
        for kind, state in weights.items():
            if lora.enabled:
                state, adapter = split_state(state, lora)
                save_adapter(tmp / (ADAPTER_DIR if kind == "model" else EMA_ADAPTER_DIR), adapter, lora,
                             self.model_config)
            model.load_state_dict(state, strict=True)
            model.save_pretrained(tmp, filename=WEIGHTS_NAME if kind == "model" else EMA_WEIGHTS_NAME)
        pre = self.config.pretrained
        write_pipeline_info(tmp, PipelineInfo(vae=pre.vae, vae_class=pre.vae_class, scaling_factor=pre.scaling_factor,
                                              text_encoder=pre.text_encoder, vae_subfolder=pre.vae_subfolder,
                                              prediction_type=self.config.diffusion.prediction_type))
        trainer_info = {"stage": self.config.stage, "name": self.config.name, "step": self.state.step,
                        "caption": self.config.data.caption, "vae_subfolder": pre.vae_subfolder,
                        "init": self.init_report and {k: self.init_report[k] for k in ("source", "transition")}}
        (tmp / "trainer.json").write_text(json.dumps(trainer_info, indent=1) + "\n")
        _replace_dir(tmp, folder)
        return folder

    # --- sample grids ----------------------------------------------------------------------------------------------

    def _weights_for(self, use_ema: bool) -> dict[str, torch.Tensor]:
        """Rank 0: the current full weights (EMA or model; merged LoRA) in PixArt's own layout."""
        if use_ema and self.ema is not None:
            weights = self.ema.full_state_dict(self.engine.module)
        else:
            weights = {k: v.float() for k, v in self.engine.module.state_dict().items()}
        return split_state(weights, self.config.lora)[0] if self.config.lora.enabled else weights

    def evaluate(self) -> dict | None:
        """Rank 0: FID and CLIP score on the held-out set (config `evaluation`), logged and kept in eval.jsonl."""
        if self._evaluation is None:
            return None
        result = {"step": self.state.step, **self._evaluation(self._weights_for(self.config.evaluation.use_ema))}
        with open(self.out / "eval.jsonl", "a") as fh:
            fh.write(json.dumps(result) + "\n")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"))
        for name in ("fid", "clip_score"):
            if name in result:
                self._writer.add_scalar(f"eval/{name}", result[name], self.state.step)
        self._writer.flush()
        log.info("evaluation at step %d: %s", self.state.step,
                 ", ".join(f"{k} {result[k]:.3f}" for k in ("fid", "clip_score") if k in result))
        return result

    def sample_grid(self) -> Path | None:
        """Rank 0: a PNG grid from the fixed prompts (or class labels) with the current EMA (or model) weights."""
        if self._grids is None:
            return None
        weights = self._weights_for(self.config.sampling.use_ema)
        path = self._grids(weights, self.out / "samples" / f"step_{self.state.step:08d}.png")
        log.info("sample grid %s", path)
        return path


class SampleGrids:
    """What rank 0 needs for sample grids, loaded once at start (so a missing VAE or T5 fails before training):
    the VAE named in the config, the fixed prompts' T5 features (the encoder itself is freed, T5-XXL is large),
    and a PixArt to load the weights into."""

    def __init__(self, config: TrainConfig, model_config, device: torch.device, dtype: torch.dtype):
        from common.pretrained import load_text_encoder, load_vae

        self.config, self.model_config, self.device = config, model_config, device
        pre = config.pretrained
        self.vae = load_vae(pre.vae, setting="pretrained.vae", subfolder=pre.vae_subfolder,
                            model_class=pre.vae_class).to(device)
        self.prompts = None
        if model_config.text_conditioned:
            encoder = load_text_encoder(pre.text_encoder, setting="pretrained.text_encoder",
                                        max_length=model_config.caption_length, dtype=dtype)
            encoder.model.to(device)
            self.prompts = FixedPrompts(config.sampling.prompts, *encoder.encode(config.sampling.prompts),
                                        max_length=model_config.caption_length)
            del encoder
            if device.type == "cuda":
                torch.cuda.empty_cache()
        with torch.random.fork_rng(devices=[]):
            self.model = PixArt(model_config).to(device).eval()

    @torch.no_grad()
    def __call__(self, weights: dict[str, torch.Tensor], path: Path) -> Path:
        from training.grid import image_grid, save_png
        from training.sampling import generate_images

        cfg, text = self.config.sampling, self.model_config.text_conditioned
        self.model.load_state_dict(weights, strict=True)
        height, width = cfg.size or (None, None)  # None: the model's native size, through the VAE's factor
        images = generate_images(self.model, self.vae, self.prompts, cfg.prompts if text else None,
                                 class_labels=None if text else cfg.class_labels, height=height, width=width,
                                 sampler=cfg.sampler, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                                 seed=cfg.seed, scaling_factor=self.config.pretrained.scaling_factor,
                                 prediction_type=self.config.diffusion.prediction_type)
        captions = cfg.prompts if text else [f"class {c}" for c in cfg.class_labels]
        return save_png(image_grid(images, captions=captions), path)


class FixedPrompts:
    """A text encoder stand-in for generate_images that returns precomputed features of a fixed prompt list."""

    def __init__(self, prompts: list[str], features: torch.Tensor, mask: torch.Tensor, max_length: int):
        self.index = {p: i for i, p in enumerate(prompts)}
        self.features, self.mask, self.max_length = features.float().cpu(), mask.cpu(), max_length

    def encode(self, texts: list[str], device: torch.device | str | None = None):
        rows = torch.tensor([self.index[t] for t in texts])
        return self.features[rows].to(device), self.mask[rows].to(device)


def _replace_dir(tmp: Path, folder: Path) -> None:
    """Move a completed temp folder into place; an existing folder is moved aside first, then deleted."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` folders named <prefix>NNNN under root."""
    if not root.is_dir():
        return
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def train(config: TrainConfig) -> TrainResult:
    """Run one training sub-stage in this process (one rank of a launched job, or a whole one-process run)."""
    trainer = Trainer(config)
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a training sub-stage YAML (configs/train/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. run.steps=100 (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        config = load_train_config(args.config, args.set)
        train(config)
    except (ConfigError, DataError, TransitionError, MissingModelError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
