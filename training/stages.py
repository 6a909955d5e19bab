"""Stage transitions: a stage's output weights become the next stage's starting point, with a report of what
was carried over, re-parameterized, newly initialized and dropped.

Stage 1 -> 2 (`class_to_text`, the adaLN-single re-parameterization). The class-conditional model conditions every
block on t_block(c) + scale_shift_table_i with c = t_embedder(t) + y_embedder(class); the text model has no class
embedding and conditions on t_block(t_embedder(t)) + scale_shift_table_i. We copy t_embedder and t_block and set

    scale_shift_table_i' = scale_shift_table_i + t_block(t_emb(t*) + y_null) - t_block(t_emb(t*))

so that at t = t* (500, mid-range) every block's modulation equals what the stage-1 model gave for the null class.
The final layer is modulated by c itself (linearly), so final_layer.scale_shift_table' = scale_shift_table + y_null
makes it match at every t. Every other shared weight carries over unchanged; the caption embedder and the
cross-attention branches are new (their output projections start at zero, so at t* the stage-2 model predicts
exactly what the stage-1 model predicted for the null class); the class embedding table is dropped.
(The official repository does not ship this step.)

Stage 3 sub-stages and 2 -> 3 (`continue`): the architecture is the same up to the micro-condition embedders that
the multi-aspect sub-stages add; every shared tensor carries over, and new micro-condition embedders get a zero
output layer so the first step predicts what the previous sub-stage predicted.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from training.model import PixArt, PixArtConfig
from training.weights import WeightsError, read_state_dict
TRANSITIONS = ("class_to_text", "continue")


class TransitionError(ValueError):
    """Weights that cannot initialize the model as asked; the message names the keys or settings involved."""


@dataclass
class TransitionReport:
    """What happened to every tensor of the new model (and to the previous model's tensors it has no use for)."""

    source: str
    transition: str
    carried: list[str] = field(default_factory=list)  # copied unchanged
    reparameterized: list[str] = field(default_factory=list)  # computed from the previous weights
    new: list[str] = field(default_factory=list)  # no counterpart: kept from the new model's initialization
    dropped: list[str] = field(default_factory=list)  # previous tensors the new model does not have
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def groups(keys: list[str]) -> str:
            # blocks.0.attn.qkv.weight, blocks.1.attn.qkv.weight, ... -> blocks.*.attn.qkv.weight (x28)
            counts: dict[str, int] = {}
            for key in keys:
                pattern = re.sub(r"^blocks\.\d+\.", "blocks.*.", key)
                counts[pattern] = counts.get(pattern, 0) + 1
            return ", ".join(f"{k}" + (f" (x{n})" if n > 1 else "") for k, n in counts.items()) or "-"

        lines = [f"init from {self.source} ({self.transition}):",
                 f"  carried over ({len(self.carried)}): {groups(self.carried)}",
                 f"  re-parameterized ({len(self.reparameterized)}): {groups(self.reparameterized)}",
                 f"  new ({len(self.new)}): {groups(self.new)}",
                 f"  dropped ({len(self.dropped)}): {groups(self.dropped)}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def load_weights(folder: str | Path, use_ema: bool = False) -> tuple[PixArtConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of a previous stage's weights folder (training.weights), errors naming init.weights."""
    try:
        return read_state_dict(folder, use_ema)
    except (WeightsError, ValueError) as err:
        raise TransitionError(f"init.weights: {err} (<run.output_dir>/final of the previous stage)") from None


def choose_transition(source: PixArtConfig, target: PixArtConfig, requested: str = "auto") -> str:
    """The transition between two model configs; an impossible request is a TransitionError saying why."""
    if requested not in ("auto",) + TRANSITIONS:
        raise TransitionError(f"init.transition: unknown {requested!r}; expected auto or one of {TRANSITIONS}")
    if not source.text_conditioned and target.text_conditioned:
        natural = "class_to_text"
    elif source.text_conditioned and not target.text_conditioned:
        raise TransitionError("init.weights: a text-conditioned model cannot initialize a class-conditional one")
    else:
        natural = "continue"
    if requested != "auto" and requested != natural:
        raise TransitionError(f"init.transition: {requested!r} does not apply from a "
                              f"{'text' if source.text_conditioned else 'class'}-conditional model to a "
                              f"{'text' if target.text_conditioned else 'class'}-conditional one; use {natural!r}")
    shape_fields = ("hidden_size", "depth", "num_heads", "patch_size", "in_channels", "learn_sigma", "mlp_ratio")
    differ = [f"{f}: {getattr(source, f)} -> {getattr(target, f)}" for f in shape_fields
              if getattr(source, f) != getattr(target, f)]
    if differ:
        raise TransitionError(f"init.weights: the previous model's shape differs from this one ({'; '.join(differ)}); "
                              f"set model.preset/model.overrides to match it")
    return natural


@torch.no_grad()
def null_class_modulation_offsets(source: PixArt, t_star: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(block offset [6, hidden], final-layer offset [hidden]) that fold the null class of a class-conditional
    model into the scale-shift tables, computed in float64."""
    if source.config.text_conditioned:
        raise TransitionError("class_to_text needs a class-conditional source model")
    t_embedder = copy.deepcopy(source.t_embedder).double().cpu()
    t_block = copy.deepcopy(source.t_block).double().cpu()
    y_null = source.y_embedder.embedding_table.weight[source.config.num_classes].detach().double().cpu()
    t_emb = t_embedder(torch.tensor([t_star], dtype=torch.float64))  # [1, hidden]
    block_offset = (t_block(t_emb + y_null) - t_block(t_emb)).view(6, -1)
    return block_offset, y_null


def class_to_text(source: PixArt, target: PixArt, t_star: int = 500, source_name: str = "stage 1") -> TransitionReport:
    """Initialize the text model `target` from the class-conditional `source` in place (see the module doc)."""
    report = TransitionReport(source=source_name, transition="class_to_text")
    block_offset, final_offset = null_class_modulation_offsets(source, t_star)
    src = source.state_dict()
    new_state = target.state_dict()
    for key, value in new_state.items():
        if key.endswith("scale_shift_table") and key in src:
            offset = final_offset[None] if key.startswith("final_layer.") else block_offset
            value.copy_((src[key].double().cpu() + offset).to(value.dtype))
            report.reparameterized.append(key)
        elif key in src:
            _check_shape(key, src[key], value)
            value.copy_(src[key])
            report.carried.append(key)
        else:
            report.new.append(key)
    report.dropped = sorted(set(src) - set(new_state))
    report.notes.append(f"block modulations equal the stage-1 null-class modulations at t* = {t_star}; "
                        "the final layer's at every t")
    _zero_new_micro_condition_outputs(target, report)
    return report


def continue_from(source_state: dict[str, torch.Tensor], target: PixArt, source_name: str = "previous stage") -> TransitionReport:
    """Copy every tensor the two models share into `target` in place (same architecture, maybe new embedders)."""
    report = TransitionReport(source=source_name, transition="continue")
    new_state = target.state_dict()
    for key, value in new_state.items():
        if key in source_state:
            _check_shape(key, source_state[key], value)
            value.copy_(source_state[key])
            report.carried.append(key)
        else:
            report.new.append(key)
    report.dropped = sorted(set(source_state) - set(new_state))
    _zero_new_micro_condition_outputs(target, report)
    return report


def _check_shape(key: str, old: torch.Tensor, new: torch.Tensor) -> None:
    if old.shape != new.shape:
        raise TransitionError(f"init.weights: {key} has shape {tuple(old.shape)} in the previous stage and "
                              f"{tuple(new.shape)} in this model")


@torch.no_grad()
def _zero_new_micro_condition_outputs(target: PixArt, report: TransitionReport) -> None:
    """Micro-condition embedders the previous stage did not have start with a zero output layer: their sum into the
    timestep embedding is then 0, and the model starts from exactly the previous stage's function."""
    for name in ("csize_embedder", "ar_embedder"):
        if f"{name}.mlp.2.weight" in report.new:
            last = getattr(target, name).mlp[2]
            last.weight.zero_()
            last.bias.zero_()
            report.notes.append(f"{name} is new; its output layer starts at zero")


def init_from_previous(model: PixArt, folder: str | Path, transition: str = "auto", use_ema: bool = False,
                       t_star: int = 500) -> TransitionReport:
    """Initialize `model` in place from a previous (sub-)stage's weights folder and say what was carried over."""
    source_config, state = load_weights(folder, use_ema)
    chosen = choose_transition(source_config, model.config, transition)
    name = f"{folder}" + (" (EMA)" if use_ema else "")
    if chosen == "class_to_text":
        source = PixArt(source_config)
        source.load_state_dict(state, strict=True)
        report = class_to_text(source, model, t_star, source_name=name)
    else:
        report = continue_from(state, model, source_name=name)
    if not report.carried:
        raise TransitionError(f"init.weights: nothing in {folder} matches this model")
    return report
