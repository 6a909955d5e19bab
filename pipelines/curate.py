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
import sys

from pydantic import Field, field_validator

from curation.buckets import BucketConfig, BucketStage
from curation.captioners.config import CaptionStageConfig
from curation.dedup import Candidate, find_duplicates
from curation.filters import FilterConfig, ScreenStage
from common.pretrained import DEFAULT_T5, DEFAULT_VAE, T5_MAX_LENGTH
from curation.failures import IsolatedStage, clear_failed, read_failed
from curation.shard_format import CAPTION_NAME_PATTERN
from curation.sources import SourceConfig, WorkUnit, build_source
from curation.writer import (PLAN_SCHEMA, SCREEN_SCHEMA, DatasetLayout, IncompleteUnitError, UnitWriter, commit_unit,
                             finalize, plot_card, read_plan, remove_staging, try_commit, write_parquet)
from common.config import ConfigError, StrictModel, dump_config, load_config
from pipelines.job import (IMAGE_PROCESSOR, TRANSFORMERS_MODEL, ModelNeed, Stage, StageResources, UnitsFailed,
                           bind_output, captioner_needs, check_captioner_fits, check_output_location, claimed_output,
                           diffusers_needs, digest, explain_actor_warning, fit_stages, resolve_models, run_main,
                           t5_needs)

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


class RayConfig(StrictModel):
    """Performance knobs only: nothing here changes the output, so a resumed job may change them."""

    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (ignored when joining a cluster)")
    object_store_memory: int | None = Field(None, ge=75 * 2**20)
    read_num_cpus: float = Field(1.0, gt=0, description="CPUs per screen/read task")
    write_num_cpus: float = Field(1.0, gt=0, description="CPUs per staging/commit task")
    progress: bool = Field(True, description="Ray Data progress bars")
    check_resources: bool = Field(True, description="refuse to start when the cluster lacks the GPUs/CPUs the "
                                  "stages ask for (turn off on a cluster that autoscales from zero)")
    max_errored_blocks: int = Field(-1, ge=-1, description="Ray Data blocks whose task may fail (a crashed "
                                    "worker) before the job stops; their units are listed as failed and retried by "
                                    "a rerun. -1: any number")
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
        tree["buckets"].pop("keep_pixels", None)  # decode once or twice: the same output
        return tree


# ---- preflight ------------------------------------------------------------------------------------------------------
def model_needs(config: CurateConfig) -> list[ModelNeed]:
    """Every model the job will load, with the config field that names it."""
    v = config.vae
    needs = [diffusers_needs("vae.model", v.model, v.model_class, v.subfolder, "VAE")]
    if config.t5 is not None and config.t5.captions:
        needs += t5_needs("t5.model", config.t5.model, config.t5.tokenizer_subfolder, config.t5.encoder_subfolder)
    if config.filters.aesthetic is not None:
        clip = config.filters.aesthetic.clip_model
        needs += [ModelNeed("filters.aesthetic.clip_model", clip, TRANSFORMERS_MODEL, what="CLIP vision model"),
                  ModelNeed("filters.aesthetic.clip_model", clip, IMAGE_PROCESSOR, what="CLIP image processor")]
    if config.caption is not None:
        needs += captioner_needs("caption", config.caption)
    return needs


def model_stages(config: CurateConfig) -> list[Stage]:
    """The model stages in DAG order, by the config field that sizes them."""
    stages = []
    if config.filters.aesthetic is not None:
        stages.append(Stage("ray.aesthetic", config.ray.aesthetic))
    if config.caption is not None:
        c = config.caption
        stages.append(Stage("caption", StageResources(batch_size=c.batch_size, concurrency=c.concurrency,
                                                      num_gpus=c.num_gpus, num_cpus=c.num_cpus)))
    stages.append(Stage("ray.vae", config.ray.vae))
    if config.t5 is not None and config.t5.captions:
        stages.append(Stage("ray.t5", config.ray.t5))
    return stages


def fit_resources(config: CurateConfig, cluster: dict) -> dict[str, dict]:
    tasks = max(config.ray.read_num_cpus, config.ray.write_num_cpus)
    return fit_stages(model_stages(config), cluster, tasks, "ray.read_num_cpus / ray.write_num_cpus",
                      check=config.ray.check_resources)


