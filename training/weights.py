"""The weights folder: what the trainer exports and what stage transitions, the sampler, the exporter and the demo
read. This module owns its contract, as curation/shard_format.py owns the dataset's (docs/ARCHITECTURE.md,
"Weights on disk"):

    config.json         the PixArtConfig (PixArt.save_pretrained / from_pretrained, diffusers' convention)
    model.safetensors   the model's weights, fp32
    ema.safetensors     the EMA weights, same keys (optional)
    pipeline.json       PipelineInfo: the autoencoder, text encoder and objective the model was trained with
    trainer.json        provenance: stage, run name, step, caption, init (informative; nothing reads it back)

A folder is written under a temp name and published whole (common.durable), so a reader sees all of it or none.

Readers may name a weights folder, a run folder (<run.output_dir>: its final/ weights, else the newest complete
weights/step_N) or one checkpoint of a run (<run.output_dir>/checkpoints/step_N: the weights folder exported from
it, else its weights reassembled from the DeepSpeed checkpoint itself); `locate` resolves any of them and says
which weights it chose.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from common.durable import atomic_write_bytes, publish_replacing, temp_name
from common.pretrained import DEFAULT_T5, DEFAULT_VAE
from training.diffusion import PredictionType
from training.objectives import ObjectiveName
from training.model import CONFIG_NAME, WEIGHTS_NAME, PixArt, PixArtConfig, load_state_dict_strict

MODEL_NAME = WEIGHTS_NAME  # "model.safetensors"
EMA_NAME = "ema.safetensors"
PIPELINE_NAME = "pipeline.json"
TRAINER_NAME = "trainer.json"

# A run folder's layout (training.trainer writes it; README "The run folder").
FINAL = "final"
WEIGHTS_DIR = "weights"
CHECKPOINTS_DIR = "checkpoints"
STEP_PATTERN = re.compile(r"^step_(\d{8})$")



class WeightsError(FileNotFoundError):
    """A folder that is not (or not a complete) weights folder; the message names the folder and the file."""


class PipelineInfo(BaseModel):
    """`pipeline.json`: everything besides the transformer that sampling and export need. Unknown keys are ignored
    (newer writers may record more); known ones are type-checked; every field has a default, so older folders
    keep loading."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    vae: str = DEFAULT_VAE
    vae_class: str = "AutoencoderKL"
    vae_subfolder: str | None = None  # e.g. "vae" when `vae` is a diffusers pipeline folder or repo
    scaling_factor: float = 0.18215
    vae_shift_factor: float | None = None  # z = (latent - shift) * scale (AutoencoderKL of SD3/Flux); None: no shift
    latent_channels: int | None = None  # the autoencoder's latent channels (the model's in_channels); None: unknown
    text_encoder: str | None = DEFAULT_T5
    prediction_type: PredictionType = "epsilon"  # what the network predicts (the scheduler's)
    objective: ObjectiveName = "iddpm"  # how it was trained: the noise schedule and loss the samplers must match
    # rectified_flow's time distribution and shift (training/flow.py; the trainer's diffusion.* of the same names)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float | Literal["auto"] = "auto"
    flow_base_tokens: int = 256


def read_pipeline_info(folder: str | os.PathLike) -> PipelineInfo | None:
    """The folder's pipeline.json, or None when it has none."""
    path = Path(folder) / PIPELINE_NAME
    if not path.is_file():
        return None
    try:
        return PipelineInfo.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as err:
        raise ValueError(f"{path}: not a valid {PIPELINE_NAME}: {err}") from None


def encode_pipeline_info(info: PipelineInfo) -> bytes:
    return (json.dumps(info.model_dump(), indent=2) + "\n").encode()


def encode_config(config: PixArtConfig) -> bytes:
    return (json.dumps(config.to_dict(), indent=2) + "\n").encode()


