"""What a run reports: the log file in the run folder, TensorBoard (scalars, sample grids, hparams, the config as
text) and Weights & Biases (`run.report_to`), throughput per device and model FLOPs utilization.

MFU = achieved model FLOP/s per device / the device's peak. Achieved FLOPs are analytic (training.model
.forward_flops, x3 for forward + backward, x4 with gradient checkpointing, which recomputes the forward), counted
for every image at its own bucket size and caption length; the peak is `run.peak_tflops` or, for known GPUs,
their dense bf16 peak. On CPU (no known peak) MFU is not logged; achieved TFLOP/s is.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import torch

from common.durable import atomic_write_bytes
from training.model import PixArtConfig, forward_flops

log = logging.getLogger("training.metrics")

LOG_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"

# Dense bf16 peak TFLOP/s (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def device_peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def attach_log_file(path: Path, rank: int) -> logging.Handler:
    """Everything logged in this process (INFO on rank 0, warnings on the others) also goes to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(rank=rank)))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > handler.level or root.level == logging.NOTSET:
        root.setLevel(handler.level)
    return handler


class Throughput:
    """Images and model FLOPs between two reports, on this device."""

    def __init__(self, model_config: PixArtConfig, peak_tflops: float | None):
        self.model_config, self.peak = model_config, peak_tflops
        passes = 4 if model_config.gradient_checkpointing else 3
        self._per_image = lambda hw, tokens: passes * forward_flops(model_config, hw, tokens)
        self.reset()

    def reset(self) -> None:
        self.images, self.flops, self.start = 0, 0.0, time.perf_counter()

    def add(self, batch: dict) -> None:
        n, hw = len(batch["keys"]), tuple(batch["latent_mean"].shape[-2:])
        tokens = None
        if "caption_mask" in batch:  # the caption MLP and cross-attention see the batch's longest caption
            tokens = int(batch["caption_mask"].sum(1).max())
        self.images += n
        self.flops += n * self._per_image(hw, tokens)

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"perf/images_per_s_per_device": self.images / elapsed,
               "perf/tflops_per_device": self.flops / elapsed / 1e12}
        if self.peak:
            out["perf/mfu"] = out["perf/tflops_per_device"] / self.peak
        return out


class Reporter:
    """Rank 0's metric sinks: TensorBoard and/or wandb, as `run.report_to` says. Other ranks get a no-op one."""

    def __init__(self, out: Path, config, enabled: bool):
        from common.config import dump_config

        self.config, self.enabled = config, enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        dumped = dump_config(config)
        if "tensorboard" in config.run.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
            self.tb.add_text("config", "```\n" + json.dumps(dumped, indent=2) + "\n```", 0)
        if "wandb" in config.run.report_to:
            import wandb  # preflight checked it is installed

            # One wandb run per run folder: a resumed training continues it.
            id_file = out / "wandb_id"
            run_id = (id_file.read_text(errors="replace").strip() if id_file.is_file() else "")
            if not run_id.isalnum():  # absent, empty or damaged: a new wandb run
                run_id = uuid.uuid4().hex[:12]
                atomic_write_bytes(id_file, run_id.encode())
            self.wandb = wandb.init(project=config.run.wandb_project, name=config.name, id=run_id, resume="allow",
                                    dir=str(out), config=dumped)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, step: int, name: str, image) -> None:
        import numpy as np

        if self.tb is not None:
            self.tb.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(image)}, step=step)

    def hparams(self, final: dict[str, float]) -> None:
        """The run's headline settings next to its final metrics (TensorBoard's HPARAMS tab, wandb's summary)."""
        c = self.config
        hp = {"stage": c.stage, "name": c.name, "model": c.model.preset, "batch_size": c.data.batch_size,
              "gradient_accumulation_steps": c.optimizer.gradient_accumulation_steps, "lr": c.optimizer.lr,
              "warmup_steps": c.optimizer.warmup_steps, "ema_decay": c.ema.decay, "steps": c.run.steps,
              "zero_stage": c.deepspeed.zero_stage, "objective": c.diffusion.objective,
              "prediction_type": c.diffusion.prediction_type}
        if self.tb is not None:
            self.tb.add_hparams(hp, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")
        if self.wandb is not None:
            self.wandb.summary.update(final)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
