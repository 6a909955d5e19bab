"""The DeepSpeed engine of a run: the DeepSpeed config a TrainConfig implies, and the learning-rate schedule."""
from __future__ import annotations

import torch

from training.compute import adamw, compile_engine
from training.train_config import TrainConfig


def deepspeed_config(config: TrainConfig, bf16: bool) -> dict:
    """The DeepSpeed config a TrainConfig implies (deepspeed.extra merged last)."""
    ds = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        # DeepSpeed divides each micro-batch's loss by this and steps the optimizer every this many micro-batches.
        "gradient_accumulation_steps": config.optimizer.gradient_accumulation_steps,
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


def build_engine(model: torch.nn.Module, config: TrainConfig, ds_config: dict, global_batch: int):
    """A DeepSpeed engine around `model` with torch's AdamW and the warm-up schedule; returns (engine, lr)."""
    import deepspeed

    opt = config.optimizer
    lr = opt.effective_lr(global_batch)
    # fused where the device has it; only trainable parameters (LoRA freezes the rest)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr, opt, next(model.parameters()).device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupThenConstant(opt.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if config.run.compile:
        compile_engine(engine, config.run.compile_backend)
    return engine, lr
