"""Weights interop: official PixArt-alpha `.pth` checkpoints, and diffusers' `PixArtTransformer2DModel` both ways.

Our parameter names are the official ones, so an official state dict needs only its wrapper unpacked and its
`pos_embed` buffer compared with the one the config computes, then dropped (we recompute the position embedding
for every input size). Diffusers names and splits
things differently (separate q/k/v projections, `adaln_single`, `caption_projection`, ...); the table in
`_renames` is the whole mapping, and the fused projections are split/concatenated along the output dimension.

    python -m training.checkpoint --official PixArt-XL-2-512x512.pth --preset PixArt-XL/2-512 --out weights/
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from training.model import (PRESETS, PixArt, PixArtConfig, StateDictMismatchError, load_state_dict_strict,
                            sincos_pos_embed_2d)

# Official buffers we do not keep: the position embedding is recomputed for each latent size.
OFFICIAL_RECOMPUTED = ("pos_embed",)
# Wrapper keys of official/our training checkpoints, in order of preference.
WRAPPER_KEYS = ("state_dict", "model", "module")


# ---------------------------------------------------------------------------------------------------------------
# Official .pth
# ---------------------------------------------------------------------------------------------------------------


def read_official_state_dict(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an official PixArt-alpha checkpoint, unwrapped from {"state_dict": ...} (or
    {"state_dict_ema": ...} with ema=True), with DDP's "module." prefix removed. Never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it, a truncated file, ...
        raise ValueError(f"{path}: not a loadable tensor checkpoint ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    wanted = ("state_dict_ema",) if ema else WRAPPER_KEYS
    for key in wanted:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    else:
        if ema:
            raise ValueError(f"{path}: no 'state_dict_ema' entry (keys: {sorted(obj)[:10]})")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a state dict "
                             f"or one wrapped as {{'state_dict': ...}}")
        state[key.removeprefix("module.")] = value
    return state


def check_pos_embed(stored: torch.Tensor, config: PixArtConfig, source: str = "checkpoint") -> None:
    """Refuse a checkpoint whose stored position embedding is not what `config` computes for the same grid.

    The official models keep their training grid's sin-cos embedding as a buffer; we recompute it from the grid,
    input_size / patch_size (the base grid) and pe_interpolation. A config that differs there gives a model whose
    every output is wrong (about 0.47 relative difference for a wrong pe_interpolation) without any key mismatch.
    A config that computes the same embedding on that grid (a 512-px checkpoint in a 1024-px config with twice the
    pe_interpolation, as the official 1024-px model was trained) is accepted."""
    stored = stored.detach().float().cpu().reshape(-1, stored.shape[-1])
    side = math.isqrt(stored.shape[0])
    if stored.shape[-1] == config.hidden_size and side * side == stored.shape[0]:
        ours = sincos_pos_embed_2d(config.hidden_size, (side, side), config.base_size, config.pe_interpolation)
        if torch.allclose(stored, ours, atol=1e-4, rtol=0):
            return
        matches = [s for s in (0.25, 0.5, 1.0, 2.0, 3.0, 4.0) if torch.allclose(
            stored, sincos_pos_embed_2d(config.hidden_size, (side, side), side, s), atol=1e-4, rtol=0)]
        hint = (f"; it is that of input_size={side * config.patch_size}, pe_interpolation={matches[0]:g}"
                if matches else "")
    else:
        hint = f"; expected a square grid of {config.hidden_size}-wide embeddings"
    raise StateDictMismatchError(
        f"{source}: its stored pos_embed {tuple(stored.shape)} is not the position embedding of this config "
        f"(input_size={config.input_size}, patch_size={config.patch_size}, pe_interpolation="
        f"{config.pe_interpolation:g}){hint}. Choose the preset the checkpoint was trained as, or set "
        f"model.overrides pe_interpolation / input_size to match it")


def official_to_pixart(state_dict: Mapping[str, torch.Tensor], config: PixArtConfig | None = None,
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Official keys -> ours: identical names, minus the recomputed buffers. With `config`, a stored pos_embed
    is first compared with the one the config recomputes (check_pos_embed)."""
    if config is not None and "pos_embed" in state_dict:
        check_pos_embed(state_dict["pos_embed"], config, source)
    return {k: v for k, v in state_dict.items() if k not in OFFICIAL_RECOMPUTED}


