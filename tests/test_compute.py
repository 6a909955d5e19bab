"""Compute per step (training.compute): fused AdamW where the device has it, torch.compile through the trainer
without changing what is saved, and (on a GPU only) attention reaching the fused SDPA kernels."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_trainer import base_config, data_root, write_yaml  # noqa: F401 (data_root is a fixture)
from training.compute import adamw, fused_adamw_available, sdpa_backend_check
from training.model import PRESETS, PixArt
from training.train_config import OptimizerSection, load_train_config


def test_fused_adamw_where_the_device_has_it_and_same_update_as_foreach():
    cpu = torch.device("cpu")
    model = torch.nn.Linear(4, 3)
    auto = adamw(model.parameters(), 1e-3, OptimizerSection(), cpu)
    assert auto.defaults["fused"] == fused_adamw_available(cpu)
    off = adamw(model.parameters(), 1e-3, OptimizerSection(fused=False), cpu)
    assert not off.defaults["fused"]
    # The fused kernel computes the same update (to rounding) as the per-tensor one.
    if fused_adamw_available(cpu):
        results = []
        for fused in (True, False):
            torch.manual_seed(0)
            layer = torch.nn.Linear(4, 3)
            opt = adamw(layer.parameters(), 1e-2, OptimizerSection(fused=fused, weight_decay=0.03), cpu)
            for _ in range(3):
                layer(torch.ones(2, 4)).square().sum().backward()
                opt.step()
                opt.zero_grad()
            results.append(layer.weight.detach().clone())
        torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_the_same_names(data_root, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from training.trainer import train

    finals = {}
    for compiled in (False, True):
        out = tmp_path / f"run_{compiled}"
        cfg = write_yaml(tmp_path / f"c_{compiled}.yaml", base_config(
            # aot_eager: dynamo capture and AOT autograd, without inductor's C++ code generation (minutes on 2
            # busy cores); benchmarks/bench_compile.py measures inductor.
            data_root, out, run={"steps": 3, "checkpoint_every": 3, "compile": compiled,
                                 "compile_backend": "aot_eager"},
            diffusion={"objective": "rectified_flow"}))
        result = train(load_train_config(cfg))
        finals[compiled] = (result.losses, load_file(str(out / "final" / "model.safetensors")))
    (eager_losses, eager), (compiled_losses, compiled) = finals[False], finals[True]
    assert eager.keys() == compiled.keys()  # compiled in place: no "_orig_mod." prefixes in what is saved
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused SDPA kernels are GPU kernels")
def test_attention_reaches_the_fused_sdpa_kernels_on_gpu():
    """With only the flash and memory-efficient backends allowed, the model's self- and cross-attention calls
    (bf16, head dim 72 as PixArt-XL's, padded captions) still run: no call needs the unfused math path."""
    config = dataclasses.replace(PRESETS["tiny"], hidden_size=288, num_heads=4, caption_channels=32)
    model = PixArt(config).cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.bfloat16)
    caption = torch.randn(2, 20, 32, device="cuda", dtype=torch.bfloat16)
    mask = torch.arange(20, device="cuda")[None] < torch.tensor([[7], [20]], device="cuda")
    assert sdpa_backend_check(model, x, torch.tensor([10, 500], device="cuda"), caption=caption,
                              caption_mask=mask) == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"]


def test_the_sdpa_check_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="GPU"):
        sdpa_backend_check(PixArt(PRESETS["tiny"]), torch.zeros(1, 4, 8, 8), torch.zeros(1))
