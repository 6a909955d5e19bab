"""Checkpoint interop against the reference implementation: diffusers' PixArtTransformer2DModel, run side by side."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from training.checkpoint import (
    config_from_diffusers,
    diffusers_config,
    from_diffusers,
    load_official_checkpoint,
    main as checkpoint_cli,
    read_official_state_dict,
    to_diffusers,
)
from training.model import PRESETS, PixArt, StateDictMismatchError, sincos_pos_embed_2d


def diffusers_model(micro: bool) -> PixArtTransformer2DModel:
    """A random-init diffusers PixArt with every parameter re-randomized (its init zeroes some layers, which would
    let a wrong mapping of those layers pass unnoticed)."""
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=24, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=96, sample_size=8, patch_size=2,
                                     caption_channels=32, use_additional_conditions=micro)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def batch(micro: bool):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 12, generator=g)  # non-square: exercises the pos-embed for another grid
    t = torch.tensor([0, 417, 999])
    caption = torch.randn(3, 20, 32, generator=g)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    for i, n in enumerate((15, 7, 1)):  # padded, more padded, a single valid token
        mask[i, :n] = True
    res = torch.tensor([[512.0, 768.0], [1024.0, 1024.0], [256.0, 640.0]]) if micro else None
    ar = torch.tensor([[1.5], [1.0], [2.5]]) if micro else None
    return x, t, caption, mask, res, ar


def run_both(ours: PixArt, theirs: PixArtTransformer2DModel, micro: bool):
    x, t, caption, mask, res, ar = batch(micro)
    with torch.no_grad():
        a = ours(x, t, caption, mask, resolution=res, aspect_ratio=ar)
        b = theirs(x, encoder_hidden_states=caption, timestep=t, encoder_attention_mask=mask,
                   added_cond_kwargs={"resolution": res, "aspect_ratio": ar}).sample
    return a, b


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("micro", [False, True], ids=["plain", "multi-scale"])
def test_diffusers_to_ours_and_back_compute_the_same_function(micro):
    theirs = diffusers_model(micro)
    ours = from_diffusers(theirs, caption_length=20)
    assert ours.config.micro_conditions is micro
    a, b = run_both(ours, theirs, micro)
    assert b.abs().mean() > 0.1  # a non-trivial output
    assert rel_err(a, b) <= 1e-5
    # and back: the same tensors, the same function
    again = to_diffusers(ours)
    assert again.config.use_additional_conditions is micro
    for key, value in theirs.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert rel_err(run_both(ours, again, micro)[1], b) == 0.0


def test_ours_to_diffusers_from_our_presets():
    torch.manual_seed(0)
    ours = PixArt(PRESETS["tiny-MS"]).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    theirs = to_diffusers(ours)
    a, b = run_both(ours, theirs, micro=True)
    assert rel_err(a, b) <= 1e-5
    assert config_from_diffusers(theirs, caption_length=ours.config.caption_length) == ours.config
    # the 1024-px preset maps to diffusers' own defaults for that model (sample 128, interpolation 2, micro-conditions)
    kwargs = diffusers_config(PRESETS["PixArt-XL/2-MS"])
    assert kwargs["sample_size"] == 128 and kwargs["interpolation_scale"] == 2 and kwargs["use_additional_conditions"]
    assert kwargs["num_attention_heads"] * kwargs["attention_head_dim"] == 1152 and kwargs["out_channels"] == 8


def test_class_conditional_model_has_no_diffusers_counterpart():
    with pytest.raises(ValueError, match="class-conditional"):
        to_diffusers(PixArt(PRESETS["tiny-class"]))


def official_state_dict_from_diffusers(theirs: PixArtTransformer2DModel, null_caption: torch.Tensor) -> dict:
    """The official key layout, written from diffusers' tensors with the public official->diffusers correspondence
    (diffusers' convert_pixart_alpha_to_diffusers.py), independently of training/checkpoint.py."""
    sd = theirs.state_dict()
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "y_embedder.y_embedding": null_caption,
        "final_layer.scale_shift_table": sd["scale_shift_table"],
        # pos_embed: a fixed buffer in official checkpoints, saved for the training size (ignored by our loader)
        "pos_embed": sincos_pos_embed_2d(96, (4, 4), 4, 1.0)[None],
    }
    pairs = {"t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
             "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
             "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
             "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
             "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
             "t_block.1": "adaln_single.linear", "y_embedder.y_proj.fc1": "caption_projection.linear_1",
             "y_embedder.y_proj.fc2": "caption_projection.linear_2", "final_layer.linear": "proj_out"}
    for i in range(2):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        out[f"{b}.scale_shift_table"] = sd[f"{d}.scale_shift_table"]
        pairs.update({f"{b}.attn.proj": f"{d}.attn1.to_out.0", f"{b}.cross_attn.q_linear": f"{d}.attn2.to_q",
                      f"{b}.cross_attn.proj": f"{d}.attn2.to_out.0", f"{b}.mlp.fc1": f"{d}.ff.net.0.proj",
                      f"{b}.mlp.fc2": f"{d}.ff.net.2"})
        for p in ("weight", "bias"):
            out[f"{b}.attn.qkv.{p}"] = torch.cat([sd[f"{d}.attn1.to_{n}.{p}"] for n in "qkv"])
            out[f"{b}.cross_attn.kv_linear.{p}"] = torch.cat([sd[f"{d}.attn2.to_{n}.{p}"] for n in "kv"])
    for ours, theirs_name in pairs.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd[f"{theirs_name}.{p}"]
    return out


