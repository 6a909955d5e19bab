"""LoRA fine-tuning with peft: adapters on the transformer's linear layers, saved as diffusers-side peft adapters.

    lora: {rank: 16, alpha: 16, targets: [self_attention, cross_attention, mlp]}      # in a training config

`add_lora` injects peft LoRA layers (`peft.inject_adapter_in_model`) into the PixArt named by the config and freezes
everything else; the trainer then optimizes the adapters only. Targets are groups of our module names, or module
name suffixes themselves:

    self_attention   attn.qkv, attn.proj
    cross_attention  cross_attn.q_linear, cross_attn.kv_linear, cross_attn.proj
    mlp              mlp.fc1, mlp.fc2

Each weights folder of a LoRA run holds the merged full weights (model.safetensors, ema.safetensors: what sampling
and export read) and the adapter in `lora/` (and `lora_ema/`): a peft adapter (adapter_config.json +
adapter_model.safetensors) on diffusers' PixArtTransformer2DModel module names. Our fused projections are split
for it (a LoRA on qkv is three LoRAs on to_q, to_k, to_v sharing A, with B cut in three: the same update).
diffusers 0.42's PixArtAlphaPipeline has no `load_lora_weights` (PixArtTransformer2DModel has no LoRA loader
mixin); the adapter is loaded as the official PixArt LoRA script and diffusers' PixArt docs do:

    pipe.transformer = peft.PeftModel.from_pretrained(pipe.transformer, "<weights>/lora")

`python -m training.lora --checkpoint BASE --adapter ADAPTER --out OUT` merges an adapter into full weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from pydantic import Field, field_validator

from common.config import StrictModel
from training.model import PixArt, PixArtConfig

TARGET_GROUPS = {
    "self_attention": ("attn.qkv", "attn.proj"),
    "cross_attention": ("cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}
ADAPTER_NAME = "default"
ADAPTER_DIR = "lora"
EMA_ADAPTER_DIR = "lora_ema"


class LoraSection(StrictModel):
    """LoRA fine-tuning (training/lora.py); rank 0: off, every parameter trains."""

    rank: int = Field(0, ge=0)
    alpha: float | None = Field(None, gt=0)  # the update is scaled by alpha / rank; default: alpha = rank
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["self_attention", "cross_attention"])

    @field_validator("targets")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        known = set(TARGET_GROUPS) | {m for group in TARGET_GROUPS.values() for m in group}
        unknown = [t for t in value if t not in known]
        if unknown or not value:
            raise ValueError(f"unknown LoRA target(s) {unknown}; choose groups {sorted(TARGET_GROUPS)} or module "
                             f"names {sorted(known - set(TARGET_GROUPS))}")
        return value

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def modules(self) -> list[str]:
        """Our module-name suffixes the adapters go on."""
        return sorted({m for t in self.targets for m in TARGET_GROUPS.get(t, (t,))})

    def peft_config(self, target_modules: list[str] | str):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, lora_dropout=self.dropout,
                          target_modules=target_modules, init_lora_weights=True)


def _regex(suffixes: list[str]) -> str:
    """peft target regex: the suffixes inside transformer blocks."""
    return r"^blocks\.\d+\.(" + "|".join(re.escape(s) for s in suffixes) + r")$"


def add_lora(model: PixArt, section: LoraSection) -> PixArt:
    """Inject LoRA layers into `model` in place and freeze every other parameter; returns the model."""
    from peft import inject_adapter_in_model

    if model.config.text_conditioned is False and any(s.startswith("cross_attn") for s in section.modules()):
        raise ValueError("lora.targets: a class-conditional model has no cross-attention")
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(section.peft_config(_regex(section.modules())), model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def split_state(state: dict[str, torch.Tensor], section: LoraSection) -> tuple[dict, dict]:
    """A LoRA-injected model's state dict -> (merged full PixArt state dict, adapter {module: (A, B)})."""
    scale = (section.alpha or section.rank) / section.rank
    merged, adapter = {}, {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            module, _, rest = key.partition(".lora_")
            adapter.setdefault(module, {})[rest[0]] = value.float()
        elif ".base_layer." in key:
            merged[key.replace(".base_layer.", ".")] = value
        else:
            merged[key] = value
    for module, ab in adapter.items():
        weight = merged[f"{module}.weight"]
        merged[f"{module}.weight"] = (weight.float() + scale * ab["B"] @ ab["A"]).to(weight.dtype)
    return merged, {m: (ab["A"], ab["B"]) for m, ab in adapter.items()}


def save_adapter(folder: str | Path, adapter: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 section: LoraSection, config: PixArtConfig) -> Path:
    """Write a peft adapter (adapter_config.json + adapter_model.safetensors) for diffusers' transformer."""
    from safetensors.torch import save_file

    from training.checkpoint import diffusers_modules

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = diffusers_modules(config)
    tensors, targets = {}, set()
    for module, (a, b) in sorted(adapter.items()):
        theirs = table[module]
        for name, b_part in zip(theirs, b.chunk(len(theirs), dim=0)):
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().clone()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b_part.contiguous().clone()
            targets.add(name)
    section.peft_config(sorted(targets)).save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "pixart_lora.json").write_text(json.dumps({"rank": section.rank, "alpha": section.alpha or section.rank,
                                                         "targets": section.targets, "input_size": config.input_size},
                                                        indent=1) + "\n")
    return folder


def read_adapter(folder: str | Path, config: PixArtConfig) -> tuple[dict[str, torch.Tensor], float]:
    """({diffusers module: delta weight}, alpha / rank) of a peft adapter folder written by save_adapter."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"--adapter: {folder} has no {name} (expected a peft LoRA adapter folder)")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[module] = scale * b.float() @ a.float()
    return deltas, scale


def merge_adapter(model: PixArt, folder: str | Path) -> PixArt:
    """Add a saved adapter's updates to `model`'s weights in place (full weights, no LoRA layers)."""
    from training.checkpoint import diffusers_modules

    deltas, _ = read_adapter(folder, model.config)
    # diffusers module -> (our module, which row block, of how many)
    ours_of = {t: (o, i, len(ts)) for o, ts in diffusers_modules(model.config).items() for i, t in enumerate(ts)}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, delta in deltas.items():
            if module not in ours_of:
                raise ValueError(f"--adapter: module {module!r} is not a PixArt linear layer")
            ours, i, n = ours_of[module]
            weight = params[f"{ours}.weight"]
            weight.view(n, -1, weight.shape[1])[i] += delta.to(weight.dtype)
    return model


def main(argv: list[str] | None = None) -> None:
    from training import cli

    p = cli.parser("training.lora", __doc__)
    p.add_argument("--checkpoint", required=True, help="base weights folder (config.json + model.safetensors)")
    p.add_argument("--adapter", required=True, help="LoRA adapter folder (a weights folder's lora/)")
    p.add_argument("--out", required=True, help="weights folder to write with the merged full weights")
    args = p.parse_args(argv)
    try:
        model = merge_adapter(PixArt.from_pretrained(args.checkpoint), args.adapter)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    model.save_pretrained(args.out)
    for extra in ("pipeline.json",):
        if (Path(args.checkpoint) / extra).is_file():
            (Path(args.out) / extra).write_text((Path(args.checkpoint) / extra).read_text())
    print(f"wrote {args.out}: {args.checkpoint} with {args.adapter} merged")


if __name__ == "__main__":
    main()