def write_pipeline_info(folder: str | os.PathLike, info: PipelineInfo) -> Path:
    path = Path(folder) / PIPELINE_NAME
    atomic_write_bytes(path, encode_pipeline_info(info))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def write_weights_folder(folder: str | os.PathLike, config: PixArtConfig, model_state: dict[str, torch.Tensor],
                         pipeline: PipelineInfo, ema_state: dict[str, torch.Tensor] | None = None,
                         trainer_info: dict | None = None, extra=None) -> Path:
    """Write a complete weights folder under a temp name, then publish it in place of `folder` (an existing one is
    moved aside first and deleted after). A kill at any point leaves the old folder or the new one, never half.
    `extra(tmp_folder)` writes further files (a LoRA run's adapters) before publishing."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(folder)
    tmp.mkdir()
    (tmp / CONFIG_NAME).write_bytes(encode_config(config))
    meta = {"format": "pt", "model": "PixArt"}
    save_file({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}, str(tmp / MODEL_NAME),
              metadata=meta)
    if ema_state is not None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in ema_state.items()}, str(tmp / EMA_NAME),
                  metadata=meta)
    write_pipeline_info(tmp, pipeline)
    if trainer_info is not None:
        (tmp / TRAINER_NAME).write_text(json.dumps(trainer_info, indent=1) + "\n")
    if extra is not None:
        extra(tmp)
    publish_replacing(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Checking and reading
# ---------------------------------------------------------------------------------------------------------------


def weights_problem(folder: str | os.PathLike, ema: bool | None = None) -> str | None:
    """None when `folder` is a complete, readable weights folder, else what is wrong (naming the file). Reads the
    headers only: config.json parses, each safetensors file's header parses and its tensors fit the file."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        PixArtConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
    except FileNotFoundError:
        return f"{folder / CONFIG_NAME} is missing"
    except (OSError, ValueError, TypeError) as err:
        return f"{folder / CONFIG_NAME} is unreadable ({err})"
    names = [MODEL_NAME] + ([EMA_NAME] if ema else [])
    if ema is None and (folder / EMA_NAME).exists():
        names.append(EMA_NAME)
    for name in names:
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # safetensors raises its own SafetensorError for a bad header or a short file
            return f"{path} is unreadable ({err})"
    try:
        read_pipeline_info(folder)
    except ValueError as err:
        return str(err)
    return None


def read_config(folder: str | os.PathLike) -> PixArtConfig:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise WeightsError(f"{Path(folder)} has no {CONFIG_NAME}; expected a weights folder written by the trainer")
    return PixArtConfig.from_dict(json.loads(path.read_text()))


def read_state_dict(folder: str | os.PathLike, use_ema: bool = False) -> tuple[PixArtConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of a weights folder: model.safetensors, or ema.safetensors with use_ema."""
    from safetensors.torch import load_file

    folder = Path(folder)
    name = EMA_NAME if use_ema else MODEL_NAME
    config = read_config(folder)
    if not (folder / name).is_file():
        raise WeightsError(f"{folder} has no {name}; expected a weights folder written by the trainer"
                           + (" with EMA weights" if use_ema else ""))
    return config, load_file(str(folder / name))


def has_ema(folder: str | os.PathLike) -> bool:
    return (Path(folder) / EMA_NAME).is_file()


def load_model(folder: str | os.PathLike, ema: bool | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[PixArt, bool]:
    """(model in eval mode, whether EMA weights were loaded) from a weights folder. ema=None: the EMA weights when
    the folder has them. Every key must match (StateDictMismatchError names the ones that do not)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a folder (expected {CONFIG_NAME} + {MODEL_NAME})")
    found_ema = has_ema(folder)
    if ema and not found_ema:
        raise WeightsError(f"{folder} has no {EMA_NAME}; use the model weights ({MODEL_NAME}, --no-ema)")
    use_ema = found_ema if ema is None else ema
    config, state = read_state_dict(folder, use_ema)
    model = PixArt(config)
    load_state_dict_strict(model, state, source=str(folder / (EMA_NAME if use_ema else MODEL_NAME)))
    return model.to(device=device, dtype=dtype).eval(), use_ema


# ---------------------------------------------------------------------------------------------------------------
# Which weights a path means
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """The weights folder a user's path resolved to, and how."""

    folder: Path
    how: str  # e.g. "the run's final weights"

    def describe(self, ema: bool) -> str:
        return f"using {self.folder / (EMA_NAME if ema else MODEL_NAME)} ({self.how})"


def step_folders(parent: Path) -> list[Path]:
    """parent's step_NNNNNNNN folders, oldest first."""
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name))


