"""Where a run's initial weights come from: `init.weights` in the training config.

    init: {weights: outputs/train/stage2/final}                        # a weights folder of a previous stage
    init: {weights: PixArt-XL-2-512x512.pth}                           # an official PixArt-alpha checkpoint
    init: {weights: PixArt-alpha/PixArt-XL-2-512x512}                  # a diffusers model: hub id or folder

A weights folder goes through training.stages (class -> text, or continue). A released model is converted to our
parameter names (training.checkpoint) and continues into this run's model, which must have its shape: the config's
`model.preset` names the architecture (e.g. PixArt-XL/2-512-MS for the released 512-px model). Two checks keep a
mismatched config from silently giving a wrong model: the position embedding the source was trained with must be
the one this config computes (an official .pth stores it; a diffusers model's sample_size and interpolation_scale
define it), and every tensor of this model must come from the source, but micro-condition embedders the source
lacks (they start at zero output, so the first step is the source's function).

The null caption embedding (what classifier-free guidance guides against) is kept where the source has one (our
weights folders, official checkpoints). A diffusers model has none (its pipeline encodes a negative prompt
instead), so it is set to the text encoder's (`pretrained.text_encoder`) encoding of the empty caption padded to
caption_length tokens: what PixArtAlphaPipeline feeds as the unconditional input by default. The init report says
which.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from training.checkpoint import (check_pos_embed, config_from_diffusers, official_to_pixart, read_official_state_dict,
                                 state_dict_from_diffusers)
from training.model import CONFIG_NAME, PixArt, PixArtConfig, StateDictMismatchError, sincos_pos_embed_2d
from training.stages import TransitionError, TransitionReport, choose_transition, continue_from, init_from_previous

KINDS = ("weights", "official", "diffusers")
MICRO_CONDITION_PREFIXES = ("csize_embedder.", "ar_embedder.")
NULL_CAPTION = "y_embedder.y_embedding"


def source_kind(name: str) -> str:
    """'weights' (a folder written by our trainer, or a local path that does not exist), 'official' (a .pth
    file) or 'diffusers' (a folder with a diffusers config or model_index.json, or an owner/name hub id)."""
    path = Path(name)
    if path.is_file():
        return "official"
    if path.is_dir():
        config = path / CONFIG_NAME
        if (path / "model_index.json").is_file() or (config.is_file() and "_class_name" in json.loads(config.read_text())):
            return "diffusers"
        if config.is_file():
            return "weights"
        raise TransitionError(f"init.weights: {path} has neither a config.json (a weights folder or a diffusers "
                              f"model) nor a model_index.json (a diffusers pipeline)")
    if path.suffix in (".pth", ".pt", ".bin"):
        raise TransitionError(f"init.weights: official checkpoint {path} not found")
    if len(name.split("/")) == 2 and not name.startswith((".", "/", "~")):
        return "diffusers"  # a hub id
    return "weights"  # a missing local folder: the weights-folder checks say what is wrong


def init_model(model: PixArt, init, pretrained) -> TransitionReport:
    """Initialize `model` in place from `init.weights` (an InitSection; `pretrained` the PretrainedSection whose
    text encoder gives a diffusers model its null caption) and say what was carried over."""
    try:
        return _init_model(model, init, pretrained)
    except StateDictMismatchError as err:  # keys or position embedding of the source do not fit this config
        raise TransitionError(f"init.weights: {err}") from None


def _init_model(model: PixArt, init, pretrained) -> TransitionReport:
    kind = source_kind(init.weights)
    if kind == "weights":
        report = init_from_previous(model, init.weights, init.transition, init.use_ema, init.t_star)
        report.notes.append(f"null caption embedding: kept from {init.weights}")
        return report
    if kind == "official":
        state = read_official_state_dict(init.weights, ema=init.use_ema)
        source = f"{init.weights} (official{', EMA' if init.use_ema else ''})"
        ours = official_to_pixart(state, model.config, source=f"init.weights {init.weights}")
        if not model.config.text_conditioned or NULL_CAPTION not in ours:
            raise TransitionError(f"init.weights: {init.weights} is not a text-to-image PixArt-alpha checkpoint "
                                  f"(no {NULL_CAPTION}); class-conditional checkpoints start stage 2 from a "
                                  f"weights folder")
        null_note = f"null caption embedding: kept from {init.weights}"
    else:
        ours, source, null_note = _from_diffusers(model.config, init, pretrained)
    _check_transition(model.config, init.transition)
    report = continue_from(ours, model, source_name=source)
    report.transition = f"continue from {kind} weights"
    missing = [k for k in report.new if not k.startswith(MICRO_CONDITION_PREFIXES)]
    if missing:
        raise TransitionError(f"init.weights: {init.weights} lacks tensors this model needs: {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}; set model.preset to the released model's "
                              f"architecture")
    report.notes.append(null_note)
    return report


def _check_transition(config: PixArtConfig, requested: str) -> None:
    if requested not in ("auto", "continue"):
        raise TransitionError(f"init.transition: {requested!r} does not apply to released text-to-image weights; "
                              f"use auto or continue")


def _from_diffusers(config: PixArtConfig, init, pretrained) -> tuple[dict[str, torch.Tensor], str, str]:
    """(our state dict, source name, null-caption note) of a diffusers PixArtTransformer2DModel."""
    from diffusers import PixArtTransformer2DModel

    from common.pretrained import _load  # the one loader that turns a missing model into a MissingModelError

    name = init.weights
    subfolder = init.subfolder
    if subfolder is None and (not Path(name).is_dir() or (Path(name) / "model_index.json").is_file()):
        subfolder = "transformer"  # a pipeline folder or repo (the released PixArt-alpha models are pipelines)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    transformer = _load(PixArtTransformer2DModel.from_pretrained, name, "PixArtTransformer2DModel",
                        "init.weights (and init.subfolder)", **kwargs)
    if init.use_ema:
        raise TransitionError("init.use_ema: a diffusers model has one set of weights; set init.use_ema=false")
    source_config = config_from_diffusers(transformer, config.caption_length)
    choose_transition(source_config, config, "continue")  # same shape, else names the differing fields
    # The source's position embedding on its own training grid must be the one this config computes there.
    grid = source_config.base_size
    check_pos_embed(sincos_pos_embed_2d(config.hidden_size, (grid, grid), grid, source_config.pe_interpolation),
                    config, source=f"init.weights {name}")
    null, encoder = empty_caption_embedding(pretrained.text_encoder, config.caption_length, config.caption_channels)
    state = state_dict_from_diffusers(transformer.state_dict(), source_config, null)
    state = {k: v.detach().float() for k, v in state.items()}
    note = (f"null caption embedding: {name} has none (diffusers keeps no null caption); set from {encoder}'s "
            f"encoding of the empty caption, padded to {config.caption_length} tokens, what PixArtAlphaPipeline "
            f"feeds as the unconditional input")
    return state, f"{name}{'/' + subfolder if subfolder else ''} (diffusers)", note


@torch.no_grad()
def empty_caption_embedding(text_encoder: str, caption_length: int, caption_channels: int) -> tuple[torch.Tensor, str]:
    """([caption_length, caption_channels] float32, the encoder's name): T5 features of "" padded to
    caption_length, as diffusers' pipeline encodes its default negative prompt."""
    from common.pretrained import load_text_encoder

    encoder = load_text_encoder(text_encoder, setting="pretrained.text_encoder", max_length=caption_length)
    if encoder.width != caption_channels:
        raise TransitionError(f"pretrained.text_encoder: {text_encoder} gives {encoder.width}-wide features, the "
                              f"model's caption_channels is {caption_channels}")
    features, _ = encoder.encode([""], device="cpu")
    return features[0].float().clone(), text_encoder
