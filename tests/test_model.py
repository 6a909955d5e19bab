"""The PixArt-alpha DiT: sizes, official structure, conditioning semantics, save/load and input validation.

Numerical equivalence with diffusers' PixArtTransformer2DModel (the reference implementation) is in
tests/test_checkpoint.py.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY_T5_WIDTH
from training.model import PRESETS, PixArt, PixArtConfig, StateDictMismatchError, forward_flops, sincos_pos_embed_2d

TINY = PRESETS["tiny"]


def randomize(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Fresh models zero the final layer and cross-attention outputs; a test of what they compute needs all weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def inputs(cfg: PixArtConfig = TINY, batch: int = 2, hw=(8, 12), seed: int = 0, L: int = 24) -> dict:
    """Captions shorter than caption_length (120) are fine; the null caption is cut to their length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L // 2, L * 5 // 6, L // 3, L][:batch] + [L] * max(0, batch - 4))
    mask = torch.arange(L)[None] < lengths[:, None]  # right-padded, as T5 features are
    return dict(x=torch.randn(batch, cfg.in_channels, *hw, generator=g),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                caption=torch.randn(batch, L, cfg.caption_channels, generator=g), caption_mask=mask)


# --- size and structure -------------------------------------------------------------------------------------------


def test_xl2_parameter_counts_match_the_paper_model():
    with torch.device("meta"):
        assert PixArt(PRESETS["PixArt-XL/2"]).num_parameters() == 610_856_096
        assert PixArt(PRESETS["PixArt-XL/2-MS"]).num_parameters() == 611_349_152


def test_state_dict_keys_are_the_official_ones():
    """Key for key the official PixArtMS checkpoint layout (pos_embed aside, which we recompute)."""
    with torch.device("meta"):
        model = PixArt(PRESETS["PixArt-XL/2-MS"])
    wb = ("weight", "bias")
    official = {f"x_embedder.proj.{p}" for p in wb} | {"y_embedder.y_embedding"}
    official |= {f"{m}.{p}" for m in ("t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1", "y_embedder.y_proj.fc1",
                                      "y_embedder.y_proj.fc2", "csize_embedder.mlp.0", "csize_embedder.mlp.2",
                                      "ar_embedder.mlp.0", "ar_embedder.mlp.2", "final_layer.linear") for p in wb}
    official.add("final_layer.scale_shift_table")
    for i in range(28):
        official.add(f"blocks.{i}.scale_shift_table")
        official |= {f"blocks.{i}.{m}.{p}" for m in ("attn.qkv", "attn.proj", "cross_attn.q_linear",
                                                     "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1", "mlp.fc2")
                     for p in wb}
    assert set(model.state_dict()) == official
    assert model.t_block[1].out_features == 6 * 1152 and model.blocks[0].scale_shift_table.shape == (6, 1152)
    assert model.final_layer.scale_shift_table.shape == (2, 1152) and model.final_layer.linear.out_features == 2 * 2 * 8
    # The null caption is a fixed buffer, as in the official model (not a trained parameter).
    assert "y_embedder.y_embedding" not in dict(model.named_parameters())
    assert model.y_embedder.y_embedding.shape == (120, 4096)


def test_layer_norms_have_no_affine_and_eps_1e6():
    model = PixArt(TINY)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * TINY.depth + 1
    assert all(n.weight is None and n.bias is None and n.eps == 1e-6 for n in norms)
    assert model.blocks[0].mlp.act.approximate == "tanh"


def test_pos_embed_matches_the_official_formula():
    """Reference: the official numpy construction (meshgrid with w first, grid stretched to base_size / scale)."""

    def official(dim, gh, gw, base, scale):
        grid_h = np.arange(gh, dtype=np.float32) / (gh / base) / scale
        grid_w = np.arange(gw, dtype=np.float32) / (gw / base) / scale
        grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, gh, gw)

        def one_d(d, pos):
            omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
            out = np.einsum("m,d->md", pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)

        return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)

    for (gh, gw), base, scale in (((16, 16), 16, 1.0), ((12, 20), 16, 1.0), ((64, 64), 64, 2.0), ((48, 80), 64, 2.0)):
        ours = sincos_pos_embed_2d(96, (gh, gw), base, scale).numpy()
        np.testing.assert_allclose(ours, official(96, gh, gw, base, scale), atol=2e-6)


