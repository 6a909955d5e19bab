"""Compute per training step: the optimizer kernel, torch.compile, and where attention runs.

- AdamW with torch's fused kernel (one kernel for the whole update instead of a few per parameter group) on every
  device torch has one for (CUDA, and CPU in recent torch); `optimizer.fused` in the trainer config overrides.
- `run.compile: true` compiles the model in place (`nn.Module.compile`, so parameter names, checkpoints and the EMA
  are unchanged) through the DeepSpeed engine. The first steps pay for the compilation; benchmarks/bench_compile.py
  measures compiled against eager steps side by side.
- Attention: the model calls `F.scaled_dot_product_attention` with float or no masks, which on a GPU dispatches to
  the fused flash / memory-efficient kernels (bf16 or fp16 inputs, head dim <= 256). `sdpa_backend_check` runs the
  model's attention modules with every backend but the fused ones disabled, so a change that silently falls back
  to the unfused math path fails tests/test_compute.py on a GPU.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

log = logging.getLogger("training.compute")


def fused_adamw_available(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for this device type."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # an older torch: CUDA only
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


def adamw(params: Iterable[torch.nn.Parameter], lr: float, optimizer_config, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW with the config's betas, eps and weight decay; fused where the device has the kernel (or as
    `optimizer_config.fused` says)."""
    fused = optimizer_config.fused
    if fused is None:
        fused = fused_adamw_available(device)
    elif fused and not fused_adamw_available(device):
        raise ValueError(f"optimizer.fused: torch has no fused AdamW kernel for {device.type}")
    return torch.optim.AdamW(params, lr=lr, betas=optimizer_config.betas, eps=optimizer_config.eps,
                             weight_decay=optimizer_config.weight_decay, fused=fused)


def compile_engine(engine, backend: str = "inductor") -> None:
    """Compile the engine's module in place (DeepSpeedEngine.compile wraps nn.Module.compile)."""
    engine.compile(backend=backend)
    log.info("model compiled with torch.compile (backend %s)", backend)


def sdpa_backend_check(model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, **kwargs) -> list[str]:
    """Run `model` forward once on a GPU with SDPA restricted to the fused kernels (flash and memory-efficient)
    and return the backends that were allowed; raises RuntimeError when an attention call cannot use them
    (torch then has no kernel to run it with)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if x.device.type != "cuda":
        raise ValueError("sdpa_backend_check: the fused SDPA kernels are GPU kernels; give CUDA tensors")
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(fused), torch.no_grad():
        model(x, timestep, **kwargs)
    return [b.name for b in fused]
