"""The curation job: images from a source -> filtered, deduplicated, bucketed, captioned, encoded shards.

    python -m pipelines.curate --config configs/curation/sa1b.yaml [--set section.field=value ...]
    ray job submit --working-dir . -- python -m pipelines.curate --config configs/curation/sa1b.yaml

Run directly it starts a local Ray; under `ray job submit` it joins that cluster (pipelines.ray_cluster.init_ray).
Three steps, each resumable, all deterministic:

1. screen (Ray Data: one task per pending unit): read, cheap filters, pHash -> work/screen/<unit>.parquet
2. plan (driver): repeated ids and near-duplicates across the whole dataset -> work/plan/<unit>.parquet;
   units with nothing left to encode are committed right away
3. encode (Ray Data, streaming): read+bucket (tasks) -> [aesthetic] -> [caption] -> VAE -> [T5] (actors, a GPU
   each when the cluster has them) -> stage + commit units (tasks)

A unit is committed when manifest/<unit>.parquet exists; a rerun with the same output folder skips committed units,
so a job killed at any point and submitted again ends with every accepted sample exactly once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from curation.aesthetic import AestheticStage
from curation.buckets import BucketConfig, BucketStage
from curation.captioners.config import CaptionStageConfig
from curation.dedup import Candidate, find_duplicates
from curation.encoders import CaptionStage, T5Stage, VaeStage, check_vae
from curation.filters import FilterConfig, ScreenStage
from common.pretrained import DEFAULT_T5, DEFAULT_VAE, T5_MAX_LENGTH, MissingModelError
from common.durable import atomic_write_bytes
from curation.shard_format import CAPTION_NAME_PATTERN
from curation.sources import SourceConfig, WorkUnit, build_source
from curation.writer import (PLAN_SCHEMA, DatasetLayout, IncompleteUnitError, UnitWriter, commit_unit, finalize,
                             plot_card, read_plan, remove_staging, try_commit, write_parquet)
from common.config import ConfigError, StrictModel, dump_config, load_config

JOB_FILE = "job.json"
DTYPE_PATTERN = r"^(auto|float32|float16|bfloat16)$"


# ---- config -----------------------------------------------------------------------------------------------------
class VaeConfig(StrictModel):
    model: str = Field(DEFAULT_VAE, description="hub id or save_pretrained folder")
    model_class: str = Field("AutoencoderKL", description="a diffusers class name or module:Class")
    subfolder: str | None = None
    dtype: str = Field("float32", pattern=DTYPE_PATTERN)


class T5Config(StrictModel):
    model: str = Field(DEFAULT_T5, description="hub id or folder holding the T5 tokenizer and encoder")
    captions: list[str] = Field(default_factory=list, description="caption names to encode, e.g. [llava]")
    max_length: int = Field(T5_MAX_LENGTH, ge=1)
    dtype: str = Field("auto", pattern=DTYPE_PATTERN)
    tokenizer_subfolder: str | None = None
    encoder_subfolder: str | None = None

    @field_validator("captions")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not CAPTION_NAME_PATTERN.match(name):
                raise ValueError(f"caption name {name!r} must match {CAPTION_NAME_PATTERN.pattern}")
        if len(set(names)) != len(names):
            raise ValueError(f"caption names repeat: {names}")
        return names


class CaptionConfig(CaptionStageConfig):
    """The `caption` section: the recaption job's CaptionStageConfig (backend, name, model, options,
    inject_source_caption, sampling, batch_size, num_gpus, num_cpus, concurrency, ...) plus two curation knobs.
    The backend may also be a "module:factory" (a captioner outside the registry)."""

    source_caption: str | None = Field(None, description="which source caption to inject (default: the first)")
    image_size: int | None = Field(None, ge=16, description="caption an uncropped picture with this shorter side "
                                   "instead of the bucketed one")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if ":" in value:
            module, _, attr = value.partition(":")
            if not module or not attr:
                raise ValueError(f"backend {value!r} must be a registered name or module:factory")
            return value
        from curation.captioners.base import _BACKENDS

        if value not in _BACKENDS:
            raise ValueError(f"unknown captioner backend {value!r}; known: {sorted(_BACKENDS)} or module:factory")
        return value

    def captioner_options(self) -> dict:
        options = super().captioner_options()
        for name in ("source_caption", "image_size"):
            options.pop(name, None)
        return options


class StageResources(StrictModel):
    """How a model stage runs on the cluster."""

    batch_size: int = Field(16, ge=1)
    concurrency: int | Literal["auto"] = Field("auto", description="actors; auto: 1..number of GPUs (1 on CPU)")
    num_gpus: float | Literal["auto"] = Field("auto", description="GPUs per actor; auto: 1 when the cluster has any")
    num_cpus: float = Field(1.0, gt=0)


class RayConfig(StrictModel):
    """Performance knobs only: nothing here changes the output, so a resumed job may change them."""

    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (ignored when joining a cluster)")
    object_store_memory: int | None = Field(None, ge=75 * 2**20)
    read_num_cpus: float = Field(1.0, gt=0, description="CPUs per screen/read task")
    write_num_cpus: float = Field(1.0, gt=0, description="CPUs per staging/commit task")
    progress: bool = Field(True, description="Ray Data progress bars")
    check_resources: bool = Field(True, description="refuse to start when the cluster lacks the GPUs/CPUs the "
                                  "stages ask for (turn off on a cluster that autoscales from zero)")
    aesthetic: StageResources = Field(default_factory=lambda: StageResources(batch_size=64))
    vae: StageResources = Field(default_factory=lambda: StageResources(batch_size=16))
    t5: StageResources = Field(default_factory=lambda: StageResources(batch_size=32))


class CurateConfig(StrictModel):
    source: SourceConfig
    output: str = Field(description="dataset folder (shared by all nodes of a cluster)")
    buckets: BucketConfig = Field(default_factory=BucketConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    caption: CaptionConfig | None = None
    vae: VaeConfig = Field(default_factory=VaeConfig)
    t5: T5Config | None = Field(default_factory=T5Config, description="null for class-conditional data")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _local_models_exist(self) -> "CurateConfig":
        """Fail before any work when a model setting names a local folder that is not there (hub ids pass)."""
        settings = {"vae.model": self.vae.model}
        if self.t5 is not None and self.t5.captions:
            settings["t5.model"] = self.t5.model
        if self.filters.aesthetic is not None:
            settings["filters.aesthetic.clip_model"] = self.filters.aesthetic.clip_model
        for setting, value in settings.items():
            looks_local = value.startswith(("/", ".", "~")) or value.count("/") > 1
            if looks_local and not Path(value).expanduser().is_dir():
                raise ValueError(f"{setting}: model folder {value!r} does not exist; set {setting} to a folder "
                                 f"saved with save_pretrained or a hub id")
        return self

    @property
    def min_side(self) -> int:
        return self.filters.min_side if self.filters.min_side is not None else self.buckets.resolution

    def output_fingerprint(self) -> dict:
        """The settings the output depends on (everything but where it goes and how fast it runs)."""
        tree = dump_config(self)
        for name in ("ray", "output"):
            tree.pop(name)
        for name in ("batch_size", "num_gpus", "num_cpus", "concurrency"):
            (tree.get("caption") or {}).pop(name, None)
        return tree


# ---- job bookkeeping ------------------------------------------------------------------------------------------------
def _flatten(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def check_job(layout: DatasetLayout, config: CurateConfig, units: list[WorkUnit]) -> None:
    """Bind the output folder to its config and input on the first run; refuse a rerun that differs."""
    fingerprint = config.output_fingerprint()
    unit_digest = hashlib.sha256(json.dumps([u.to_row() for u in units], sort_keys=True).encode()).hexdigest()
    path = layout.root / JOB_FILE
    if path.is_file():
        job = json.loads(path.read_text())
        if job["config"] != fingerprint:
            before, after = _flatten(job["config"]), _flatten(fingerprint)
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            raise ConfigError(f"output {layout.root} was produced with a different config (changed: "
                              f"{', '.join(changed)}); use a new output folder or restore those settings")
        if job["units_sha256"] != unit_digest:
            raise ConfigError(f"output {layout.root} was produced from different input (the list of work units "
                              f"changed); use a new output folder")
        return
    atomic_write_bytes(path, json.dumps({"config": fingerprint, "units_sha256": unit_digest,
                                         "units": len(units)}, indent=2).encode())


def plan_units(layout: DatasetLayout, units: list[WorkUnit], config: CurateConfig) -> dict[str, int]:
    """Pre-encode verdicts for every unit: cheap-filter results plus duplicate decisions across the whole job.

    Writes work/plan/<unit>.parquet for each uncommitted unit and returns unit -> samples left to encode. Only the
    samples that passed the cheap filters become Python objects (the duplicate search needs them all at once).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = {u.id: pq.read_table(layout.screen_part(u.id)) for u in units}
    candidates: list[Candidate] = []
    where: list[tuple[str, int]] = []
    for rank, unit in enumerate(units):
        table = tables[unit.id]
        alive = [i for i, stage in enumerate(table.column("stage").to_pylist()) if not stage]
        picked = table.take(pa.array(alive, pa.int64()))
        for i, ordinal, key, source_id, phash in zip(alive, *(picked.column(c).to_pylist()
                                                             for c in ("ordinal", "key", "source_id", "phash"))):
            candidates.append(Candidate(unit.id, rank, ordinal, key, source_id, phash))
            where.append((unit.id, i))
    near = config.filters.near_duplicates
    duplicates = find_duplicates(candidates, near.max_distance if near else None,
                                 bits=(near.hash_size ** 2) if near else 64)
    verdicts: dict[str, dict[int, tuple[str, str]]] = {}
    for j, rejection in duplicates.items():
        unit, row = where[j]
        verdicts.setdefault(unit, {})[row] = (rejection.stage, rejection.reason)
    todo = {}
    for unit in units:
        if layout.is_committed(unit.id):
            continue
        table = tables[unit.id]
        stages, reasons = table.column("stage").to_pylist(), table.column("reason").to_pylist()
        for row, (stage, reason) in verdicts.get(unit.id, {}).items():
            stages[row], reasons[row] = stage, reason
        plan = pa.table({"ordinal": table.column("ordinal"), "key": table.column("key"),
                         "source": table.column("source"), "source_id": table.column("source_id"),
                         "stage": pa.array(stages, pa.string()), "reason": pa.array(reasons, pa.string())},
                        schema=PLAN_SCHEMA)
        write_parquet(layout.plan(unit.id), plan)
        todo[unit.id] = stages.count("")
    return todo


