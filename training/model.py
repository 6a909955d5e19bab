"""The PixArt-alpha diffusion transformer (arXiv 2310.00426), the whole network in one file.

A DiT whose per-block adaLN MLPs are replaced by adaLN-single: one global `t_block` (SiLU + Linear to 6 x hidden)
computed once per forward from the timestep embedding, plus a learned `scale_shift_table` per block added to it.
Text enters through a cross-attention branch in every block (no norm, modulation or gate on that branch); the
class-conditional variant used for stage 1 has no cross-attention and adds a label embedding to the timestep
embedding instead, as DiT does. The multi-scale variant adds the original image size and aspect ratio
("micro-conditions") to the timestep embedding.

Parameter and buffer names follow the official implementation (PixArt-alpha/PixArt-alpha, diffusion/model/nets),
so an official state dict maps onto this module key for key (training/checkpoint.py does the few renames).
This file holds the network only: no parallelism, no data, and no I/O beyond save_pretrained/from_pretrained.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.durable import atomic_write_bytes, publish, temp_name

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ASPECT_RATIO_INPUTS = ("bucket_key", "height_width")


class StateDictMismatchError(ValueError):
    """Weights whose keys or shapes do not match the model; the message lists what was expected and what was found."""


# ---------------------------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixArtConfig:
    """Everything that determines the network's shape and conditioning. Frozen: derive variants with
    `dataclasses.replace(PRESETS[name], field=value)`."""

    input_size: int = 32  # latent side at the training resolution (256 px / 8); sets the pos-embed base grid
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    learn_sigma: bool = True  # output eps and the learned-range variance values: 2 x in_channels channels
    caption_channels: int | None = 4096  # T5 width; None for the class-conditional model
    caption_length: int = 120  # tokens in the null caption embedding (T5 max length)
    num_classes: int | None = None  # class-conditional model (stage 1); index num_classes is the null class
    caption_dropout: float = 0.1  # train-mode probability of replacing the caption (or class) by the null one
    micro_conditions: bool = False  # multi-scale variant: original size and aspect ratio embedders
    pe_interpolation: float = 1.0  # pos-embed interpolation scale ("lewei scale"): 1 at 256/512 px, 2 at 1024
    # What the aspect-ratio micro-condition receives: "bucket_key", the official ratio key nearest to h / w (e.g.
    # 0.57 for 192x336), as the official code trains and samples; or "height_width", h / w itself (diffusers'
    # PixArtAlphaPipeline feeds that, of its resolution bin).
    aspect_ratio_input: str = "bucket_key"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"PixArtConfig.{field}: {why} (got {getattr(self, field)!r})")

        for field in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "caption_length"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise bad(field, "must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise bad("hidden_size", f"must be divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise bad("hidden_size", "must be divisible by 4 (2-D sin-cos position embedding)")
        if self.input_size % self.patch_size:
            raise bad("input_size", f"must be divisible by patch_size={self.patch_size}")
        if (self.caption_channels is None) == (self.num_classes is None):
            raise bad("caption_channels", "set exactly one of caption_channels (text model) and num_classes "
                                          f"(class-conditional model); num_classes={self.num_classes!r}")
        if self.caption_channels is not None and self.caption_channels < 1:
            raise bad("caption_channels", "must be a positive integer")
        if self.num_classes is not None and self.num_classes < 1:
            raise bad("num_classes", "must be a positive integer")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise bad("caption_dropout", "must be in [0, 1)")
        if self.micro_conditions and self.hidden_size % 3:
            raise bad("hidden_size", "must be divisible by 3 with micro_conditions (h, w and aspect ratio "
                                     "each get hidden_size // 3 channels)")
        if self.pe_interpolation <= 0:
            raise bad("pe_interpolation", "must be positive")
        if self.aspect_ratio_input not in ASPECT_RATIO_INPUTS:
            raise bad("aspect_ratio_input", f"must be one of {ASPECT_RATIO_INPUTS}")

    def aspect_ratio(self, height: float, width: float) -> float:
        """The aspect-ratio micro-condition of an image (or bucket) of height x width, as `aspect_ratio_input` says."""
        if self.aspect_ratio_input == "height_width":
            return height / width
        from curation.shard_format import aspect_ratio_key

        return aspect_ratio_key(height, width)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def base_size(self) -> int:
        """The pos-embed grid side the model was trained at; other grids are stretched onto it."""
        return self.input_size // self.patch_size

    @property
    def text_conditioned(self) -> bool:
        return self.caption_channels is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PixArtConfig":
        """Strict: an unknown key is an error naming it (a misspelt field must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PixArtConfig: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


_XL = dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)
_TINY = dict(hidden_size=96, depth=2, num_heads=4, patch_size=2, input_size=8, caption_channels=32)