def test_official_pth_loads_and_matches_diffusers(tmp_path, capsys):
    theirs = diffusers_model(micro=True)
    null = torch.randn(20, 32)
    official = official_state_dict_from_diffusers(theirs, null)
    path = tmp_path / "PixArt-tiny-MS.pth"
    torch.save({"state_dict": official, "step": torch.tensor(1000)}, path)  # the official wrapper
    cfg = dataclasses.replace(PRESETS["tiny-MS"], caption_length=20)
    ours = load_official_checkpoint(path, cfg)
    a, b = run_both(ours, theirs, micro=True)
    assert rel_err(a, b) <= 1e-5
    assert torch.equal(ours.y_embedder.y_embedding, null)
    # DDP's "module." prefix and a bare state dict are accepted too
    torch.save({f"module.{k}": v for k, v in official.items()}, path)
    assert set(read_official_state_dict(path)) == set(official)
    # the CLI writes a weights folder that from_pretrained loads
    torch.save({"state_dict": official}, path)
    out = tmp_path / "weights"
    with pytest.raises(SystemExit):  # preset: 120 tokens, not 20
        checkpoint_cli(["--official", str(path), "--preset", "tiny-MS", "--out", str(out)])
    assert "y_embedder.y_embedding: expected" in capsys.readouterr().err
    official["y_embedder.y_embedding"] = torch.randn(120, 32)
    torch.save({"state_dict": official}, path)
    checkpoint_cli(["--official", str(path), "--preset", "tiny-MS", "--out", str(out)])
    torch.testing.assert_close(run_both(PixArt.from_pretrained(out), theirs, micro=True)[0], a)


def test_official_checkpoint_with_wrong_keys_names_them(tmp_path):
    theirs = diffusers_model(micro=True)
    official = official_state_dict_from_diffusers(theirs, torch.randn(120, 32))
    official.pop("blocks.1.cross_attn.kv_linear.weight")
    official["blocks.1.attn.rel_pos_h"] = torch.zeros(3, 24)
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": official}, path)
    with pytest.raises(StateDictMismatchError) as err:
        load_official_checkpoint(path, "tiny-MS")
    assert "missing keys: blocks.1.cross_attn.kv_linear.weight" in str(err.value)
    assert "unexpected keys: blocks.1.attn.rel_pos_h" in str(err.value)
    # a plain (non-MS) config against an MS checkpoint: the size embedders are unexpected
    with pytest.raises(StateDictMismatchError, match="csize_embedder"):
        load_official_checkpoint(path, "tiny")


class Payload:  # not a tensor: weights_only loading must refuse to build it
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_that_needs_unpickling_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": Payload()}}, path)
    with pytest.raises(ValueError, match="not a loadable tensor checkpoint"):
        read_official_state_dict(path)
    with pytest.raises(FileNotFoundError):
        read_official_state_dict(tmp_path / "missing.pth")