# ---- the Ray Data job ---------------------------------------------------------------------------------------------
def _model_stage_args(resources: StageResources, cluster_gpus: float) -> dict:
    from ray.data import ActorPoolStrategy

    gpus = resources.num_gpus if resources.num_gpus != "auto" else (1.0 if cluster_gpus else 0.0)
    if resources.concurrency == "auto":
        most = max(1, int(cluster_gpus // gpus)) if gpus else 1
        compute = ActorPoolStrategy(min_size=1, max_size=most)
    else:
        compute = ActorPoolStrategy(size=resources.concurrency)
    return {"compute": compute, "num_gpus": gpus, "num_cpus": resources.num_cpus,
            "batch_size": resources.batch_size, "batch_format": "numpy"}


def _unit_dataset(units: list[WorkUnit]):
    import ray.data

    # One block per unit: every unit is its own task, so all workers of a cluster share the units.
    return ray.data.from_items([u.to_row() for u in units], override_num_blocks=max(1, len(units)))


def run_screen(layout: DatasetLayout, source, units: list[WorkUnit], config: CurateConfig) -> None:
    from tqdm import tqdm

    todo = [u for u in units if not layout.is_screened(u.id)]
    if not todo:
        return
    stage = ScreenStage(source, layout.root, config.filters, config.min_side)
    ds = _unit_dataset(todo).map(stage, num_cpus=config.ray.read_num_cpus)
    with tqdm(total=len(todo), desc="screen units", unit="unit", disable=not config.ray.progress) as bar:
        for _ in ds.iter_rows():
            bar.update()


def build_encode_dataset(layout: DatasetLayout, source, units: list[WorkUnit], config: CurateConfig,
                         cluster_gpus: float):
    """The streaming encode DAG over `units`; its rows are the writer's per-unit summaries."""
    ds = _unit_dataset(units).flat_map(
        BucketStage(source, layout.root, config.buckets, config.filters.max_pixels,
                    config.caption.image_size if config.caption else None),
        num_cpus=config.ray.read_num_cpus)
    aesthetic = config.filters.aesthetic
    if aesthetic is not None:
        ds = ds.map_batches(AestheticStage, fn_constructor_kwargs={"config": aesthetic},
                            **_model_stage_args(config.ray.aesthetic, cluster_gpus))
    if config.caption is not None:
        c = config.caption
        resources = StageResources(batch_size=c.batch_size, concurrency=c.concurrency, num_gpus=c.num_gpus,
                                   num_cpus=c.num_cpus)
        ds = ds.map_batches(CaptionStage, fn_constructor_kwargs={"config": c, "source_caption": c.source_caption},
                            **_model_stage_args(resources, cluster_gpus))
    v = config.vae
    ds = ds.map_batches(VaeStage, fn_constructor_kwargs={"model": v.model, "model_class": v.model_class,
                                                         "subfolder": v.subfolder, "dtype": v.dtype},
                        **_model_stage_args(config.ray.vae, cluster_gpus))
    t5 = config.t5
    if t5 is not None and t5.captions:
        ds = ds.map_batches(T5Stage, fn_constructor_kwargs={
            "model": t5.model, "captions": t5.captions, "max_length": t5.max_length, "dtype": t5.dtype,
            "tokenizer_subfolder": t5.tokenizer_subfolder, "encoder_subfolder": t5.encoder_subfolder},
            **_model_stage_args(config.ray.t5, cluster_gpus))
    return ds.map_batches(UnitWriter(layout.root), batch_size=None, batch_format="numpy",
                          num_cpus=config.ray.write_num_cpus)


def check_resources(config: CurateConfig, cluster: dict) -> None:
    """Actors asking for more than the cluster has would wait forever: say which setting to change instead."""
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    stages = {"caption": config.caption} if config.caption else {}
    if config.filters.aesthetic is not None:
        stages["ray.aesthetic"] = config.ray.aesthetic
    stages["ray.vae"] = config.ray.vae
    if config.t5 is not None and config.t5.captions:
        stages["ray.t5"] = config.ray.t5
    for name, stage in stages.items():
        wanted = 0 if stage.num_gpus == "auto" else stage.num_gpus
        if wanted > gpus:
            raise ConfigError(f"{name}.num_gpus is {wanted} but the Ray cluster has {gpus} GPUs; set "
                              f"{name}.num_gpus: 0 to run that stage on CPU")
    # Each model stage keeps at least one actor; the reading and writing tasks need room beside them.
    actors = sum(s.num_cpus * (s.concurrency if isinstance(s.concurrency, int) else 1) for s in stages.values())
    tasks = max(config.ray.read_num_cpus, config.ray.write_num_cpus)
    if actors + tasks > cpus:
        raise ConfigError(f"the model stages' actors need {actors:g} CPUs and the read/write tasks {tasks:g}, but "
                          f"the Ray cluster has {cpus:g}; lower {', '.join(f'{n}.num_cpus' for n in stages)} "
                          f"(fractions such as 0.25 are fine) or ray.read_num_cpus / ray.write_num_cpus")


def run_encode(layout: DatasetLayout, source, units: list[WorkUnit], config: CurateConfig) -> None:
    import ray
    from tqdm import tqdm

    if not units:
        return
    cluster = ray.cluster_resources()
    if config.ray.check_resources:
        check_resources(config, cluster)
    ds = build_encode_dataset(layout, source, units, config, cluster.get("GPU", 0))
    pending = {u.id for u in units}
    with tqdm(total=len(units), desc="commit units", unit="unit", disable=not config.ray.progress) as bar:
        for row in ds.iter_rows():
            if row["committed"] and row["unit"] in pending:
                pending.discard(row["unit"])
                remove_staging(layout, row["unit"])
                bar.update()
    # Safety net: a unit whose completing part raced with another writer's check commits here.
    still = []
    for unit in sorted(pending):
        try:
            if not try_commit(layout, unit):
                still.append(unit)
        except IncompleteUnitError as err:
            still.append(f"{unit} ({err})")
    if still:
        raise RuntimeError(f"{len(still)} units could not be committed, e.g. {still[:3]}; run the job again to "
                           f"re-encode them (committed units are kept)")
    for unit in pending:
        remove_staging(layout, unit)


def _card_info(layout: DatasetLayout, units: list[WorkUnit], config: CurateConfig) -> dict:
    """Card fields beyond the counts: models, and what only a written sample tells (latent channels, captions)."""
    import pyarrow.parquet as pq

    t5 = config.t5 if config.t5 is not None and config.t5.captions else None
    v = config.vae
    # The autoencoder's latent space, from its config: the trainer normalizes the stored latents with it.
    vae = {"model": v.model, "model_class": v.model_class, "subfolder": v.subfolder,
           **check_vae(v.model, v.model_class, v.subfolder, config.buckets.table()).to_card()}
    names = {n for u in units for n in pq.read_schema(layout.manifest_part(u.id)).names}
    return {"captions": sorted(n[len("caption_"):] for n in names if n.startswith("caption_")),
            "encoded_captions": list(t5.captions) if t5 else [],
            "text_encoder": {"model": t5.model, "max_length": t5.max_length} if t5 else None,
            "vae": vae, "bucket_table": {"resolution": config.buckets.resolution,
                                         "multiple": config.buckets.resolved_multiple}}


def run(config: CurateConfig) -> dict:
    """Run (or resume) the job; returns the dataset card."""
    from pipelines.ray_cluster import init_ray

    check_vae(config.vae.model, config.vae.model_class, config.vae.subfolder, config.buckets.table())
    layout = DatasetLayout(config.output)
    layout.root.mkdir(parents=True, exist_ok=True)
    source = build_source(config.source)
    units = source.list_units(layout.work)
    ids = [u.id for u in units]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"source {config.source.kind}: two inputs map to the same unit id; rename one")
    check_job(layout, config, units)

    init_ray(num_cpus=config.ray.num_cpus, object_store_memory=config.ray.object_store_memory)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = config.ray.progress

    run_screen(layout, source, units, config)
    todo = plan_units(layout, units, config)
    for unit, count in todo.items():
        if count == 0:  # everything rejected before encoding: commit now, nothing to stream
            commit_unit(layout, unit, [], [row for row in read_plan(layout, unit) if row["stage"]])
    encode = [u for u in units if todo.get(u.id, 0) > 0 and not layout.is_committed(u.id)]
    # Leftovers of an interrupted attempt: parts of units committed since, or to be re-encoded from scratch.
    for unit in units:
        remove_staging(layout, unit.id)
    run_encode(layout, source, encode, config)
    card = finalize(layout, ids, dump_config(config), _card_info(layout, units, config))
    plot_card(card, layout.root / "dataset_card.png")
    for unit in units:
        remove_staging(layout, unit.id)
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.curate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/curation/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, CurateConfig, args.overrides)
        card = run(config)
    except (ConfigError, MissingModelError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = card["counts"]
    print(f"curated {config.output}: seen {counts['seen']}, accepted {counts['accepted']}, rejected "
          f"{counts['rejected']} {counts['rejected_by_reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
