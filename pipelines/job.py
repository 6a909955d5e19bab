"""Job mechanics shared by the Ray jobs (curate, recaption, density), written once.

- **Preflight** (`resolve_models`, `check_output_location`, `fit_stages`): before any work and before the output
  folder is bound, every model the job will load is resolved on the driver without loading weights, the output
  location is checked, and the stages' resource requests are fitted to the cluster. Each failure is one
  `ConfigError` line naming the config field, its value and what to set.
- **Output binding** (`bind_output`): `job.json` records what the folder is being filled with; it is written only
  after the preflight passed, and a rerun with other output-changing settings or other input is refused.
- **Stage resources** (`StageResources`, `fit_stages`): one policy from a stage's settings to Ray Data
  `map_batches` arguments, with `auto` fitted to the cluster (fractional CPUs on small machines).
- **Unit commits** (`commit_marker`, `is_committed`): a unit is done exactly when its marker file is whole; the
  marker is written durably (temp name, fsync file and folder, rename) and an empty or unreadable marker (what a
  power loss can leave) counts as not committed, so its unit is redone, with a warning.
- **End of run** (`UnitsFailed`, `finish`): counts that add up, failed units listed, exit status.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Literal

from pydantic import Field

from common.config import ConfigError, StrictModel
from common.durable import atomic_write_bytes

log = logging.getLogger("pipelines.job")

JOB_FILE = "job.json"


# ---- preflight: models ------------------------------------------------------------------------------------------
# What a folder must hold for a class to load from it; each group is "at least one of these files".
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
DIFFUSERS_MODEL = (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                      "diffusion_pytorch_model.safetensors.index.json",
                                      "diffusion_pytorch_model.bin.index.json"))
TRANSFORMERS_MODEL = (("config.json",), WEIGHTS)
TOKENIZER = (("tokenizer_config.json", "tokenizer.json", "spiece.model"),)
IMAGE_PROCESSOR = (("preprocessor_config.json", "processor_config.json"),)
ANY_CONFIG = (("config.json",),)


@dataclass(frozen=True)
class ModelNeed:
    """A model the job will load: the config field that names it, its value, and the files its class needs."""

    field: str
    value: str
    files: tuple[tuple[str, ...], ...] = ANY_CONFIG
    subfolder: str | None = None
    what: str = "model"


def looks_local(value: str) -> bool:
    """A folder path rather than a hub id (`org/name`): absolute, relative with ./ or ~, deeper, or existing."""
    return value.startswith(("/", ".", "~")) or value.count("/") != 1 or Path(value).expanduser().is_dir()


def _check_folder(need: ModelNeed) -> str | None:
    folder = Path(need.value).expanduser()
    if need.subfolder:
        folder = folder / need.subfolder
    if not folder.is_dir():
        return f"folder {str(folder)!r} does not exist"
    for group in need.files:
        if not any((folder / name).is_file() for name in group):
            return f"folder {str(folder)!r} lacks {' or '.join(group)} (the {need.what}'s files)"
    return None


def _check_hub(need: ModelNeed) -> str | None:
    """Resolve the first file of the class's first group through huggingface_hub: the cache first, then the hub
    unless offline (HF_HUB_OFFLINE=1). Asks the hub for the file's metadata once, with a short timeout and no
    retries (hf_hub_download retries a dead network for about 45 s a model); downloads nothing."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    filenames = need.files[0] if need.files else ("config.json",)
    prefix = f"{need.subfolder.strip('/')}/" if need.subfolder else ""
    for name in filenames:
        cached = try_to_load_from_cache(need.value, prefix + name)
        if isinstance(cached, str):
            return None
    if constants.HF_HUB_OFFLINE:
        return (f"hub id {need.value!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                f"HF_HUB_OFFLINE=1 forbids downloading it")
    from huggingface_hub.errors import EntryNotFoundError

    first = None
    for name in filenames:
        try:
            get_hf_file_metadata(hf_hub_url(need.value, name, subfolder=need.subfolder), timeout=5)
            return None
        except EntryNotFoundError as err:  # the repo exists but names this file otherwise: try the next name
            first = first or err
        except Exception as err:  # noqa: BLE001 - no network, unknown or gated repo: asking again will not help
            first = err
            break
    text = str(first).strip().splitlines()[0] if str(first).strip() else ""
    return f"hub id {need.value!r} cannot be resolved ({type(first).__name__}: {text})"


def resolve_models(needs: list[ModelNeed]) -> None:
    """Every model the job will load resolves (without loading weights), or one ConfigError line per problem."""
    problems = []
    failed_fields = set()
    for need in needs:
        if need.field in failed_fields:  # one line per field: its model and its processor fail together
            continue
        problem = _check_folder(need) if looks_local(need.value) else _check_hub(need)
        if problem:
            failed_fields.add(need.field)
            problems.append(f"{need.field}: {problem}; set {need.field} to a folder saved with save_pretrained "
                            f"or a hub id reachable from this machine (in its cache when offline)")
    if problems:
        raise ConfigError("\n".join(problems))


def diffusers_needs(field: str, value: str, model_class: str, subfolder: str | None, what: str) -> ModelNeed:
    """A diffusers model (a class name); a plug-in class (`module:Class`) only needs its folder or hub id."""
    files = DIFFUSERS_MODEL if ":" not in model_class else ()
    return ModelNeed(field, value, files, subfolder, what)


def t5_needs(field: str, value: str, tokenizer_subfolder: str | None = None,
             encoder_subfolder: str | None = None) -> list[ModelNeed]:
    return [ModelNeed(field, value, TOKENIZER, tokenizer_subfolder, "T5 tokenizer"),
            ModelNeed(field, value, TRANSFORMERS_MODEL, encoder_subfolder, "T5 encoder")]


def check_captioner_fits(prefix: str, caption, cluster: dict) -> None:
    """vLLM runs only on GPUs: on a cluster without any, say so before an actor fails to build its engine."""
    if caption.backend == "vllm" and not cluster.get("GPU"):
        raise ConfigError(f"{prefix}.backend: vllm needs a GPU per actor but the Ray cluster has none; set "
                          f"{prefix}.backend: transformers to caption on CPU")


def captioner_needs(prefix: str, caption) -> list[ModelNeed]:
    """The LLaVA backends load a transformers model and its processor; other backends bring their own models."""
    if caption.backend not in ("transformers", "vllm"):
        return []
    return [ModelNeed(f"{prefix}.model", caption.model, TRANSFORMERS_MODEL, what="LLaVA model"),
            ModelNeed(f"{prefix}.model", caption.model, IMAGE_PROCESSOR, what="LLaVA processor")]


# ---- preflight: locations ----------------------------------------------------------------------------------------
def check_output_location(field: str, path: str | Path) -> None:
    """The output folder can be created and written: it is a folder or absent, and its nearest existing ancestor
    is a writable folder."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: {str(path)!r} is a file, not a folder; set {field} to a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: cannot create or write {str(path)!r} ({str(existing)!r} is not writable); "
                          f"set {field} to a writable folder")


@contextlib.contextmanager
def claimed_output(root: str | Path) -> Iterator[Path]:
    """The output folder for a job's start: when it did not exist and the start fails (a preflight error), it is
    removed again, so a failed start leaves nothing behind."""
    root = Path(root).expanduser()
    existed = root.exists()
    try:
        yield root
    except BaseException:
        if not existed and root.is_dir() and not (root / JOB_FILE).exists():
            shutil.rmtree(root, ignore_errors=True)
        raise


# ---- output binding ----------------------------------------------------------------------------------------------
def digest(listing) -> str:
    return hashlib.sha256(json.dumps(listing, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def bind_output(root: str | Path, settings: dict, inputs_digest: str, inputs: int, field_prefix: str = "") -> None:
    """Bind `root` to the output-changing `settings` and the input listing on the first run (after the preflight);
    refuse a rerun that differs, naming the changed fields."""
    root = Path(root)
    path = root / JOB_FILE
    if path.is_file():
        try:
            job = json.loads(path.read_text())
        except (OSError, ValueError):
            job = None
            log.warning("%s is unreadable (an interrupted first start): binding the folder again", path)
        if job is not None and not (isinstance(job, dict) and "settings" in job and "inputs_sha256" in job):
            raise ConfigError(f"output {root} was bound by another version of this job ({JOB_FILE} without "
                              f"'settings'); use a new output folder")
        if job is not None:
            before, before_inputs = job["settings"], job["inputs_sha256"]
            if before != settings:
                old, new = _flatten(before), _flatten(settings)
                changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
                raise ConfigError(f"output {root} was produced with other settings (changed: "
                                  f"{', '.join(field_prefix + k for k in changed)}); use a new output folder or "
                                  f"restore those settings")
            if before_inputs != inputs_digest:
                raise ConfigError(f"output {root} was produced from other input (the list of work units changed); "
                                  f"use a new output folder")
            return
    atomic_write_bytes(path, json.dumps({"settings": settings, "inputs_sha256": inputs_digest,
                                         "inputs": inputs}, indent=2).encode())


# ---- stage resources -------------------------------------------------------------------------------------------
class StageResources(StrictModel):
    """How a model stage runs on the cluster; `auto` is fitted to the cluster by `fit_stages`."""

    batch_size: int = Field(16, ge=1)
    concurrency: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="actors; auto: up to one per GPU on GPUs, one on CPU (a CPU-bound stage: as many as "
        "the free CPUs hold)")
    num_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="GPUs per actor; auto: 1 when the cluster has GPUs, else 0")
    num_cpus: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="CPUs per actor; auto: 1, or an equal share of what the read/write tasks leave on a "
        "small machine")


@dataclass(frozen=True)
class Stage:
    """A stage to fit: its config field (for messages), its settings, and whether it is CPU-bound work that scales
    out over free CPUs (density's counting) rather than a model loaded once per actor."""

    field: str
    resources: StageResources
    scales_on_cpu: bool = False


def fit_stages(stages: list[Stage], cluster: dict, task_cpus: float, task_field: str = "ray.read_num_cpus",
               check: bool = True) -> dict[str, dict]:
    """Stage field -> `map_batches` keyword arguments (compute, num_gpus, num_cpus, batch_size), one policy:

    - num_gpus auto: 1 per actor when the cluster has GPUs, else 0; an explicit request above the cluster's GPUs
      is refused (the actor would wait forever).
    - num_cpus auto: 1, or, when one actor per stage plus one read/write task (`task_cpus`) do not fit the
      cluster's CPUs, an equal share of what the task leaves (a 2-core machine runs three model stages at 1/3 CPU).
    - concurrency auto: a pool of 1 up to (GPUs / num_gpus) actors on GPUs; 1 actor on CPU, or as many as the free
      CPUs hold for a stage that `scales_on_cpu`.
    - with `check`, a request that cannot fit (explicit CPUs beyond the cluster) is refused in one line naming the
      fields to lower; without it (an autoscaling cluster), requests pass unchanged.
    """
    from ray.data import ActorPoolStrategy

    gpus, cpus = float(cluster.get("GPU", 0) or 0), float(cluster.get("CPU", 0) or 0)
    for stage in stages:
        wanted = stage.resources.num_gpus
        if check and wanted != "auto" and wanted > gpus:
            raise ConfigError(f"{stage.field}.num_gpus is {wanted:g} but the Ray cluster has {gpus:g} GPUs; set "
                              f"{stage.field}.num_gpus: auto (or 0 to run that stage on CPU)")
    auto_cpu = [s for s in stages if s.resources.num_cpus == "auto"]
    fixed = sum(float(s.resources.num_cpus) for s in stages if s.resources.num_cpus != "auto")
    share = 1.0
    if auto_cpu and cpus:
        share = min(1.0, max(0.05, (cpus - task_cpus - fixed) / len(auto_cpu)))
    num_cpus = {s.field: share if s.resources.num_cpus == "auto" else float(s.resources.num_cpus) for s in stages}
    if check and cpus:
        actors = sum(num_cpus[s.field] * (s.resources.concurrency if isinstance(s.resources.concurrency, int) else 1)
                     for s in stages)
        if actors + task_cpus > cpus + 1e-9:
            fields = ", ".join(f"{s.field}.num_cpus" for s in stages if s.resources.num_cpus != "auto")
            raise ConfigError(f"the stages' actors need {actors:g} CPUs and the read/write tasks {task_cpus:g}, but "
                              f"the Ray cluster has {cpus:g}; set {fields or 'the stages concurrency'} to auto "
                              f"(or lower them; fractions such as 0.25 are fine) or lower {task_field}")
    free = max(0.0, cpus - task_cpus - sum(num_cpus.values()))
    out = {}
    for stage in stages:
        r = stage.resources
        stage_gpus = r.num_gpus if r.num_gpus != "auto" else (1.0 if gpus else 0.0)
        if r.concurrency != "auto":
            compute = ActorPoolStrategy(size=r.concurrency)
        elif stage_gpus:
            compute = ActorPoolStrategy(min_size=1, max_size=max(1, int(gpus // stage_gpus)))
        elif stage.scales_on_cpu:
            compute = ActorPoolStrategy(size=max(1, 1 + int((free + 1e-9) // num_cpus[stage.field])))
        else:
            compute = ActorPoolStrategy(size=1)
        out[stage.field] = {"compute": compute, "num_gpus": stage_gpus, "num_cpus": num_cpus[stage.field],
                            "batch_size": r.batch_size}
    return out


ACTOR_NOTE = ("note: Ray prints 'core_worker.cc ... has constructor arguments in the object store and max_restarts > "
              "0' once per model-stage actor it starts: Ray Data always hands its stage to actors by reference, and "
              "the reference lives as long as the stage, so a restarted actor is rebuilt as usual. Harmless.")


def explain_actor_warning(stages: dict) -> None:
    """Say once, before Ray Data starts actor pools, what the error-looking line Ray prints for each one means."""
    if stages:
        print(ACTOR_NOTE, file=sys.stderr, flush=True)


# ---- unit commits -------------------------------------------------------------------------------------------
def is_committed(marker: Path) -> bool:
    """A unit is committed when its parquet marker is whole. An empty or unreadable one (a power loss between the
    write and its flush) counts as absent: it is removed, with a warning, and the unit is done again."""
    if not marker.is_file():
        return False
    import pyarrow.parquet as pq

    try:
        if marker.stat().st_size == 0:
            raise ValueError("0 bytes")
        pq.read_metadata(marker)
        return True
    except Exception as err:  # noqa: BLE001 - any damage means "not committed"
        log.warning("commit marker %s is damaged (%s): its unit counts as not committed and is redone", marker, err)
        print(f"warning: commit marker {marker} is damaged ({err}); redoing its unit", file=sys.stderr)
        marker.unlink(missing_ok=True)
        return False


def parquet_bytes(table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_parquet(path: Path, table) -> None:
    """A parquet file written durably (a unit's commit marker, or a part it vouches for)."""
    atomic_write_bytes(path, parquet_bytes(table))


# ---- end of run ---------------------------------------------------------------------------------------------
class UnitsFailed(RuntimeError):
    """Some units could not be processed; every other unit finished. `failed`: unit -> reason."""

    def __init__(self, job: str, failed: dict[str, str]):
        self.job = job
        self.failed = dict(sorted(failed.items()))
        super().__init__(f"{len(failed)} unit(s) failed")

    def report(self) -> str:
        lines = [f"{self.job}: {len(self.failed)} unit(s) failed (every other unit is done; run the same command "
                 f"again to retry only these):"]
        lines += [f"  {unit}: {reason}" for unit, reason in self.failed.items()]
        return "\n".join(lines)


def run_main(job: str, body) -> int:
    """Run a job's `body()` (which prints its own summary) and turn the outcome into an exit status: 0 done,
    1 some units failed (listed), 2 a preflight or config error (one line per problem)."""
    try:
        body()
    except UnitsFailed as failed:
        print(failed.report(), file=sys.stderr)
        return 1
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