def load_official_checkpoint(path: str | Path, config: PixArtConfig | str, ema: bool = False) -> PixArt:
    """A PixArt built from `config` (or a PRESETS name) with the weights of an official `.pth` checkpoint.
    Missing, unexpected or wrongly shaped keys raise StateDictMismatchError naming them."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; expected one of {sorted(PRESETS)}")
        config = PRESETS[config]
    model = PixArt(config)
    state = official_to_pixart(read_official_state_dict(path, ema=ema), config, source=str(path))
    load_state_dict_strict(model, state, source=str(path))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# diffusers PixArtTransformer2DModel
# ---------------------------------------------------------------------------------------------------------------


def diffusers_config(config: PixArtConfig, sample_size: int | None = None) -> dict:
    """Keyword arguments of `PixArtTransformer2DModel` describing the same network as `config`.

    `sample_size` declares another native latent size than config.input_size, with the interpolation scale
    rescaled by sample_size / input_size so that the position embedding of every grid stays the same (both
    stretch a grid onto base_size / interpolation_scale). PixArtAlphaPipeline passes micro-conditions only to a
    transformer whose sample_size is 128, so training.export declares 128 for multi-scale models of other sizes."""
    if not config.text_conditioned:
        raise ValueError("a class-conditional PixArt (num_classes set) has no diffusers PixArtTransformer2DModel "
                         "equivalent; only text models convert")
    if config.mlp_ratio != 4.0:
        raise ValueError(f"mlp_ratio: diffusers' PixArt feed-forward is 4x wide, got {config.mlp_ratio}")
    declared = config.input_size if sample_size is None else sample_size
    scale = config.pe_interpolation * declared / config.input_size
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        cross_attention_dim=config.hidden_size,
        attention_bias=True,
        sample_size=declared,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=int(scale) if float(scale).is_integer() else scale,
        use_additional_conditions=config.micro_conditions,
        caption_channels=config.caption_channels,
    )


def config_from_diffusers(transformer, caption_length: int = 120) -> PixArtConfig:
    """The PixArtConfig of a diffusers PixArtTransformer2DModel (its `.config` must describe PixArt-alpha)."""
    c = transformer.config
    fixed = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
             "attention_bias": True, "attention_type": "default"}
    for key, value in fixed.items():
        if c.get(key, value) != value:
            raise ValueError(f"diffusers config {key}={c.get(key)!r}: only {value!r} converts to PixArt-alpha")
    if c.get("caption_channels") is None:
        raise ValueError("diffusers config caption_channels=None: the transformer has no caption projection")
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    if c.get("cross_attention_dim") not in (None, hidden):
        raise ValueError(f"diffusers config cross_attention_dim={c['cross_attention_dim']}: "
                         f"expected the hidden size {hidden}")
    out_channels = c.get("out_channels") or c["in_channels"]
    if out_channels not in (c["in_channels"], 2 * c["in_channels"]):
        raise ValueError(f"diffusers config out_channels={out_channels}: expected in_channels or 2 x in_channels")
    scale = c.get("interpolation_scale") or max(c["sample_size"] // 64, 1)
    return PixArtConfig(
        input_size=c["sample_size"], patch_size=c["patch_size"], in_channels=c["in_channels"], hidden_size=hidden,
        depth=c["num_layers"], num_heads=c["num_attention_heads"], mlp_ratio=4.0,
        learn_sigma=out_channels == 2 * c["in_channels"], caption_channels=c["caption_channels"],
        caption_length=caption_length, micro_conditions=bool(transformer.use_additional_conditions),
        pe_interpolation=float(scale),
    )


def _renames(config: PixArtConfig) -> dict[str, str]:
    """Our parameter name -> diffusers' for every tensor that is only renamed (without .weight/.bias)."""
    table = {
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
        "t_block.1": "adaln_single.linear",
        "y_embedder.y_proj.fc1": "caption_projection.linear_1",
        "y_embedder.y_proj.fc2": "caption_projection.linear_2",
        "final_layer.linear": "proj_out",
    }
    if config.micro_conditions:
        for ours, theirs in (("csize_embedder", "resolution_embedder"), ("ar_embedder", "aspect_ratio_embedder")):
            table[f"{ours}.mlp.0"] = f"adaln_single.emb.{theirs}.linear_1"
            table[f"{ours}.mlp.2"] = f"adaln_single.emb.{theirs}.linear_2"
    for i in range(config.depth):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
        table[f"{ours}.attn.proj"] = f"{theirs}.attn1.to_out.0"
        table[f"{ours}.cross_attn.q_linear"] = f"{theirs}.attn2.to_q"
        table[f"{ours}.cross_attn.proj"] = f"{theirs}.attn2.to_out.0"
        table[f"{ours}.mlp.fc1"] = f"{theirs}.ff.net.0.proj"
        table[f"{ours}.mlp.fc2"] = f"{theirs}.ff.net.2"
    return {f"{o}.{p}": f"{t}.{p}" for o, t in table.items() for p in ("weight", "bias")}


def _fused(config: PixArtConfig) -> dict[str, list[str]]:
    """Our fused projection -> the diffusers tensors it stacks along the output dimension, in order."""
    fused = {}
    for i in range(config.depth):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
        for p in ("weight", "bias"):
            fused[f"{ours}.attn.qkv.{p}"] = [f"{theirs}.attn1.to_{n}.{p}" for n in "qkv"]
            fused[f"{ours}.cross_attn.kv_linear.{p}"] = [f"{theirs}.attn2.to_{n}.{p}" for n in "kv"]
    return fused


