"""LoRA with peft: merged weights compute what the adapted model computes, and the saved adapter, loaded into a
diffusers PixArtAlphaPipeline (tiny random components saved and loaded), gives what our merged model gives."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import PixArtAlphaPipeline

from training.export import export
from training.lora import LoraSection, add_lora, main as lora_main, save_adapter, split_state
from training.model import PRESETS, PixArt

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = LoraSection(rank=4, alpha=8, targets=["self_attention", "cross_attention", "mlp"])


def adapted_model(seed: int = 0) -> PixArt:
    """A tiny PixArt with LoRA on every target and non-zero adapters (a fresh B is zero: no update to test)."""
    torch.manual_seed(seed)
    model = PixArt(PRESETS["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    add_lora(model, ALL)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.1)
    return model.eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(120)[None] < torch.tensor([[12], [70]])
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 700]), torch.randn(2, 120, 32, generator=g), mask


def test_only_adapters_train_and_merging_keeps_the_function():
    model = adapted_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    targeted = {n.split(".lora_")[0].split(".", 2)[2] for n in trainable}
    assert targeted == {"attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                        "mlp.fc1", "mlp.fc2"}
    merged_state, adapter = split_state(model.state_dict(), ALL)
    plain = PixArt(PRESETS["tiny"]).eval()
    plain.load_state_dict(merged_state, strict=True)
    with torch.no_grad():
        a, b = plain(*inputs()), model(*inputs())
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # fp32 rounding: W + s B A vs W x + s B (A x)
    assert len(adapter) == 2 * 7


def test_targets_are_validated():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoraSection(rank=4, targets=["attention"])
    assert LoraSection(rank=4, targets=["mlp.fc1"]).modules() == ["mlp.fc1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_vae_dir, tiny_t5_dir):
    """Base weights, merged weights and the adapter, as a LoRA run writes them."""
    root = tmp_path_factory.mktemp("lora")
    model = adapted_model()
    merged_state, adapter = split_state(model.state_dict(), ALL)
    base_state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    info = json.dumps({"vae": str(tiny_vae_dir), "text_encoder": str(tiny_t5_dir)})
    for name, state in (("base", base_state), ("merged", merged_state)):
        plain = PixArt(PRESETS["tiny"])
        plain.load_state_dict(state, strict=True)
        plain.save_pretrained(root / name)
        (root / name / "pipeline.json").write_text(info)
    save_adapter(root / "merged" / "lora", adapter, ALL, PRESETS["tiny"])
    return root


def latents(pipe: PixArtAlphaPipeline):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red bus", height=64, width=64, use_resolution_binning=False, clean_caption=False,
                num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_the_adapter_loads_into_diffusers_and_matches_our_merged_model(folders, tmp_path):
    from peft import PeftModel

    base_dir, _ = export(folders / "base", tmp_path / "base_pipe", log=lambda *_: None)
    merged_dir, _ = export(folders / "merged", tmp_path / "merged_pipe", log=lambda *_: None)
    with_adapter = PixArtAlphaPipeline.from_pretrained(base_dir)
    with_adapter.transformer = PeftModel.from_pretrained(with_adapter.transformer, folders / "merged" / "lora")
    ref = latents(PixArtAlphaPipeline.from_pretrained(merged_dir))
    got = latents(with_adapter)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert (latents(PixArtAlphaPipeline.from_pretrained(base_dir)) - ref).abs().max() > 1e-3  # it does something


def test_merge_on_request_gives_the_merged_weights(folders, tmp_path, capsys):
    lora_main(["--checkpoint", str(folders / "base"), "--adapter", str(folders / "merged" / "lora"),
               "--out", str(tmp_path / "out")])
    ours, ref = PixArt.from_pretrained(tmp_path / "out"), PixArt.from_pretrained(folders / "merged")
    with torch.no_grad():
        a, b = ours(*inputs()), ref(*inputs())
    assert ((a - b).norm() / b.norm()).item() < 1e-6
    assert (tmp_path / "out" / "pipeline.json").is_file()