PRESETS: dict[str, PixArtConfig] = {
    # PixArt-XL/2 at 256 px: 610,856,096 parameters.
    "PixArt-XL/2": PixArtConfig(**_XL, input_size=32),
    "PixArt-XL/2-512": PixArtConfig(**_XL, input_size=64),
    # Multi-scale (multi-aspect) variants with micro-conditions: 611,349,152 parameters.
    "PixArt-XL/2-512-MS": PixArtConfig(**_XL, input_size=64, micro_conditions=True),
    "PixArt-XL/2-MS": PixArtConfig(**_XL, input_size=128, micro_conditions=True, pe_interpolation=2.0),
    # Stage 1: class-conditional on ImageNet (1000 classes) at 256 px.
    "PixArt-XL/2-class": PixArtConfig(**_XL, input_size=32, caption_channels=None, num_classes=1000),
    # Tiny models for tests and the CPU demo (caption width = the tiny T5 of tests/conftest.py).
    "tiny": PixArtConfig(**_TINY),
    "tiny-MS": PixArtConfig(**_TINY, micro_conditions=True),
    "tiny-class": PixArtConfig(**{**_TINY, "caption_channels": None}, num_classes=10),
}
PRESETS["PixArt-XL/2-1024-MS"] = PRESETS["PixArt-XL/2-MS"]


# ---------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid_hw: tuple[int, int], base_size: int, interpolation: float,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [h*w, dim] for an h x w patch grid, row-major.

    Grid coordinates are stretched so that any grid spans the same range as the base_size grid the model was trained
    on, then divided by the interpolation scale: pos = arange(n) / (n / base_size) / interpolation. Each half of the
    channels is [sin, cos] of pos * omega_k with
    omega_k = 10000^(-k / (dim/4)). As in the official code (and MAE's), the first half of the channels encodes the
    column (w) and the second half the row (h).
    """
    h, w = grid_hw
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64, device=device) / (n / base_size) / interpolation
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [n, dim/2]

    rows, cols = axis(h), axis(w)
    emb = torch.cat([cols[None, :].expand(h, w, -1), rows[:, None].expand(h, w, -1)], dim=-1)
    return emb.reshape(h * w, dim).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, by a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, hidden]


class TimestepEmbedder(nn.Module):
    """Scalar -> 256 sinusoidal features ([cos, sin], max period 10000) -> 2-layer SiLU MLP."""

    frequency_dim = 256

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """A micro-condition vector [B, k] -> each value embedded like a timestep -> concatenated [B, k * hidden]."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return super().forward(s.reshape(-1)).reshape(s.shape[0], -1)


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear (timm's Mlp naming, which the official checkpoints use)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 features -> hidden by an MLP. `y_embedding` is the null caption for classifier-free guidance; as in the
    official model it is a fixed random buffer (saved with the weights, not trained)."""

    def __init__(self, caption_channels: int, hidden_size: int, caption_length: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(caption_length, caption_channels) / caption_channels ** 0.5)

    def forward(self, caption: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        if drop is not None:
            length = caption.shape[1]
            if length > self.y_embedding.shape[0]:
                raise ValueError(f"cannot drop a caption of {length} tokens: the null caption embedding has "
                                 f"{self.y_embedding.shape[0]} (PixArtConfig.caption_length)")
            null = self.y_embedding[:length].to(caption.dtype)
            caption = torch.where(drop[:, None, None], null[None], caption)
        return self.y_proj(caption)


class LabelEmbedder(nn.Module):
    """Class index -> hidden; row num_classes is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# ---------------------------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, computed by torch SDPA."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; `mask` [B, 1, 1, L] bool (True = attend) hides caption padding."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(hidden_size, hidden_size)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size)  # [k; v] stacked, as the official checkpoints
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        q = self.q_linear(x).view(B, N, H, D).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class PixArtBlock(nn.Module):
    """Self-attention and MLP modulated by adaLN-single (shift, scale, gate from the global t_block output plus this
    block's scale_shift_table); between them an unmodulated cross-attention to the caption (text models only)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, t0: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, _, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.view(B, 6, C)
        ).chunk(6, dim=1)  # each [B, 1, C]
        # addcmul(a, b, c) = a + b * c in one pass over the activations (modulate, then gated residual)
        x = torch.addcmul(x, gate_msa, self.attn(torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa)))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, y, mask)
        return torch.addcmul(x, gate_mlp, self.mlp(torch.addcmul(shift_mlp, self.norm2(x), 1 + scale_mlp)))


class FinalLayer(nn.Module):
    """LayerNorm, shift/scale from the timestep embedding plus its own scale_shift_table, linear to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))