def plan_units(layout: DatasetLayout, units: list[WorkUnit], config: CurateConfig) -> dict[str, int]:
    """Pre-encode verdicts for every unit: cheap-filter results plus duplicate decisions across the whole job.

    Writes work/plan/<unit>.parquet for each uncommitted unit and returns unit -> samples left to encode. Only the
    samples that passed the cheap filters become Python objects (the duplicate search needs them all at once).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Only the verdict columns: the screen parts may also hold the kept pixels, which stay on disk for pass 2.
    wanted = [c for c in SCREEN_SCHEMA.names if c != "unit"]

    def verdicts(path):
        present = set(pq.read_schema(path).names)  # screen parts of older runs lack `animated`
        return pq.read_table(path, columns=[c for c in wanted if c in present])

    tables = {u.id: verdicts(layout.screen_part(u.id)) for u in units}
    candidates: list[Candidate] = []
    where: list[tuple[str, int]] = []
    for rank, unit in enumerate(units):
        table = tables[unit.id]
        alive = [i for i, stage in enumerate(table.column("stage").to_pylist()) if not stage]
        picked = table.take(pa.array(alive, pa.int64()))
        columns = [picked.column(c).to_pylist() if c in picked.column_names else [None] * len(alive)
                   for c in ("ordinal", "key", "source_id", "phash", "orig_h", "orig_w", "animated")]
        for i, ordinal, key, source_id, phash, height, width, animated in zip(alive, *columns):
            candidates.append(Candidate(unit.id, rank, ordinal, key, source_id, phash, (height or 0) * (width or 0),
                                        bool(animated)))
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
def _unit_dataset(units: list[WorkUnit]):
    import ray.data

    # One block per unit: every unit is its own task, so all workers of a cluster share the units.
    return ray.data.from_items([u.to_row() for u in units], override_num_blocks=max(1, len(units)))


def run_screen(layout: DatasetLayout, source, units: list[WorkUnit], config: CurateConfig) -> dict[str, str]:
    """Pass 1 over the units not screened yet; returns the units that failed (unit -> reason)."""
    from tqdm import tqdm

    todo = [u for u in units if not layout.is_screened(u.id)]
    if not todo:
        return {}
    layout.sweep([u.id for u in todo])
    for unit in todo:
        clear_failed(layout, unit.id)
    stage = ScreenStage(source, layout.root, config.filters, config.min_side, config.buckets,
                        config.caption.image_size if config.caption else None)
    ds = _unit_dataset(todo).map(stage, num_cpus=config.ray.read_num_cpus)
    failed = {}
    pictures = 0
    with tqdm(total=len(todo), desc="screen", unit="unit", disable=not config.ray.progress) as bar:
        for row in ds.iter_rows():
            pictures += int(row["seen"])
            if row["failed"]:
                failed[row["unit"]] = row["failed"]
            bar.set_postfix(pictures=pictures, refresh=False)
            bar.update()
    # A unit whose task died without a word (a crashed worker) has neither a screen part nor a failure record.
    for unit in todo:
        if not layout.is_screened(unit.id) and unit.id not in failed:
            record = read_failed(layout, unit.id)
            failed[unit.id] = record["reason"] if record else "its screen task did not finish (see the Ray logs)"
    return failed


def build_encode_dataset(layout: DatasetLayout, source, units: list[WorkUnit], config: CurateConfig,
                         resources: dict[str, dict]):
    """The streaming encode DAG over `units`; its rows are the writer's per-unit summaries. Each model stage is
    an IsolatedStage: a sample that breaks a batch is rejected with the stage's name, the others go on."""
    from curation.aesthetic import AestheticStage  # torch: imported once the preflight has passed
    from curation.encoders import CaptionStage, T5Stage, VaeStage

    ds = _unit_dataset(units).flat_map(
        BucketStage(source, layout.root, config.buckets, config.filters.max_pixels,
                    config.caption.image_size if config.caption else None),
        num_cpus=config.ray.read_num_cpus)

    def model_stage(ds, field: str, name: str, stage_cls, **kwargs):
        return ds.map_batches(IsolatedStage, fn_constructor_kwargs={"stage_cls": stage_cls, "stage_name": name,
                                                                    **kwargs},
                              batch_format="numpy", **resources[field])

    if config.filters.aesthetic is not None:
        ds = model_stage(ds, "ray.aesthetic", "aesthetic", AestheticStage, config=config.filters.aesthetic)
    if config.caption is not None:
        ds = model_stage(ds, "caption", "caption", CaptionStage, config=config.caption,
                         source_caption=config.caption.source_caption)
    v = config.vae
    ds = model_stage(ds, "ray.vae", "vae", VaeStage, model=v.model, model_class=v.model_class,
                     subfolder=v.subfolder, dtype=v.dtype)
    t5 = config.t5
    if t5 is not None and t5.captions:
        ds = model_stage(ds, "ray.t5", "t5", T5Stage, model=t5.model, captions=t5.captions,
                         max_length=t5.max_length, dtype=t5.dtype, tokenizer_subfolder=t5.tokenizer_subfolder,
                         encoder_subfolder=t5.encoder_subfolder)
    return ds.map_batches(UnitWriter(layout.root), batch_size=None, batch_format="numpy",
                          num_cpus=config.ray.write_num_cpus)