def _tables(config: PixArtConfig):
    renames = _renames(config)
    renames["final_layer.scale_shift_table"] = "scale_shift_table"
    for i in range(config.depth):
        renames[f"blocks.{i}.scale_shift_table"] = f"transformer_blocks.{i}.scale_shift_table"
    return renames, _fused(config)


def diffusers_modules(config: PixArtConfig) -> dict[str, list[str]]:
    """Our linear module -> the diffusers PixArtTransformer2DModel module(s) its weight rows go to, in order (the
    fused qkv and kv projections have three and two). For LoRA adapters, which live on module names."""
    renames, fused = _tables(config)
    table = {o.removesuffix(".weight"): [t.removesuffix(".weight")] for o, t in renames.items() if o.endswith(".weight")}
    table.update({o.removesuffix(".weight"): [t.removesuffix(".weight") for t in parts]
                  for o, parts in fused.items() if o.endswith(".weight")})
    return table


def _check_keys(state_dict: Mapping, expected: set[str], source: str) -> None:
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise StateDictMismatchError(f"{source} does not match the PixArt config:\n"
                                     f"  missing keys: {missing[:12]}{' ...' if len(missing) > 12 else ''}\n"
                                     f"  unexpected keys: {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")


def state_dict_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: PixArtConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> PixArtTransformer2DModel's. The null caption embedding (y_embedder.y_embedding) has no
    diffusers counterpart (its pipeline encodes a negative prompt instead) and is left out."""
    renames, fused = _tables(config)
    _check_keys(state_dict, set(renames) | set(fused) | {"y_embedder.y_embedding"}, "PixArt state dict")
    out = {theirs: state_dict[ours] for ours, theirs in renames.items()}
    for ours, parts in fused.items():
        out.update(zip(parts, state_dict[ours].chunk(len(parts), dim=0)))
    return out


def state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor], config: PixArtConfig,
                              null_caption: torch.Tensor) -> dict[str, torch.Tensor]:
    """PixArtTransformer2DModel's state dict -> ours; `null_caption` [caption_length, caption_channels] becomes
    y_embedder.y_embedding, which diffusers does not store."""
    renames, fused = _tables(config)
    _check_keys(state_dict, set(renames.values()) | {k for parts in fused.values() for k in parts},
                "diffusers state dict")
    out = {ours: state_dict[theirs] for ours, theirs in renames.items()}
    for ours, parts in fused.items():
        out[ours] = torch.cat([state_dict[k] for k in parts], dim=0)
    out["y_embedder.y_embedding"] = null_caption
    return out


def to_diffusers(model: PixArt, sample_size: int | None = None):
    """A diffusers PixArtTransformer2DModel computing the same function as `model` (weights copied, same dtype);
    `sample_size` as in diffusers_config."""
    from diffusers import PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(**diffusers_config(model.config, sample_size))
    theirs = state_dict_to_diffusers(model.state_dict(), model.config)
    transformer.load_state_dict({k: v.detach().clone() for k, v in theirs.items()}, strict=True)
    dtype = next(model.parameters()).dtype
    return (transformer if dtype == torch.float32 else transformer.to(dtype)).eval()


def from_diffusers(transformer, caption_length: int = 120, null_caption: torch.Tensor | None = None) -> PixArt:
    """Our PixArt computing the same function as a diffusers PixArtTransformer2DModel. The null caption embedding
    is `null_caption` when given, else a fresh random one as at initialization (diffusers does not keep it).
    Returned in eval mode, like the transformer it comes from usually is."""
    config = config_from_diffusers(transformer, caption_length)
    model = PixArt(config)
    if null_caption is None:
        null_caption = model.y_embedder.y_embedding
    ours = state_dict_from_diffusers(transformer.state_dict(), config, null_caption)
    load_state_dict_strict(model, {k: v.detach().clone().float() for k, v in ours.items()}, "converted diffusers model")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# CLI: official .pth -> our weights folder
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    from training import cli

    parser = cli.parser("training.checkpoint", __doc__)
    parser.add_argument("--official", required=True, help="official checkpoint (.pth), e.g. PixArt-XL-2-512x512.pth")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the architecture it was trained as")
    parser.add_argument("--ema", action="store_true", help="take 'state_dict_ema' from a training checkpoint")
    parser.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    args = parser.parse_args(argv)
    try:
        model = load_official_checkpoint(args.official, args.preset, ema=args.ema)
    except (ValueError, FileNotFoundError) as err:  # StateDictMismatchError too: wrong keys, pos_embed, preset
        parser.error(str(err))
    model.save_pretrained(args.out)
    print(json.dumps({"out": args.out, "preset": args.preset, "parameters": model.num_parameters()}))


if __name__ == "__main__":
    main()