def test_fresh_model_is_the_official_init():
    model = PixArt(TINY).eval()
    # zero final linear -> a fresh model predicts exactly zero
    assert torch.count_nonzero(model(**inputs())) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.cross_attn.proj.weight) == 0 and torch.count_nonzero(block.cross_attn.proj.bias) == 0
        std = block.attn.qkv.weight.std().item()
        xavier_std = (2.0 / (96 + 3 * 96)) ** 0.5
        assert abs(std - xavier_std) / xavier_std < 0.1
    assert abs(model.t_block[1].weight.std().item() - 0.02) < 0.003


# --- conditioning semantics ---------------------------------------------------------------------------------------


def test_t_block_runs_once_per_forward_and_is_shared_by_all_blocks():
    model = randomize(PixArt(TINY)).eval()
    calls = []
    model.t_block.register_forward_hook(lambda *a: calls.append(1))
    model(**inputs())
    assert len(calls) == 1


def test_padded_caption_tokens_are_ignored():
    model = randomize(PixArt(TINY)).eval()
    kw = inputs()
    out = model(**kw)
    changed = kw["caption"].clone()
    changed[0, 12:] += 5.0  # padding only (masked in row 0; positions 20.. are padding in every row)
    changed[1, 20:] += 5.0
    torch.testing.assert_close(model(**{**kw, "caption": changed}), out, rtol=0, atol=1e-5)
    # more padding, or less, is the same caption
    longer = dict(kw, caption=torch.cat([kw["caption"], torch.randn(2, 50, 32)], 1),
                  caption_mask=torch.cat([kw["caption_mask"], torch.zeros(2, 50, dtype=torch.bool)], 1))
    torch.testing.assert_close(model(**longer), out, rtol=0, atol=1e-5)
    shorter = dict(kw, caption=kw["caption"][:, :20], caption_mask=kw["caption_mask"][:, :20])
    torch.testing.assert_close(model(**shorter), out, rtol=0, atol=1e-5)
    changed[0, 0] += 5.0  # a real token
    assert (model(**{**kw, "caption": changed})[0] - out[0]).abs().max() > 1e-3
    # a caption with no valid token at all stays finite (it attends to every token, like diffusers' -10000 bias)
    kw["caption_mask"][0] = False
    assert torch.isfinite(model(**kw)).all()


def test_force_drop_swaps_in_the_null_caption():
    model = randomize(PixArt(TINY)).eval()
    kw = inputs()
    drop = torch.tensor([True, False])
    out = model(**kw, force_drop_ids=drop)
    null = kw["caption"].clone()
    null[0] = model.y_embedder.y_embedding[:24]
    torch.testing.assert_close(out, model(**{**kw, "caption": null}))
    torch.testing.assert_close(out[1], model(**kw)[1])


def test_train_mode_drops_captions_at_the_configured_rate():
    cfg = dataclasses.replace(TINY, caption_dropout=0.3)
    model = randomize(PixArt(cfg))
    n = 200
    kw = inputs(cfg, batch=1, hw=(2, 2), L=4)
    kw = {k: v.expand(n, *v.shape[1:]) for k, v in kw.items()}
    with torch.no_grad():
        null_out = model.eval()(**kw, force_drop_ids=torch.ones(n, dtype=torch.bool))[0]
        torch.manual_seed(0)
        out = model.train()(**kw)
    dropped = ((out - null_out).flatten(1).abs().max(1).values < 1e-5).float().mean().item()
    assert 0.18 < dropped < 0.42  # 0.3 +- 3.7 sigma
    with torch.no_grad():  # eval mode never drops
        torch.testing.assert_close(model.eval()(**kw), model(**kw))


def test_class_conditional_variant():
    cfg = PRESETS["tiny-class"]
    model = randomize(PixArt(cfg)).eval()
    assert all(b.cross_attn is None for b in model.blocks) and cfg.num_classes == 10
    assert model.y_embedder.embedding_table.num_embeddings == 11  # + the null class
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    labels = torch.tensor([1, 2, 3])
    out = model(x, t, class_labels=labels)
    # the label embedding is added to the timestep embedding before t_block (DiT-style)
    seen = {}
    model.t_block.register_forward_pre_hook(lambda m, args: seen.setdefault("t", args[0]))
    model(x, t, class_labels=labels)
    expected = model.t_embedder(t) + model.y_embedder.embedding_table(labels)
    torch.testing.assert_close(seen["t"], expected)
    dropped = model(x, t, class_labels=labels, force_drop_ids=torch.tensor([True, False, False]))
    torch.testing.assert_close(dropped, model(x, t, class_labels=torch.tensor([10, 2, 3])))
    assert not torch.allclose(dropped[0], out[0])