def _step_of(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / TRAINER_NAME).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def locate(path: str | os.PathLike) -> Located:
    """Resolve a weights folder, a run folder or a run's checkpoints/step_N folder to a weights folder.

    A checkpoint resolves to the weights the trainer exported from it (weights/step_N, or final/ for the last
    step); when that export is missing or damaged, the checkpoint's weights are reassembled into
    <checkpoint>/.consolidated (DeepSpeed's zero_to_fp32) and that folder is used."""
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"{path} is not a folder (expected a weights folder, a run folder or a checkpoint)")
    if (path / CONFIG_NAME).is_file() and (path / MODEL_NAME).is_file():
        return Located(path, "a weights folder")
    if (path / CHECKPOINTS_DIR).is_dir() or (path / FINAL).is_dir() or (path / WEIGHTS_DIR).is_dir():
        if weights_problem(path / FINAL) is None:
            return Located(path / FINAL, "the run's final weights")
        for folder in reversed(step_folders(path / WEIGHTS_DIR)):
            if weights_problem(folder) is None:
                return Located(folder, f"the run's newest complete weights, {folder.name}: "
                                       f"{weights_problem(path / FINAL)}")
        for ckpt in reversed(step_folders(path / CHECKPOINTS_DIR)):
            return _from_checkpoint(ckpt)
        raise WeightsError(f"{path}: a run folder without complete weights (final/, weights/step_N) or checkpoints")
    if STEP_PATTERN.match(path.name) and path.parent.name == CHECKPOINTS_DIR:
        return _from_checkpoint(path)
    raise WeightsError(f"{path}: not a weights folder ({CONFIG_NAME} + {MODEL_NAME}), a run folder or a "
                       f"checkpoints/step_N folder")


def _from_checkpoint(ckpt: Path) -> Located:
    run = ckpt.parent.parent
    step = int(STEP_PATTERN.match(ckpt.name).group(1))
    exported = run / WEIGHTS_DIR / ckpt.name
    if weights_problem(exported) is None:
        return Located(exported, f"exported from checkpoint {ckpt}")
    if _step_of(run / FINAL) == step and weights_problem(run / FINAL) is None:
        return Located(run / FINAL, f"exported from checkpoint {ckpt}, its last step")
    return Located(consolidate_checkpoint(ckpt), f"reassembled from the DeepSpeed checkpoint {ckpt}")


def consolidate_checkpoint(ckpt: Path) -> Path:
    """A weights folder <ckpt>/.consolidated built from a checkpoint's ZeRO partitions (fp32), its EMA and the
    config.json and pipeline.json the trainer stores in every checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    target = ckpt / ".consolidated"
    if weights_problem(target) is None:
        return target
    for name in (CONFIG_NAME, PIPELINE_NAME):
        if not (ckpt / name).is_file():
            raise WeightsError(f"{ckpt} has no {name} and no exported weights folder; cannot rebuild its weights")
    config = read_config(ckpt)
    # Parameters and buffers (the null-caption embedding), as the engine held them.
    state = {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name).items()}
    ema = None
    if (ckpt / EMA_NAME).is_file():
        ema = {**state, **load_file(str(ckpt / EMA_NAME))}
    info = read_pipeline_info(ckpt) or PipelineInfo()
    return write_weights_folder(target, config, state, info, ema, {"step": int(STEP_PATTERN.match(ckpt.name).group(1)),
                                                                   "consolidated_from": str(ckpt)})