# ---------------------------------------------------------------------------------------------------------------
# Token routing (TREAD), a training-time shortcut
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRouting:
    """TREAD (Krause et al. 2025, arXiv 2501.04765): in training, a random `rate` share of each sample's image
    tokens skips blocks start..end-1 and rejoins the others, at its own position, after them. The blocks in that
    range see fewer tokens (cheaper steps), the skipped tokens carry their earlier representation past them, and the
    loss still covers every token. No parameters; inference (eval mode) runs every token through every block."""

    rate: float = 0.5
    start: int = 1
    end: int = 3  # exclusive

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"TokenRouting.rate: must be in [0, 1), got {self.rate!r}")
        if not 0 <= self.start < self.end:
            raise ValueError(f"TokenRouting.start/end: need 0 <= start < end, got {self.start}, {self.end}")


def route_tokens(x: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the tokens that stay [B, N - round_down(rate N), C], their positions [B, N - ...]) for x [B, N, C]; a
    random subset per sample (global torch RNG, like caption dropout). Nothing skips when rate N < 1."""
    B, N, C = x.shape
    stay = N - int(N * rate)
    if stay == N:
        return x, None
    positions = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :stay]
    return x.gather(1, positions[..., None].expand(B, stay, C)), positions


def unroute_tokens(skipped: torch.Tensor, routed: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The tokens that stayed, put back at their positions among `skipped` (the whole sequence as it was before the
    routed blocks): the inverse of route_tokens."""
    if positions is None:
        return routed
    return skipped.scatter(1, positions[..., None].expand_as(routed), routed)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class PixArt(nn.Module):
    """PixArt-alpha DiT. See docs/ARCHITECTURE.md (training.model) for the call convention."""

    def __init__(self, config: PixArtConfig):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = cfg.gradient_checkpointing  # a runtime switch; the config gives the default
        self.routing: TokenRouting | None = None  # TREAD, set by the trainer; used in train mode only
        hidden = cfg.hidden_size

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        if cfg.text_conditioned:
            self.y_embedder = CaptionEmbedder(cfg.caption_channels, hidden, cfg.caption_length)
        else:
            self.y_embedder = LabelEmbedder(cfg.num_classes, hidden)
        if cfg.micro_conditions:
            self.csize_embedder = SizeEmbedder(hidden // 3)  # (h, w) -> 2/3 of the channels
            self.ar_embedder = SizeEmbedder(hidden // 3)  # aspect ratio -> the last third
        self.blocks = nn.ModuleList(
            PixArtBlock(hidden, cfg.num_heads, cfg.mlp_ratio, cross_attention=cfg.text_conditioned)
            for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(hidden, cfg.patch_size, cfg.out_channels)
        self._pos_embed_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialization: xavier-uniform linears with zero bias, the patch embedding like a linear,
        N(0, 0.02) for the embedding MLPs, t_block and the class table, and zeros for each cross-attention output
        projection and the final linear (so a fresh model predicts zeros, and text added to a class-conditional
        stage-1 model starts as a no-op)."""

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # its bias keeps the Conv2d default, as in the official code
        embedders = [self.t_embedder] + ([self.csize_embedder, self.ar_embedder] if self.config.micro_conditions else [])
        for embedder in embedders:
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        if self.config.text_conditioned:
            nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
            nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for block in self.blocks:
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # --- forward -------------------------------------------------------------------------------------------------

    def pos_embed(self, grid_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
        """[1, h*w, hidden] for this patch grid; computed once per (grid, device) and kept."""
        key = (grid_hw, str(device))
        emb = self._pos_embed_cache.get(key)
        if emb is None:
            cfg = self.config
            emb = sincos_pos_embed_2d(cfg.hidden_size, grid_hw, cfg.base_size, cfg.pe_interpolation, device)[None]
            if device.type != "meta":
                self._pos_embed_cache[key] = emb
        return emb

    def _check_inputs(self, x, timestep, caption, caption_mask, class_labels, resolution, aspect_ratio):
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected latents [B, {cfg.in_channels}, h, w], got shape {tuple(x.shape)}")
        B, _, h, w = x.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"x: latent size {h}x{w} is not divisible by patch_size={cfg.patch_size}")
        if timestep.shape != (B,):
            raise ValueError(f"timestep: expected shape [{B}] (one per sample) or a scalar, got {tuple(timestep.shape)}")
        if cfg.text_conditioned:
            if caption is None:
                raise ValueError("caption: required by a text-conditioned model ([B, L, caption_channels] T5 features)")
            if caption.ndim != 3 or caption.shape[0] != B or caption.shape[2] != cfg.caption_channels:
                raise ValueError(f"caption: expected [{B}, L, {cfg.caption_channels}] (caption_channels="
                                 f"{cfg.caption_channels}), got shape {tuple(caption.shape)}")
            if caption_mask is not None and caption_mask.shape != caption.shape[:2]:
                raise ValueError(f"caption_mask: expected [{B}, {caption.shape[1]}] to match the caption, "
                                 f"got shape {tuple(caption_mask.shape)}")
            if class_labels is not None:
                raise ValueError("class_labels: this is a text-conditioned model (num_classes=None); pass caption")
        else:
            if class_labels is None or class_labels.shape != (B,):
                got = None if class_labels is None else tuple(class_labels.shape)
                raise ValueError(f"class_labels: a class-conditional model needs [{B}] class indices, got {got}")
            if caption is not None:
                raise ValueError("caption: this is a class-conditional model (caption_channels=None); pass class_labels")
        if cfg.micro_conditions:
            for name, value, k in (("resolution", resolution, 2), ("aspect_ratio", aspect_ratio, 1)):
                if value is None or value.ndim != 2 or value.shape[1] != k or value.shape[0] not in (1, B):
                    got = None if value is None else tuple(value.shape)
                    raise ValueError(f"{name}: the multi-scale model needs [{B}, {k}] (micro_conditions=True), got {got}")
        elif resolution is not None or aspect_ratio is not None:
            raise ValueError("resolution/aspect_ratio: only for a model with micro_conditions=True")

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        caption: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, in_channels, h, w], timestep [B] (or scalar) in [0, 1000) -> [B, out_channels, h, w].

        caption [B, L, caption_channels] with caption_mask [B, L] bool (True = real token) for text models;
        class_labels [B] for class-conditional ones; resolution [B, 2] (original h, w in pixels) and
        aspect_ratio [B, 1] for micro_conditions. force_drop_ids [B] bool swaps in the null caption/class; in train
        mode captions/classes are also dropped at random with probability config.caption_dropout. Token positions
        that are padding in every caption of the batch are skipped (trim_caption_padding).
        """
        cfg = self.config
        B = x.shape[0]
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        self._check_inputs(x, timestep, caption, caption_mask, class_labels, resolution, aspect_ratio)
        h, w = x.shape[-2] // cfg.patch_size, x.shape[-1] // cfg.patch_size
        # Inputs follow the weights' dtype (e.g. fp32 loader output into a bf16 DeepSpeed engine); autocast still rules.
        dtype = self.x_embedder.proj.weight.dtype
        x = x.to(dtype)
        if caption is not None:
            caption = caption.to(dtype)

        x = self.x_embedder(x) + self.pos_embed((h, w), x.device).to(x.dtype)
        t = self.t_embedder(timestep)
        if cfg.micro_conditions:
            size = torch.cat([self.csize_embedder(resolution.expand(B, 2)), self.ar_embedder(aspect_ratio.expand(B, 1))], 1)
            t = t + size.to(t.dtype)

        drop = force_drop_ids.bool() if force_drop_ids is not None else None
        if drop is None and self.training and cfg.caption_dropout > 0:
            drop = torch.rand(B, device=x.device) < cfg.caption_dropout
        y = mask = None
        if cfg.text_conditioned:
            if caption_mask is not None:
                caption, caption_mask = trim_caption_padding(caption, caption_mask.bool())
                # One mask for all blocks. A caption with no valid token attends to every (kept) position, as an
                # additive -10000 bias would (diffusers), instead of producing NaN from an all-masked softmax row.
                mask = (caption_mask | ~caption_mask.any(dim=1, keepdim=True))[:, None, None, :]
            y = self.y_embedder(caption, drop)
        else:
            t = t + self.y_embedder(class_labels, drop)
        t0 = self.t_block(t)  # adaLN-single: computed once, shared by every block

        # TREAD: in training, a random share of the tokens skips blocks [start, end) and rejoins after them.
        route = self.routing if self.training and self.routing is not None else None
        if route is not None and route.end > len(self.blocks):
            raise ValueError(f"routing.end: {route.end} is past the model's {len(self.blocks)} blocks")
        for i, block in enumerate(self.blocks):
            if route is not None and i == route.start:
                skipped = x
                x, positions = route_tokens(x, route.rate)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, y, t0, mask, use_reentrant=False)
            else:
                x = block(x, y, t0, mask)
            if route is not None and i == route.end - 1:
                x = unroute_tokens(skipped, x, positions)
        x = self.final_layer(x, t)
        return self.unpatchify(x, h, w)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h*w, p*p*c] tokens -> [B, c, h*p, w*p] (channels of a token ordered (row, column, channel))."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # --- weights on disk ----------------------------------------------------------------------------------------

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, folder: str | os.PathLike, filename: str = WEIGHTS_NAME) -> Path:
        """Write `config.json` and `filename` (safetensors) into folder, each durably (common.durable)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(self.config, gradient_checkpointing=self.gradient_checkpointing)
        atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = temp_name(folder / filename)
        save_file(tensors, str(tmp), metadata={"format": "pt", "model": "PixArt"})
        publish(tmp, folder / filename)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, filename: str = WEIGHTS_NAME,
                        device: torch.device | str = "cpu") -> "PixArt":
        """Build the model from `folder/config.json` and load `folder/filename`; every key must match exactly.
        Returned in eval mode (as diffusers/transformers do); call .train() to train it."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}; expected a folder written by PixArt.save_pretrained")
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"{folder}: no {filename}; expected a folder written by PixArt.save_pretrained")
        config = PixArtConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        model = cls(config)
        load_state_dict_strict(model, load_file(str(folder / filename), device=str(device)), source=str(folder / filename))
        return model.to(device).eval()