def test_micro_conditions_change_the_output_and_broadcast():
    cfg = PRESETS["tiny-MS"]
    model = randomize(PixArt(cfg)).eval()
    kw = inputs(cfg)
    res, ar = torch.tensor([[256.0, 384.0]]), torch.tensor([[1.5]])
    one = model(**kw, resolution=res, aspect_ratio=ar)
    torch.testing.assert_close(one, model(**kw, resolution=res.expand(2, 2), aspect_ratio=ar.expand(2, 1)))
    assert (model(**kw, resolution=res * 2, aspect_ratio=ar) - one).abs().max() > 1e-3


def test_learned_sigma_doubles_the_output_channels():
    assert PixArt(TINY).eval()(**inputs()).shape == (2, 8, 8, 12)
    plain = dataclasses.replace(TINY, learn_sigma=False)
    assert PixArt(plain).eval()(**inputs(plain)).shape == (2, 4, 8, 12)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = dataclasses.replace(TINY, caption_dropout=0.0)
    grads = []
    for checkpointing in (False, True):
        model = randomize(PixArt(dataclasses.replace(cfg, gradient_checkpointing=checkpointing))).train()
        model(**inputs(cfg)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_forward_flops_match_a_flop_counter():
    """Independent truth: torch's FlopCounterMode on the real forward (math SDPA so attention is counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for name in ("tiny", "tiny-MS", "tiny-class"):
        cfg = PRESETS[name]
        model = PixArt(cfg).eval()
        x, t = torch.randn(1, 4, 8, 12), torch.tensor([5])
        if name == "tiny-class":
            kw = dict(class_labels=torch.tensor([3]))
        else:
            kw = dict(caption=torch.randn(1, 7, TINY_T5_WIDTH), caption_mask=torch.ones(1, 7, dtype=torch.bool))
            if name == "tiny-MS":
                kw.update(resolution=torch.tensor([[64.0, 96.0]]), aspect_ratio=torch.tensor([[1.5]]))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, **kw)
        assert forward_flops(cfg, (8, 12), caption_tokens=7) == counter.get_total_flops(), name


# --- weights on disk ----------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    model = randomize(PixArt(PRESETS["tiny-MS"])).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = PixArt.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    kw = dict(inputs(model.config), resolution=torch.tensor([[64.0, 96.0]]), aspect_ratio=torch.tensor([[1.5]]))
    torch.testing.assert_close(loaded(**kw), model(**kw), rtol=0, atol=0)


def test_load_names_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    PixArt(TINY).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("blocks.1.mlp.fc2.bias")
    tensors["blocks.1.extra.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(StateDictMismatchError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias") as err:
        PixArt.from_pretrained(tmp_path)
    assert "unexpected keys: blocks.1.extra.weight" in str(err.value)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hiden_size": 3}))
    with pytest.raises(ValueError, match="hiden_size"):
        PixArt.from_pretrained(tmp_path)


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(2, 3, 8, 12)), r"expected latents \[B, 4, h, w\]"),
    (dict(x=torch.randn(2, 4, 8, 11)), "not divisible by patch_size=2"),
    (dict(caption=torch.randn(2, 24, 64)), r"caption_channels=32"),
    (dict(caption=None), "caption: required"),
    (dict(caption_mask=torch.ones(2, 5, dtype=torch.bool)), "caption_mask: expected"),
    (dict(timestep=torch.tensor([1, 2, 3])), "timestep: expected"),
    (dict(class_labels=torch.tensor([1, 2])), "text-conditioned"),
    (dict(resolution=torch.ones(2, 2)), "micro_conditions"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    model = PixArt(TINY).eval()
    with pytest.raises(ValueError, match=message):
        model(**{**inputs(), **change})


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="hidden_size.*num_heads"):
        PixArtConfig(hidden_size=100, num_heads=16)
    with pytest.raises(ValueError, match="exactly one of caption_channels"):
        PixArtConfig(num_classes=10)
    with pytest.raises(ValueError, match="divisible by 3"):
        PixArtConfig(hidden_size=64, num_heads=4, micro_conditions=True)
    assert dataclasses.replace(TINY, caption_channels=TINY_T5_WIDTH).caption_channels == 32
    model = PixArt(PRESETS["tiny-class"])
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]))
