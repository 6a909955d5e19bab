"""`init.weights` from released models: an official .pth and a diffusers PixArtTransformer2DModel (folder, pipeline
folder), checked side by side with diffusers; the null caption kept or set from the empty caption's encoding."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from training.init_sources import init_model, source_kind
from training.model import PRESETS, PixArt
from training.stages import TransitionError
from training.train_config import InitSection, PretrainedSection

pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers_tiny(micro: bool = False, interpolation_scale: float | None = None) -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=24, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=96, sample_size=8, patch_size=2,
                                     caption_channels=32, use_additional_conditions=micro,
                                     interpolation_scale=interpolation_scale)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def same_function(ours: PixArt, theirs: PixArtTransformer2DModel) -> float:
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 800])
    caption = torch.randn(2, 120, 32, generator=g)
    mask = torch.arange(120)[None] < torch.tensor([[9], [40]])
    with torch.no_grad():
        a = ours.eval()(x, t, caption, mask)
        b = theirs(x, encoder_hidden_states=caption, encoder_attention_mask=mask, timestep=t,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return ((a - b).norm() / b.norm()).item()


def empty_caption_features(t5_dir) -> torch.Tensor:
    """T5("") padded to 120 tokens, as PixArtAlphaPipeline encodes its default negative prompt, computed with
    transformers directly."""
    from transformers import AutoTokenizer, T5EncoderModel

    tokens = AutoTokenizer.from_pretrained(t5_dir)([""], max_length=120, padding="max_length", truncation=True,
                                                   add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        return T5EncoderModel.from_pretrained(t5_dir)(input_ids=tokens.input_ids,
                                                       attention_mask=tokens.attention_mask).last_hidden_state[0]


@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_a_diffusers_model_initializes_the_same_function_with_the_empty_caption_as_null(tmp_path, tiny_t5_dir, layout):
    theirs = diffusers_tiny()
    folder = tmp_path / "released"
    if layout == "pipeline":  # a pipeline folder: the transformer is in its subfolder
        theirs.save_pretrained(folder / "transformer")
        (folder / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    else:
        theirs.save_pretrained(folder)
    assert source_kind(str(folder)) == "diffusers"
    model = PixArt(PRESETS["tiny"])
    report = init_model(model, InitSection(weights=str(folder)), PretrainedSection(text_encoder=str(tiny_t5_dir)))
    assert same_function(model, theirs) <= 1e-5
    torch.testing.assert_close(model.y_embedder.y_embedding, empty_caption_features(tiny_t5_dir))
    assert any("empty caption" in note for note in report.notes) and not report.new


def test_an_official_checkpoint_keeps_its_null_caption(tmp_path, tiny_t5_dir):
    torch.manual_seed(3)
    source = PixArt(PRESETS["tiny-MS"])
    state = dict(source.state_dict())
    path = tmp_path / "PixArt-tiny.pth"
    torch.save({"state_dict": state}, path)
    model = PixArt(PRESETS["tiny-MS"])
    report = init_model(model, InitSection(weights=str(path)), PretrainedSection(text_encoder=str(tiny_t5_dir)))
    assert source_kind(str(path)) == "official"
    torch.testing.assert_close(model.y_embedder.y_embedding, source.y_embedder.y_embedding)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    assert any("kept from" in note for note in report.notes)


def test_a_non_ms_release_into_an_ms_model_starts_its_embedders_at_zero(tmp_path, tiny_t5_dir):
    theirs = diffusers_tiny(micro=False)
    theirs.save_pretrained(tmp_path / "released")
    model = PixArt(PRESETS["tiny-MS"])
    report = init_model(model, InitSection(weights=str(tmp_path / "released")),
                        PretrainedSection(text_encoder=str(tiny_t5_dir)))
    assert {k.split(".")[0] for k in report.new} == {"csize_embedder", "ar_embedder"}
    assert model.ar_embedder.mlp[2].weight.abs().max() == 0


def test_mismatched_configs_are_refused_naming_the_setting(tmp_path, tiny_t5_dir):
    pre = PretrainedSection(text_encoder=str(tiny_t5_dir))
    diffusers_tiny(interpolation_scale=2).save_pretrained(tmp_path / "pe2")
    with pytest.raises(TransitionError, match="pe_interpolation"):
        init_model(PixArt(PRESETS["tiny"]), InitSection(weights=str(tmp_path / "pe2")), pre)
    # ... and accepted by the config trained that way
    init_model(PixArt(dataclasses.replace(PRESETS["tiny"], pe_interpolation=2.0)),
               InitSection(weights=str(tmp_path / "pe2")), pre)
    diffusers_tiny().save_pretrained(tmp_path / "d")
    with pytest.raises(TransitionError, match="depth"):
        init_model(PixArt(dataclasses.replace(PRESETS["tiny"], depth=3)), InitSection(weights=str(tmp_path / "d")), pre)
    with pytest.raises(TransitionError, match="not found"):
        source_kind(str(tmp_path / "missing.pth"))
    assert source_kind("PixArt-alpha/PixArt-XL-2-512x512") == "diffusers" and source_kind(str(tmp_path / "x")) == "weights"
    with pytest.raises(TransitionError, match="use_ema"):
        init_model(PixArt(PRESETS["tiny"]), InitSection(weights=str(tmp_path / "d"), use_ema=True), pre)


def test_the_shipped_finetune_config_validates():
    from pathlib import Path

    from training.train_config import load_train_config

    config = load_train_config(Path(__file__).resolve().parents[1] / "configs/train/finetune_512.yaml")
    assert config.lora.enabled and source_kind(config.init.weights) == "diffusers"
