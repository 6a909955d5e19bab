"""The DeepSpeed ZeRO trainer: one training sub-stage, on any number of processes, GPU or CPU.

    python -m training.trainer --config configs/train/stage2.yaml [--set run.steps=10 ...]   # one process per rank
    training.trainer.train(config)                                                            # one process, in Python

Per rank: preflight (training.preflight) before anything is written; the PixArt model, initialized from the
previous stage (training.stages) unless the run resumes; a DeepSpeed engine (training.engine: ZeRO-2 or 3, bf16 on
GPU, fp32 on CPU with gloo, torch's AdamW); then the loop, one optimizer update per iteration:

    micro-batch -> z = (mean + std * eps) * scale              (the rank's own generator; training.data)
                -> the objective's loss (training.objectives)   (the model drops captions itself)
                -> all ranks agree the loss is finite, else the micro-batch is skipped and counted
                -> engine.backward / engine.step; at the accumulation boundary AdamW steps, then the EMA

Every `run.checkpoint_every` updates, training.checkpointing saves the engine, EMA, loader, counters and RNG
states, and training.weights exports a weights folder (weights/step_N; final/ at the end). A run started again
with the same output_dir resumes from its newest intact checkpoint and, on CPU, reproduces bit for bit the losses
the uninterrupted run would have had. Rank 0 reports to the log file, TensorBoard / wandb (training.metrics) and
writes sample grids (training.sample_grids). See README "The run folder" for what lands where.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from common.config import ConfigError, dump_config
from common.durable import atomic_write_bytes, sweep_temp
from common.pretrained import MissingModelError
from training.checkpointing import CheckpointError, CheckpointManager, RNGState
from training.data import DataError, ShardLoader, draw_latents
from training.distributed import barrier, setup_distributed, teardown_distributed
from training.ema import EMA
from training.engine import build_engine, deepspeed_config
from training.flow import FLOW_PIPELINE_FIELDS
from training.metrics import Reporter, Throughput, attach_log_file, device_peak_tflops
from training.model import PixArt
from training.objectives import build_objective
from training.preflight import preflight
from training.evaluate import HeldOutEvaluation
from training.init_sources import init_model
from training.lora import ADAPTER_DIR, EMA_ADAPTER_DIR, add_lora, save_adapter, split_state
from training.stages import TransitionError
from training.train_config import TrainConfig, load_train_config
from training.weights import (CHECKPOINTS_DIR, CONFIG_NAME, FINAL, PIPELINE_NAME, WEIGHTS_DIR, PipelineInfo,
                              encode_config, encode_pipeline_info, step_folders, weights_problem,
                              write_weights_folder)

log = logging.getLogger("training.trainer")

CHECKPOINTS, WEIGHTS = CHECKPOINTS_DIR, WEIGHTS_DIR


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint of the last good state was written first."""


@dataclass
class TrainState:
    """Per-rank step counters, saved in each checkpoint (state_rank<r>.json)."""

    step: int = 0  # optimizer updates done
    skipped_steps: int = 0  # micro-batches skipped for a non-finite loss, in total
    consecutive_bad: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        self.consecutive_bad = int(state["consecutive_bad"])


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


def run_history(out: Path) -> list[str]:
    """What in a run folder says the run has trained before (checkpoints, exported weights)."""
    found = [f"{CHECKPOINTS}/{name}" for name in CheckpointManager(out / CHECKPOINTS, {}).found()]
    found += [f"{WEIGHTS}/{p.name}" for p in step_folders(out / WEIGHTS)]
    return found + ([FINAL] if (out / FINAL).is_dir() else [])


