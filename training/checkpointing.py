"""Checkpoints of a run over a dict of stateful objects (as torchtitan's CheckpointManager): save, validate, resume,
prune. Damage never restarts a run from step 0 and never loses steps silently.

    checkpoints/
      latest                  names the newest complete checkpoint (a hint: resume trusts validation, not it)
      step_00000020/          one complete checkpoint
        mp_rank_00_model_states.pt, *_optim_states.pt    DeepSpeed's: model, optimizer, scheduler  ("engine")
        ema.safetensors                                  the EMA                                  ("ema")
        state_rank<R>.json                               step and step counters, per rank         ("counters")
        loader_rank<R>.json                              data position and sample counts           ("loader")
        rng_rank<R>.pt                                   torch, noise and CUDA generator states    ("rng")
        config.json, pipeline.json                       what the weights can be rebuilt with (training.weights)
        manifest.json                                    every file above, its size and CRC-32; written last
      .step_00000030.tmp-ckpt/  a checkpoint being written; swept at the next start

Save: every rank writes into the temp folder; every file and folder is fsynced; rank 0 writes the manifest, renames
the folder into place, fsyncs the parent, points `latest` at it and prunes to `keep_last`.

Resume: temp folders of a dead attempt are swept; checkpoints are tried newest first, whatever `latest` says. One is
used when its manifest is readable and every file it lists is present with its size and checksum, and every object
loads from it; otherwise a warning names the checkpoint and the bad file and the previous kept one is tried. A
damaged checkpoint is moved aside (step_N.damaged-<id>) once a good one has loaded. When checkpoints exist but none
is usable, resume stops with CheckpointError listing what it found; it never starts over.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, Protocol

import torch

from common.config import ConfigError
from common.durable import atomic_write_bytes, fsync_tree, publish_replacing, sweep_temp
from training.weights import STEP_PATTERN, step_folders

log = logging.getLogger("training.checkpointing")

LATEST = "latest"
MANIFEST = "manifest.json"
DAMAGED = ".damaged-"
# Where each stateful object is stored; "{rank}" marks a per-rank file, others are written by rank 0 and read by all.
FILES = {"counters": "state_rank{rank}.json", "loader": "loader_rank{rank}.json", "rng": "rng_rank{rank}.pt",
         "ema": "ema.safetensors"}


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be resumed from; the message lists each one and why."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGState:
    """The random streams a resumed run must continue: torch's global RNG (caption dropout), the rank's noise
    generator, and the CUDA RNG where there is one."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.generator, self.device = generator, device

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch"])
        self.generator.set_state(state["generator"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


def _encode(name: str, state: dict) -> bytes:
    if name.endswith(".json"):
        return json.dumps(state, indent=1, sort_keys=True).encode()
    if name.endswith(".safetensors"):
        from safetensors.torch import save

        return save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _decode(path: Path) -> dict:
    data = path.read_bytes()
    if path.name.endswith(".json"):
        return json.loads(data)
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    return torch.load(io.BytesIO(data), weights_only=True)  # never unpickle code


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def checkpoint_problem(folder: Path, world_size: int | None = None) -> str | None:
    """None when `folder` is complete (its manifest readable, every file it lists present with its recorded size
    and checksum), else what is wrong, naming the file."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"{folder / MANIFEST} is missing (the checkpoint was not completed)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{folder / MANIFEST} is unreadable ({err.__class__.__name__}: {err})"
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            size, crc = path.stat().st_size, None
            if size == expected["size"]:
                crc = _crc32(path)
        except (OSError, KeyError, TypeError) as err:
            return f"{path} is unreadable ({err.__class__.__name__}: {err})"
        if size != expected["size"]:
            return f"{path} is {size} bytes, {expected['size']} were written (truncated or damaged)"
        if crc != expected["crc32"]:
            return f"{path} does not match its checksum (damaged)"
    return None


class CheckpointManager:
    """Save, validate, resume and prune the checkpoints of one run, on every rank (all ranks call save/resume).

    `states` maps names to stateful objects: "engine" is the DeepSpeed engine (its own files), every other name is
    stored as FILES says. `extra_files()` (rank 0) are small files written into every checkpoint (the model config
    and pipeline.json, so weights can be rebuilt from a checkpoint alone)."""

    def __init__(self, root: str | Path, states: dict[str, Any], rank: int = 0, world_size: int = 1,
                 keep_last: int = 3, extra_files=None, check_compatible=None):
        unknown = set(states) - set(FILES) - {"engine"}
        if unknown:
            raise ValueError(f"no checkpoint file is defined for {sorted(unknown)}; add them to FILES")
        self.root, self.states = Path(root), states
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.extra_files = extra_files or (lambda: {})
        # check_compatible(folder) raises ConfigError when a checkpoint is intact but was written for other settings
        # (another model): that is the user's to resolve, not damage to fall back from.
        self.check_compatible = check_compatible or (lambda folder: None)
        self.is_main = rank == 0

    # --- save ------------------------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        tag = f"step_{step:08d}"
        tmp = self.root / f".{tag}.tmp-ckpt"  # the same name on every rank; a dead attempt's is swept at start
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        _barrier()
        if "engine" in self.states:
            self.states["engine"].save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
        for key, obj in self.states.items():
            if key == "engine":
                continue
            name = FILES[key].format(rank=self.rank)
            if "{rank}" in FILES[key] or self.is_main:
                atomic_write_bytes(tmp / name, _encode(name, obj.state_dict()))
        if self.is_main:
            for name, data in self.extra_files().items():
                atomic_write_bytes(tmp / name, data)
        _barrier()
        # DeepSpeed does not fsync what it writes. Once every rank has finished writing (no temp file is being
        # renamed any more), each rank flushes what it sees: on a shared filesystem every node its own files.
        fsync_tree(tmp)
        _barrier()
        if self.is_main:
            files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "crc32": _crc32(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_bytes(tmp / MANIFEST, json.dumps(
                {"step": step, "world_size": self.world_size, "files": files}, indent=1).encode())
            publish_replacing(tmp, self.root / tag)
            atomic_write_bytes(self.root / LATEST, tag.encode())
            self.prune()
        _barrier()
        return self.root / tag

    def prune(self) -> None:
        """Keep the newest `keep_last` checkpoints."""
        for old in step_folders(self.root)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # --- resume ----------------------------------------------------------------------------------------------------

    def sweep(self) -> list[Path]:
        """Rank 0: remove what a dead attempt left half-written (temp checkpoint folders, DeepSpeed's old names)."""
        removed = sweep_temp(self.root) if self.is_main else []
        if self.is_main and self.root.is_dir():
            for legacy in self.root.glob("tmp-step_*"):
                shutil.rmtree(legacy, ignore_errors=True)
                removed.append(legacy)
        for path in removed:
            log.warning("removed %s, left half-written by an interrupted run", path)
        return removed

    def found(self) -> list[str]:
        """Everything in the checkpoint folder that says this run has trained before."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if STEP_PATTERN.match(p.name) or DAMAGED in p.name or p.name == LATEST)

    def resume(self) -> tuple[int, Path] | None:
        """Load the newest usable checkpoint into the stateful objects: (its step, its folder), or None when the run
        has no checkpoint at all. Raises CheckpointError when checkpoints exist but none is usable."""
        self.sweep()
        _barrier()
        candidates = list(reversed(step_folders(self.root)))
        self._check_latest(candidates)
        skipped: list[tuple[Path, str]] = []
        for folder in candidates:
            problem = _broadcast(checkpoint_problem(folder) if self.is_main else None)
            if problem is None:
                problem = self._load(folder)
            if problem is not None:
                log.warning("checkpoint %s is not usable: %s; trying the previous one", folder.name, problem)
                skipped.append((folder, problem))
                continue
            step = int(STEP_PATTERN.match(folder.name).group(1))
            if skipped and self.is_main:
                names = ", ".join(f"{f.name} ({why})" for f, why in skipped)
                log.warning("resumed from %s (step %d), skipping damaged checkpoint(s): %s; they are kept aside as "
                            "<name>%s<id>", folder, step, names, DAMAGED)
                for bad, _ in skipped:
                    os.replace(bad, bad.with_name(f"{bad.name}{DAMAGED}{uuid.uuid4().hex[:8]}"))
            _barrier()
            return step, folder
        found = self.found()
        if found:
            details = "; ".join(f"{f.name}: {why}" for f, why in skipped) or "no complete checkpoint folder"
            raise CheckpointError(
                f"{self.root} holds {', '.join(found)} but no usable checkpoint ({details}). Refusing to start "
                f"again from step 0: repair or move the checkpoints away, or choose a new run.output_dir")
        return None

    def _check_latest(self, candidates: list[Path]) -> None:
        if not self.is_main:
            return
        pointer = self.root / LATEST
        if not pointer.exists():
            if candidates:
                log.warning("%s is missing; using the newest complete checkpoint instead", pointer)
            return
        try:
            tag = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            tag, why = "", f"unreadable ({err})"
        else:
            why = "empty" if not tag else f"names {tag!r}, which is not a checkpoint folder"
        if not STEP_PATTERN.match(tag) or not (self.root / tag).is_dir():
            log.warning("%s is %s; scanning for the newest complete checkpoint", pointer, why)
        elif candidates and candidates[0].name != tag:
            log.warning("%s names %s but %s is newer; trying the newest first", pointer, tag, candidates[0].name)

    def _load(self, folder: Path) -> str | None:
        """Load every object from `folder` on this rank; None when every rank succeeded, else the first problem
        (every rank agrees). A setting that differs from the checkpoint's (ConfigError) is not damage: raised."""
        problem = None
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            if manifest.get("world_size", self.world_size) != self.world_size:
                raise ConfigError(f"run.output_dir: checkpoint {folder} was written by {manifest['world_size']} "
                                  f"processes, this run has {self.world_size}; resume with the same number")
            self.check_compatible(folder)
            for key in sorted(self.states, key=lambda k: k == "engine"):  # small files first, the engine last
                if key == "engine":
                    path, _ = self.states[key].load_checkpoint(str(self.root), tag=folder.name,
                                                               load_optimizer_states=True,
                                                               load_lr_scheduler_states=True)
                    if path is None:
                        raise RuntimeError("DeepSpeed found no checkpoint files")
                    continue
                name = FILES[key].format(rank=self.rank)
                try:
                    self.states[key].load_state_dict(_decode(folder / name))
                except ConfigError:
                    raise
                except Exception as err:
                    raise RuntimeError(f"{folder / name}: {err.__class__.__name__}: {err}") from None
        except ConfigError:
            raise
        except Exception as err:  # a file that passed the checksum but does not load: treat as damage
            problem = f"loading failed on rank {self.rank}: {err}"
        problems = _gather(problem)
        return next((p for p in problems if p is not None), None)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _broadcast(value):
    if not _distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value) -> list:
    if not _distributed():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out