def run_encode(layout: DatasetLayout, source, units: list[WorkUnit], todo: dict[str, int], config: CurateConfig,
               resources: dict[str, dict]) -> dict[str, str]:
    """Pass 2 over `units`; returns the units that could not be committed (unit -> reason)."""
    from tqdm import tqdm

    if not units:
        return {}
    for unit in units:
        clear_failed(layout, unit.id)
    explain_actor_warning(resources)
    ds = build_encode_dataset(layout, source, units, config, resources)
    pending = {u.id for u in units}
    with tqdm(total=sum(todo[u.id] for u in units), desc="encode", unit="picture",
              disable=not config.ray.progress) as bar:
        for row in ds.iter_rows():
            bar.update(int(row["staged"]))
            if row["committed"] and row["unit"] in pending:
                pending.discard(row["unit"])
                remove_staging(layout, row["unit"])
                layout.drop_kept_pixels(row["unit"])
                bar.set_postfix(units=f"{len(units) - len(pending)}/{len(units)}", refresh=False)
    # Safety net: a unit whose completing part raced with another writer's check commits here.
    failed = {}
    for unit in sorted(pending):
        try:
            if try_commit(layout, unit):
                continue
            record = read_failed(layout, unit)
            failed[unit] = record["reason"] if record else "not all of its samples came back from the model stages"
        except IncompleteUnitError as err:
            failed[unit] = str(err)
    for unit in pending - failed.keys():
        remove_staging(layout, unit)
    return failed


def _card_info(layout: DatasetLayout, units: list[WorkUnit], config: CurateConfig) -> dict:
    """Card fields beyond the counts: models, the autoencoder's latent space, and the captions written."""
    import pyarrow.parquet as pq

    from curation.encoders import check_vae

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


def preflight(config: CurateConfig) -> tuple[DatasetLayout, object, list[WorkUnit], dict[str, dict]]:
    """Everything that can be known before any work: the models resolve, the output location is writable, the
    source lists, the cluster fits the stages. Raises ConfigError (one line per problem) before job.json exists."""
    from pipelines.ray_cluster import init_ray
    from pipelines.submit_paths import check_job_paths

    check_job_paths(config, outputs=["output"])

    from curation.encoders import check_vae

    resolve_models(model_needs(config))
    check_vae(config.vae.model, config.vae.model_class, config.vae.subfolder, config.buckets.table())
    check_output_location("output", config.output)
    layout = DatasetLayout(config.output)
    source = build_source(config.source)
    try:
        units = source.list_units(layout.work)
    except FileNotFoundError as err:  # its message names the field (source.root, source.annotations, ...)
        raise ConfigError(str(err)) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"source: cannot list {config.source.kind} input: {type(err).__name__}: {err}") from None
    ids = [u.id for u in units]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"source {config.source.kind}: two inputs map to the same unit id; rename one")
    ray = init_ray(num_cpus=config.ray.num_cpus, object_store_memory=config.ray.object_store_memory)
    cluster = ray.cluster_resources()
    if config.caption is not None:
        check_captioner_fits("caption", config.caption, cluster)
    resources = fit_resources(config, cluster)
    return layout, source, units, resources


def run(config: CurateConfig) -> dict:
    """Run (or resume) the job; returns the dataset card. Raises UnitsFailed, after finishing every other unit,
    when some units could not be processed."""
    with claimed_output(config.output):
        layout, source, units, resources = preflight(config)
        bind_output(layout.root, config.output_fingerprint(), digest([u.identity() for u in units]), len(units))
    ids = [u.id for u in units]
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = config.ray.progress
    ctx.max_errored_blocks = config.ray.max_errored_blocks

    failed = run_screen(layout, source, units, config)
    if failed:  # the duplicate search spans the whole dataset: planning needs every unit screened
        raise UnitsFailed("curate", {u: f"{r} (no unit is encoded until every unit is screened)"
                                     for u, r in failed.items()})
    todo = plan_units(layout, units, config)
    # Leftovers of an interrupted attempt at the units still to commit: temp files, staged parts.
    layout.sweep(list(todo))
    for unit, count in todo.items():
        if count == 0:  # everything rejected before encoding: commit now, nothing to stream
            commit_unit(layout, unit, [], [row for row in read_plan(layout, unit) if row["stage"]])
    encode = [u for u in units if todo.get(u.id, 0) > 0 and not layout.is_committed(u.id)]
    failed = run_encode(layout, source, encode, todo, config, resources)
    if failed:
        raise UnitsFailed("curate", failed)
    card = finalize(layout, ids, dump_config(config), _card_info(layout, units, config))
    plot_card(card, layout.root / "dataset_card.png")
    for unit in units:
        remove_staging(layout, unit.id)
        layout.drop_kept_pixels(unit.id)
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.curate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/curation/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable)")
    args = parser.parse_args(argv)

    def body():
        config = load_config(args.config, CurateConfig, args.overrides)
        counts = run(config)["counts"]
        print(f"curated {config.output}: seen {counts['seen']} = accepted {counts['accepted']} + rejected "
              f"{counts['rejected']} {counts['rejected_by_reason']}")

    return run_main("curate", body)


if __name__ == "__main__":
    sys.exit(main())
