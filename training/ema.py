"""Exponential moving average of a model's parameters (PixArt-alpha keeps one with decay 0.9999).

The average lives in fp32 whatever precision the model trains in, and covers the parameters only: buffers (the
fixed null-caption embedding) are not trained, so the model's own are used when the average is exported.
Under ZeRO-3 the parameters are partitioned; `update` gathers them first (one extra all-gather per step).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _gathered(params: list[nn.Parameter]):
    """A context in which ZeRO-3 partitioned parameters hold their full values (a no-op for other parameters)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        with _gathered([params[n] for n in self.names]):
            self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        current = [params[n] for n in self.names]
        with _gathered(current):
            shadow = [self.shadow[n] for n in self.names]
            torch._foreach_lerp_(shadow, [p.detach().float() for p in current], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = set(self.names) - set(state), set(state) - set(self.names)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for name in self.names:
            self.shadow[name].copy_(state[name])

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A state dict of `model`'s layout with the averaged parameters and the model's buffers (CPU, fp32)."""
        out = {}
        for name, value in model.state_dict().items():
            out[name] = (self.shadow[name] if name in self.shadow else value).detach().to("cpu", torch.float32)
        return out