def trim_caption_padding(caption: torch.Tensor, caption_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing token positions that are padding in every caption of the batch, so the caption MLP and the
    cross-attention skip them (the official model goes further and packs the valid tokens of all captions). The
    output does not change: those positions are masked out anyway. Costs one host sync; skipped under torch.compile.
    """
    if torch.compiler.is_compiling():
        return caption, caption_mask
    positions = torch.arange(1, caption_mask.shape[1] + 1, device=caption_mask.device)
    keep = max(int((caption_mask.any(dim=0) * positions).max()), 1)
    return caption[:, :keep], caption_mask[:, :keep]


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """load_state_dict that names every missing, unexpected and wrongly shaped key (StateDictMismatchError)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
              for k in sorted(set(expected) & set(state_dict)) if expected[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        def listing(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

        parts = [f"{source} does not match the model:"]
        if missing:
            parts.append(f"  missing keys: {listing(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys: {listing(unexpected)}")
        if shapes:
            parts.append(f"  wrong shapes: {listing(shapes)}")
        raise StateDictMismatchError("\n".join(parts))
    model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs (for MFU)
# ---------------------------------------------------------------------------------------------------------------


def forward_flops(config: PixArtConfig, latent_hw: tuple[int, int], caption_tokens: int | None = None) -> int:
    """Floating-point operations of one forward pass for ONE sample (multiply-add = 2 FLOPs; matmuls only, the
    element-wise ops are a few percent and left out). A training step costs about 3x this (backward = 2x forward);
    more with gradient checkpointing (4x).

    With d = hidden_size, m = mlp_ratio * d, N = (h/p)(w/p) image tokens, L = caption tokens (default
    caption_length), c = caption_channels, o = p^2 * out_channels, per block:
        self-attention   2*N*d*3d (qkv) + 2*2*N^2*d (QK^T and AV) + 2*N*d*d (proj)
        cross-attention  2*N*d*d (q) + 2*L*d*2d (kv) + 2*2*N*L*d (QK^T and AV) + 2*N*d*d (proj)   [text models]
        MLP              2*2*N*d*m
    plus once: patch embedding 2*N*(p^2*in_channels)*d, caption projection 2*L*(c*d + d*d), timestep MLPs
    2*(256*d + d*d), t_block 2*d*6d, size embedders 3 * 2*(256*d/3 + (d/3)^2), final linear 2*N*d*o.
    """
    cfg = config
    h, w = latent_hw
    d, p = cfg.hidden_size, cfg.patch_size
    m = int(d * cfg.mlp_ratio)
    N = (h // p) * (w // p)
    flops = 2 * N * d * 3 * d + 2 * 2 * N * N * d + 2 * N * d * d + 2 * 2 * N * d * m
    once = 2 * N * p * p * cfg.in_channels * d + 2 * (256 * d + d * d) + 2 * d * 6 * d + 2 * N * d * p * p * cfg.out_channels
    if cfg.text_conditioned:
        L = cfg.caption_length if caption_tokens is None else caption_tokens
        flops += 2 * N * d * d + 2 * L * d * 2 * d + 2 * 2 * N * L * d + 2 * N * d * d
        once += 2 * L * (cfg.caption_channels * d + d * d)
    if cfg.micro_conditions:
        s = d // 3
        once += 3 * 2 * (256 * s + s * s)
    return cfg.depth * flops + once
