"""Stage transitions: the adaLN-single re-parameterization (stage 1 -> 2) and sub-stage continuation (stage 3)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from training.model import PRESETS, PixArt
from training.stages import TransitionError, init_from_previous

T_STAR = 500


def perturbed(config, seed=0) -> PixArt:
    """A model whose every parameter is off its (partly zero) initialization, as after training."""
    torch.manual_seed(seed)
    model = PixArt(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def block_modulation(model: PixArt, t: int, class_label: int | None = None) -> list[torch.Tensor]:
    """Every block's [6, hidden] (shift, scale, gate) x 2 and the final layer's [2, hidden], computed by hand."""
    with torch.no_grad():
        c = model.t_embedder(torch.tensor([t]))
        if class_label is not None:
            c = c + model.y_embedder.embedding_table.weight[class_label]
        t0 = model.t_block(c).view(6, -1)
        return [b.scale_shift_table + t0 for b in model.blocks] + [model.final_layer.scale_shift_table + c]


@pytest.fixture()
def stage1(tmp_path):
    model = perturbed(PRESETS["tiny-class"])
    model.save_pretrained(tmp_path / "stage1")
    return model, tmp_path / "stage1"


def test_class_to_text_matches_the_null_class_modulation_at_t_star(stage1):
    source, folder = stage1
    target = PixArt(PRESETS["tiny"]).eval()
    init_from_previous(target, folder, "class_to_text", t_star=T_STAR)
    null = source.config.num_classes
    for got, want in zip(block_modulation(target, T_STAR), block_modulation(source, T_STAR, null)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Away from t* the blocks differ (t_block is not linear); the final layer matches at every t.
    away = list(zip(block_modulation(target, 100), block_modulation(source, 100, null)))
    assert (away[0][0] - away[0][1]).abs().max() > 1e-4
    torch.testing.assert_close(away[-1][0], away[-1][1], rtol=0, atol=1e-6)

    # Cross-attention starts with a zero output projection, so the whole network agrees at t*, for any caption.
    torch.manual_seed(1)
    x = torch.randn(3, 4, 8, 8)
    caption, mask = torch.randn(3, 16, 32), torch.rand(3, 16) > 0.3
    with torch.no_grad():
        want = source(x, torch.full((3,), T_STAR), class_labels=torch.full((3,), null))
        got = target(x, torch.full((3,), T_STAR), caption=caption, caption_mask=mask)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
        assert want.abs().mean() > 1e-2  # a non-trivial output
        # ... and not for a real class: that information is what stage 2 replaces by text.
        assert (source(x, torch.full((3,), T_STAR), class_labels=torch.zeros(3, dtype=torch.long)) - got).abs().max() > 1e-3


def test_class_to_text_report_counts(stage1):
    _, folder = stage1
    target = PixArt(PRESETS["tiny"])
    report = init_from_previous(target, folder)  # auto picks class_to_text
    depth = target.config.depth
    assert report.transition == "class_to_text"
    assert report.dropped == ["y_embedder.embedding_table.weight"]
    assert sorted(report.reparameterized) == sorted([f"blocks.{i}.scale_shift_table" for i in range(depth)]
                                                    + ["final_layer.scale_shift_table"])
    cross = [k for k in report.new if ".cross_attn." in k]
    assert len(cross) == depth * 6  # q_linear, kv_linear, proj: weight + bias each
    assert sorted(set(report.new) - set(cross)) == ["y_embedder.y_embedding", "y_embedder.y_proj.fc1.bias",
                                                    "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.bias",
                                                    "y_embedder.y_proj.fc2.weight"]
    everything = report.carried + report.reparameterized + report.new
    assert sorted(everything) == sorted(target.state_dict())
    assert "t_block.1.weight" in report.carried and "blocks.0.attn.qkv.weight" in report.carried
    assert "blocks.*.cross_attn.q_linear.weight (x2)" in report.summary()


def test_continue_into_a_multi_aspect_model_keeps_the_function(tmp_path):
    source = perturbed(PRESETS["tiny"], seed=3)
    source.save_pretrained(tmp_path / "prev")
    target = PixArt(dataclasses.replace(PRESETS["tiny-MS"], input_size=16)).eval()  # 2x the pixels
    report = init_from_previous(target, tmp_path / "prev")
    assert report.transition == "continue" and not report.dropped and not report.reparameterized
    assert sorted(report.new) == sorted(f"{e}.mlp.{i}.{p}" for e in ("csize_embedder", "ar_embedder")
                                        for i in (0, 2) for p in ("weight", "bias"))
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([10, 900])
    caption = torch.randn(2, 16, 32)
    with torch.no_grad():
        want = source(x, t, caption=caption)
        got = target(x, t, caption=caption, resolution=torch.tensor([[512.0, 768.0]] * 2),
                     aspect_ratio=torch.tensor([[2 / 3]] * 2))
    # Same weights and the new micro-condition embedders add zero; only the pos-embed base grid differs
    # (input_size 16 vs 8), so compare a model that keeps the base grid too.
    same_grid = PixArt(PRESETS["tiny-MS"]).eval()
    init_from_previous(same_grid, tmp_path / "prev")
    with torch.no_grad():
        got_same = same_grid(x, t, caption=caption, resolution=torch.tensor([[512.0, 768.0]] * 2),
                             aspect_ratio=torch.tensor([[2 / 3]] * 2))
    torch.testing.assert_close(got_same, want, rtol=0, atol=1e-6)
    assert (got - want).abs().max() > 1e-4  # the position embedding of a new base size does change the output


def test_impossible_transitions_say_why(tmp_path, stage1):
    _, folder = stage1
    text = perturbed(PRESETS["tiny"])
    text.save_pretrained(tmp_path / "text")
    with pytest.raises(TransitionError, match="cannot initialize a class-conditional"):
        init_from_previous(PixArt(PRESETS["tiny-class"]), tmp_path / "text")
    with pytest.raises(TransitionError, match="'continue' does not apply"):
        init_from_previous(PixArt(PRESETS["tiny"]), folder, "continue")
    with pytest.raises(TransitionError, match="hidden_size: 96 -> 48"):
        init_from_previous(PixArt(dataclasses.replace(PRESETS["tiny"], hidden_size=48)), tmp_path / "text")
    with pytest.raises(TransitionError, match="no ema.safetensors"):
        init_from_previous(PixArt(PRESETS["tiny"]), tmp_path / "text", use_ema=True)