class Trainer:
    """One sub-stage's training on this rank. `fit()` runs it, `close()` releases it; `train_step(batch)` is one
    micro-batch (benchmarks)."""

    def __init__(self, config: TrainConfig, with_data: bool = True):
        self.config, self.out = config, Path(config.run.output_dir)
        self.model_config = config.pixart_config()
        self.reporter = self.loader = self.engine = self._log_file = None
        self.dist = setup_distributed(config.run.cpu_threads)
        try:
            self._build(with_data)
        except BaseException:
            self.close()
            raise

    def _build(self, with_data: bool) -> None:
        config, dist = self.config, self.dist
        self.is_main = dist.rank == 0
        history = run_history(self.out)
        if history and not config.run.resume:
            raise ConfigError(f"run.resume: {self.out} already holds {', '.join(history[:4])}; resume from them "
                              f"(run.resume=true) or choose a new run.output_dir")
        checked = preflight(config, dist.world_size, resuming=bool(history)) if with_data else None
        self.latent_space = config.latent_space()  # what the data's latents are normalized with (dataset card)
        self._root_level = logging.getLogger().level  # attach_log_file may lower it to INFO; restored by close()
        self._log_file = attach_log_file(self.out / "logs" / ("train.log" if self.is_main else
                                                              f"train_rank{dist.rank}.log"), dist.rank)
        self.bf16 = config.deepspeed.precision == "bf16" or (config.deepspeed.precision == "auto"
                                                             and dist.device.type == "cuda")
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.objective = build_objective(config)
        self.counters, self.losses, self._micro, self._window = TrainState(), [], [], []
        cfg = self.model_config
        if with_data:
            self.loader = ShardLoader(checked.plan, config.data.root, dist.rank, config.data.caption,
                                      cfg.caption_length, cfg.caption_channels, config.data.num_workers,
                                      config.data.prefetch_factor, dist.device.type == "cuda", self._record_rejected,
                                      config.data.multiprocessing_context)
        # Loaded before anything else so that a VAE or T5 that cannot be found stops the run at once.
        self._grids = None
        if self.is_main and config.sampling.every:
            from training.sample_grids import SampleGrids

            self._grids = SampleGrids(config, cfg, self.latent_space, dist.device, self.dtype)
        self._evaluation = (HeldOutEvaluation(config, cfg, self.latent_space, dist.device, self.dtype)
                            if self.is_main and config.evaluation.every else None)

        # Identical initial weights on every rank: the same seed, then the same previous-stage weights.
        torch.manual_seed(config.run.seed)
        model = PixArt(cfg)
        model.routing = config.routing.build()  # TREAD token routing in training (None when off)
        self.init_report = self._init_weights(model, resuming=bool(history))
        if config.lora.enabled:
            add_lora(model, config.lora)  # adapters only train; weights folders hold them merged and apart
        ds_config = deepspeed_config(config, self.bf16)
        global_batch = config.data.batch_size * dist.world_size * config.optimizer.gradient_accumulation_steps
        self.engine, lr = build_engine(model.to(dist.device), config, ds_config, global_batch)
        self.ema = EMA(self.engine.module, config.ema.decay) if config.ema.enabled else None
        # Each rank draws its own noise; the model's caption dropout uses the global RNG, seeded per rank too.
        self.generator = torch.Generator(dist.device).manual_seed(config.run.seed * 1_000_003 + dist.rank)
        torch.manual_seed(config.run.seed * 1_000_003 + dist.rank + 1)

        states = {"engine": self.engine, "counters": self.counters, "rng": RNGState(self.generator, dist.device)}
        states.update({k: v for k, v in (("ema", self.ema), ("loader", self.loader)) if v is not None})
        self.checkpoints = CheckpointManager(self.out / CHECKPOINTS, states, dist.rank, dist.world_size,
                                             config.run.keep_last, extra_files=self._checkpoint_extras,
                                             check_compatible=self._same_model)
        resumed = self.checkpoints.resume()
        if resumed is None and history:
            raise CheckpointError(f"{self.out} holds {', '.join(history[:4])} but no checkpoints to resume from; "
                                  f"refusing to train again from step 0 over them: choose a new run.output_dir")
        self.resumed_from = str(resumed[1]) if resumed else None
        if self.is_main:
            for stale in sweep_temp(self.out) + sweep_temp(self.out / WEIGHTS):
                log.warning("removed %s, left half-written by an interrupted run", stale)
            if resumed:
                log.info("resumed from %s at step %d", resumed[1], self.counters.step)
                self._ensure_exported()
            log.info("stage %s (%s): %d process(es) x batch %d x %d accumulation, lr %.3g, %s, ZeRO-%d, %s "
                     "parameters", config.stage, config.name, dist.world_size, config.data.batch_size,
                     config.optimizer.gradient_accumulation_steps, lr, "bf16" if self.bf16 else "fp32",
                     config.deepspeed.zero_stage, f"{model.num_parameters():,}")
            atomic_write_bytes(self.out / "config.json", json.dumps(dump_config(config), indent=1).encode())
            effective = {**ds_config, "train_batch_size": self.engine.train_batch_size()}
            atomic_write_bytes(self.out / "deepspeed_config.json", json.dumps(effective, indent=1).encode())
        barrier()
        self.reporter = Reporter(self.out, config, enabled=self.is_main)
        self.throughput = Throughput(cfg, device_peak_tflops(dist.device, config.run.peak_tflops))
        # (every N updates, action), run in this order after an update and after the last one; an extension (an
        # evaluation, say) appends its own.
        self.periodic: list[tuple[int, Callable[[], object]]] = [
            (config.run.log_every, self._log_scalars), (config.run.checkpoint_every, self.save),
            (config.sampling.every, self.sample_grid), (config.evaluation.every, self.evaluate)]

    def _init_weights(self, model: PixArt, resuming: bool) -> dict | None:
        init, report_file = self.config.init, self.out / "init_report.json"
        if resuming:  # the checkpoint's weights replace these; keep the original report
            try:
                return json.loads(report_file.read_text()) if report_file.is_file() else None
            except (OSError, ValueError) as err:
                log.warning("%s is unreadable (%s); the run continues without it", report_file, err)
                return None
        if not init.weights:
            return None
        report = init_model(model, init, self.config.pretrained)  # a weights folder, official .pth or diffusers
        if self.is_main:
            log.info("%s", report.summary())
            atomic_write_bytes(report_file, json.dumps(report.to_dict(), indent=1).encode())
        return report.to_dict()

    def _record_rejected(self, rejected: list[dict]) -> None:
        path = self.out / "logs" / f"rejected_rank{self.dist.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.writelines(json.dumps({**r, "step": self.counters.step}) + "\n" for r in rejected)
        log.warning("rank %d: %d sample(s) skipped (%d in all): %s", self.dist.rank, len(rejected),
                    self.loader.samples_rejected, rejected[0]["detail"])

    # --- one micro-batch -------------------------------------------------------------------------------------------

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
        """One micro-batch: {"loss": global mean, "skipped", "updated" (the optimizer stepped), "images"}."""
        device = self.dist.device
        x0 = draw_latents(batch, self.generator, self.latent_space, device)
        n = x0.shape[0]
        losses = self.objective(self._forward, x0, self.model_kwargs(batch), self.generator)
        loss = losses["loss"].mean()
        # Every rank must take the same branch, or the others would wait forever in the gradient all-reduce.
        stats = torch.stack([loss.detach().float() * n, torch.tensor(float(n), device=device),
                             (~torch.isfinite(loss.detach())).float()]).to(device)
        torch.distributed.all_reduce(stats)
        loss_sum, count, bad = stats.tolist()
        if bad:
            self.counters.skipped_steps += 1
            self.counters.consecutive_bad += 1
            return {"loss": float("nan"), "skipped": True, "updated": False, "images": n}
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
        self.engine.step()  # steps the optimizer only at the boundary
        self.counters.consecutive_bad = 0
        self._micro.append(loss_sum / count)
        out = {"skipped": False, "updated": boundary, "images": n,
               **{k: v.mean().item() for k, v in losses.items() if k != "loss"}}
        if boundary:
            if self.ema is not None:
                self.ema.update(self.engine.module)
            self.counters.step += 1
            self.losses.append(sum(self._micro) / len(self._micro))
            self._micro = []
        out["loss"] = self.losses[-1] if boundary else loss_sum / count
        return out

    # --- the loop --------------------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        run = self.config.run
        bar = tqdm(total=run.steps, initial=min(self.counters.step, run.steps), desc=self.config.name, unit="step",
                   disable=not (self.is_main and run.progress), dynamic_ncols=True)
        try:
            while self.counters.step < run.steps:
                batch = self.loader.next_batch()
                out = self.train_step(batch)
                if out["skipped"]:
                    self._on_bad_loss()
                    continue
                self.throughput.add(batch)
                if not out["updated"]:
                    continue
                self._window.append(out)
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}")
                for every, action in self.periodic:
                    if every and (self.counters.step % every == 0 or self.counters.step == run.steps):
                        action()
        finally:
            bar.close()
        return self._result()

    def _on_bad_loss(self) -> None:
        c, run = self.counters, self.config.run
        log.warning("rank %d: non-finite loss at step %d, micro-batch skipped (%d in a row, %d in all)",
                    self.dist.rank, c.step, c.consecutive_bad, c.skipped_steps)
        if c.consecutive_bad >= run.max_bad_steps:
            self.save()
            raise TrainingDiverged(f"{run.max_bad_steps} non-finite losses in a row at step {c.step} "
                                   f"(run.max_bad_steps); stopped with a checkpoint of the last good state in "
                                   f"{self.out / CHECKPOINTS}. Lower optimizer.lr or check the data.")

    def _log_scalars(self) -> None:
        window, self._window = self._window, []
        if not self.is_main or not window:
            return
        last = window[-1]
        scalars = {"train/loss": sum(o["loss"] for o in window) / len(window), "train/lr": self.engine.get_lr()[0],
                   **{f"train/{k}": v for k, v in last.items() if k not in ("loss", "skipped", "updated", "images")},
                   "train/skipped_steps": self.counters.skipped_steps,
                   "data/rejected_samples": self.loader.samples_rejected,
                   "data/worker_restarts": self.loader.worker_restarts, **self.throughput.report()}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        self.reporter.scalars(self.counters.step, scalars)
        log.info("step %d: %s", self.counters.step, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        self.throughput.reset()

    def _result(self) -> TrainResult:
        loader = self.loader
        totals = torch.tensor([loader.samples_accepted, loader.samples_rejected], dtype=torch.float64,
                              device=self.dist.device)
        torch.distributed.all_reduce(totals)
        reasons: list[dict] = [None] * self.dist.world_size  # type: ignore[list-item]
        torch.distributed.all_gather_object(reasons, dict(loader.rejected_by_reason))
        merged = sum((Counter(r) for r in reasons), Counter())
        final = self.out / FINAL
        result = TrainResult(output_dir=self.out, weights=final if final.is_dir() else None,
                             steps=self.counters.step, losses=list(self.losses),
                             skipped_steps=self.counters.skipped_steps, samples_accepted=int(totals[0]),
                             samples_rejected=int(totals[1]), rejected_by_reason=dict(merged),
                             resumed_from=self.resumed_from, init_report=self.init_report)
        if self.is_main:
            log.info("%s: %d steps, %d skipped; samples %d accepted + %d rejected%s; weights %s", self.config.name,
                     result.steps, result.skipped_steps, result.samples_accepted, result.samples_rejected,
                     f" {dict(merged)}" if merged else "", result.weights)
            if self.losses:
                self.reporter.hparams({"final_loss": self.losses[-1], "steps": float(result.steps)})
        return result

    def close(self) -> None:
        """Release everything in order, on every rank: metric writers (their threads), loader workers, the engine,
        then the process group; a finished run then exits 0 without a C++ thread left to abort it."""
        if self.reporter is not None:
            self.reporter.close()
        if self.loader is not None:
            self.loader.close()
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None
        teardown_distributed()
        if self._log_file is not None:
            logging.getLogger().removeHandler(self._log_file)
            logging.getLogger().setLevel(self._root_level)
            self._log_file.close()
            self._log_file = None

    # --- checkpoints and weights -----------------------------------------------------------------------------------

    def _rng_untouched(self):
        """Side work (building a model to export, sampling) must not move the training RNG: a resumed run, which
        does not repeat it, would otherwise diverge from the uninterrupted one."""
        return torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else [])

    def pipeline_info(self) -> PipelineInfo:
        pre, space = self.config.pretrained, self.latent_space
        return PipelineInfo(vae=pre.vae, vae_class=pre.vae_class, vae_subfolder=pre.vae_subfolder,
                            scaling_factor=space.scaling_factor, vae_shift_factor=space.shift_factor,
                            latent_channels=space.channels,
                            text_encoder=pre.text_encoder if self.model_config.text_conditioned else None,
                            prediction_type=self.config.diffusion.prediction_type,
                            **self.config.diffusion.model_dump(include=FLOW_PIPELINE_FIELDS))

    def _checkpoint_extras(self) -> dict[str, bytes]:
        return {CONFIG_NAME: encode_config(self.model_config),
                PIPELINE_NAME: encode_pipeline_info(self.pipeline_info())}

    def _same_model(self, checkpoint: Path) -> None:
        """A checkpoint of another model (model.preset / model.overrides changed since) is a ConfigError."""
        try:
            theirs = json.loads((checkpoint / CONFIG_NAME).read_text())
        except (OSError, ValueError):
            return  # absent in the manifest or damaged: validation and loading judge it
        ours = json.loads(json.dumps(self.model_config.to_dict()))  # as JSON reads it back (tuples -> lists)
        differ = [f"{k}: {theirs.get(k)} -> {v}" for k, v in ours.items()
                  if k != "gradient_checkpointing" and theirs.get(k) != v]
        if differ:
            raise ConfigError(f"model.overrides: checkpoint {checkpoint} was written for another model "
                              f"({'; '.join(differ)}); restore those settings or choose a new run.output_dir")

    def _weights_target(self) -> Path:
        step = self.counters.step
        return self.out / FINAL if step >= self.config.run.steps else self.out / WEIGHTS / f"step_{step:08d}"

    def save(self) -> Path:
        """A checkpoint of the current step, then its weights folder (all ranks must call)."""
        folder = self.checkpoints.save(self.counters.step)
        if self.is_main:
            self.export_weights(self._weights_target(), folder)
            for old in step_folders(self.out / WEIGHTS)[:-self.config.run.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return folder

    def _ensure_exported(self) -> None:
        """Rank 0 after a resume: redo the weights export that a kill may have interrupted."""
        target, step = self._weights_target(), self.counters.step
        problem = weights_problem(target)
        if problem is None:
            try:
                exported = json.loads((target / "trainer.json").read_text())["step"]
            except (OSError, ValueError, KeyError):
                exported = None
            problem = None if exported == step else f"{target} holds step {exported}, not {step}"
        if problem is not None:
            log.warning("weights of step %d were not completely exported (%s); exporting them again", step, problem)
            self.export_weights(target, self.checkpoints.root / f"step_{step:08d}")

    def consolidated_state_dict(self, checkpoint: Path) -> dict[str, torch.Tensor]:
        """The full fp32 model weights: the module's own under ZeRO-2 in fp32 (they are the master weights), else
        reassembled from the ZeRO checkpoint's fp32 partitions."""
        if self.config.deepspeed.zero_stage == 2 and not self.bf16:
            return {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.engine.module.state_dict().items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        return {k: v.to(torch.float32) for k, v in state.items()}

    def export_weights(self, folder: Path, checkpoint: Path) -> Path:
        """Rank 0: the weights folder of `checkpoint` (training.weights), published whole."""
        with self._rng_untouched():
            state = self.consolidated_state_dict(checkpoint)
            # The EMA covers the parameters; buffers (not trained) are the model's.
            ema = None if self.ema is None else {k: self.ema.shadow.get(k, v) for k, v in state.items()}
            c = self.config
            info = {"stage": c.stage, "name": c.name, "step": self.counters.step, "caption": c.data.caption,
                    "init": self.init_report and {k: self.init_report[k] for k in ("source", "transition")}}
            extra, adapters = None, {}
            if c.lora.enabled:  # merged full weights in the folder, the adapters beside them
                state, adapters[ADAPTER_DIR] = split_state(state, c.lora)
                if ema is not None:
                    ema, adapters[EMA_ADAPTER_DIR] = split_state(ema, c.lora)

                def extra(tmp: Path) -> None:
                    for name, adapter in adapters.items():
                        save_adapter(tmp / name, adapter, c.lora, self.model_config)
            write_weights_folder(folder, self.model_config, state, self.pipeline_info(), ema, info, extra=extra)
        log.info("checkpoint %s, weights %s", checkpoint, folder)
        return folder

    def _weights_for(self, use_ema: bool) -> dict[str, torch.Tensor]:
        """Rank 0: the current full weights (EMA or model; LoRA merged) in PixArt's own layout."""
        if use_ema and self.ema is not None:
            weights = self.ema.full_state_dict(self.engine.module)
        else:
            weights = {k: v.float() for k, v in self.engine.module.state_dict().items()}
        return split_state(weights, self.config.lora)[0] if self.config.lora.enabled else weights

    def evaluate(self) -> dict | None:
        """Rank 0: FID and CLIP score on the held-out set (config `evaluation`), reported and kept in eval.jsonl."""
        if self._evaluation is None:
            return None
        with self._rng_untouched():
            result = {"step": self.counters.step,
                      **self._evaluation(self._weights_for(self.config.evaluation.use_ema))}
        with open(self.out / "eval.jsonl", "a") as fh:
            fh.write(json.dumps(result) + "\n")
        self.reporter.scalars(self.counters.step, {f"eval/{k}": result[k] for k in ("fid", "clip_score")
                                                   if k in result})
        log.info("evaluation at step %d: %s", self.counters.step,
                 ", ".join(f"{k} {result[k]:.3f}" for k in ("fid", "clip_score") if k in result))
        return result

    def sample_grid(self) -> Path | None:
        """Rank 0: a PNG grid from the fixed prompts (or class labels) with the current EMA (or model) weights,
        also sent to TensorBoard / wandb."""
        if self._grids is None:
            return None
        with self._rng_untouched():
            weights = self._weights_for(self.config.sampling.use_ema)
            grid, path = self._grids(weights, self.out / "samples" / f"step_{self.counters.step:08d}.png")
        self.reporter.image(self.counters.step, "samples", grid)
        log.info("sample grid %s", path)
        return path


def train(config: TrainConfig) -> TrainResult:
    """Run one training sub-stage in this process (one rank of a launched job, or a whole one-process run), and
    release its processes, threads and process group whatever happens."""
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        trainer.close()


ERRORS = (ConfigError, DataError, TransitionError, MissingModelError, TrainingDiverged, CheckpointError)


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
        train(load_train_config(args.config, args.set))
    except ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
