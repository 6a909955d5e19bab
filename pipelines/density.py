"""Concept-density report (PixArt-alpha Table 1) of one or more caption sources, as a Ray Data job.

    python -m pipelines.density --config configs/density/demo.yaml [--set valid_threshold=5 ...]
    ray job submit --working-dir . -- python -m pipelines.density --config configs/density/example.yaml
    make density-report CONFIG=configs/density/example.yaml

All sources run in one Ray Data job: read_parquet (the caption column only) per source -> union ->
map_batches(CaptionStatsStage) on an actor pool, each batch pre-aggregated to (source, kind, key, count) rows ->
groupby(source, kind, key).sum(count), a distributed hash aggregation, so the driver receives only the summed rows
(distinct nouns and histogram bins), never the captions. Ray Data shows the progress. The report
(curation/density_report.py) is written to `output_dir`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from curation.density import (
    DEFAULT_MAX_WORDS,
    DEFAULT_MIN_ENGLISH_SHARE,
    DEFAULT_VALID_THRESHOLD,
    CaptionStatsStage,
    DensityStats,
    ResolvedSource,
    TaggerUnavailable,
    build_noun_extractor,
    load_tokenizer,
    resolve_source,
)
from curation.density_report import SourceResult, TokenizerInfo, build_figures, render_markdown, write_report
from common.pretrained import DEFAULT_T5, T5_MAX_LENGTH, MissingModelError
from curation.shard_format import CARD_FILE
from common.config import ConfigError, StrictModel, dump_config, load_config
from pipelines.job import (Stage, StageResources, check_output_location, explain_actor_warning, fit_stages,
                           run_main)


class SourceConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="label in the report and file names")
    manifest: str = Field(min_length=1, description="dataset folder (docs/SHARD_FORMAT.md) or a parquet file")
    column: str = Field(min_length=1, description="caption column, e.g. caption_llava")


FROM_DATASET = "from_dataset"


class TokenizerConfig(StrictModel):
    # A hub id or local folder, or "from_dataset": the text encoder named in a source dataset's dataset_card.json
    # (the tokenizer the dataset's captions were encoded with).
    name_or_path: str = DEFAULT_T5
    subfolder: str | None = None  # e.g. "tokenizer" for a diffusers pipeline folder
    max_length: int = Field(T5_MAX_LENGTH, ge=1)  # captions longer than this (with </s>) are truncated in training


class RayConfig(StrictModel):
    address: str | None = None  # None: RAY_ADDRESS (set by `ray job submit`) or a local Ray
    num_cpus: int | None = Field(None, ge=1)  # local Ray only
    object_store_memory: int | None = Field(None, ge=1)  # local Ray only, bytes
    concurrency: int | None = Field(None, ge=1)  # stage actors; default: the cluster's CPUs less one for reading
    batch_size: int = Field(1024, ge=1)  # captions per stage call


class DensityConfig(StrictModel):
    sources: list[SourceConfig] = Field(min_length=1)
    output_dir: str = Field(min_length=1)
    valid_threshold: int = Field(DEFAULT_VALID_THRESHOLD, ge=0)  # valid noun: more than this many occurrences
    tokenizer: TokenizerConfig | None = TokenizerConfig()  # null: skip T5 token figures
    tagger: Literal["auto", "nltk", "pattern"] = "auto"
    top_k: int = Field(50, ge=1)
    max_words: int = Field(DEFAULT_MAX_WORDS, ge=1)  # longer captions are rejected as too_long
    min_english_share: float = Field(DEFAULT_MIN_ENGLISH_SHARE, ge=0.0, le=1.0)
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"sources: names must be unique, repeated: {duplicates}")
        return self


def text_encoder_from_cards(sources: list[SourceConfig]) -> str | None:
    """The text encoder recorded in the first source dataset card that names one (a string, or a dict with a
    `name_or_path`/`model`/`id` entry)."""
    for source in sources:
        card = Path(source.manifest) / CARD_FILE
        try:
            entry = json.loads(card.read_text()).get("text_encoder") if card.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(entry, dict):
            entry = next((entry[k] for k in ("name_or_path", "model", "model_id", "id", "path") if entry.get(k)), None)
        if isinstance(entry, str) and entry:
            return entry
    return None


def check_tokenizer(config: TokenizerConfig | None, sources: list[SourceConfig] = ()) -> TokenizerInfo:
    """Load the tokenizer once on the driver: a failure makes token figures unavailable, with the reason."""
    if config is None:
        return TokenizerInfo(None, False, "no tokenizer configured (tokenizer: null)")
    name = config.name_or_path
    if name == FROM_DATASET:
        name = text_encoder_from_cards(sources)
        if name is None:
            return TokenizerInfo(FROM_DATASET, False, f"tokenizer.name_or_path is {FROM_DATASET!r} but no source "
                                 f"dataset has a {CARD_FILE} naming its text_encoder", config.max_length)
    try:
        load_tokenizer(name, config.subfolder)
    except MissingModelError as err:
        return TokenizerInfo(name, False, str(err), config.max_length)
    return TokenizerInfo(name, True, None, config.max_length)


def resolve_sources(config: DensityConfig) -> dict[str, ResolvedSource]:
    """Each source's files; a ConfigError naming the fields when no source at all can be read."""
    resolved = {s.name: resolve_source(s.manifest, s.column) for s in config.sources}
    if not any(r.available for r in resolved.values()):
        lines = [f"  sources.{i} ({s.name}): manifest {s.manifest!r}, column {s.column!r}: {resolved[s.name].problem}"
                 for i, s in enumerate(config.sources)]
        raise ConfigError("no caption source can be read:\n" + "\n".join(lines))
    return resolved


def _label_captions(batch, source: str, column: str):
    """A source's caption column as (source, caption) rows: one schema for the union of all sources."""
    import pyarrow as pa

    captions = batch.column(column).cast(pa.large_string())
    return pa.table({"source": pa.array([source] * len(captions), pa.string()), "caption": captions})


def stats_stage(config: DensityConfig) -> Stage:
    """The statistics stage, sized by the one policy of pipelines.job: CPU-bound work, so `auto` concurrency fills
    the CPUs the reading leaves."""
    return Stage("ray", StageResources(batch_size=config.ray.batch_size, num_gpus=0, num_cpus="auto",
                                       concurrency=config.ray.concurrency or "auto"), scales_on_cpu=True)


def compute_stats(sources: dict[str, tuple[list[str], str]], stage_options: dict,
                  resources: dict) -> dict[str, DensityStats]:
    """Statistics of every source (name -> (parquet files, caption column)) in one Ray Data job.

    read_parquet (the caption column only) per source -> union -> CaptionStatsStage on an actor pool, each batch
    pre-aggregated -> groupby(source, kind, key).sum(count): a hash aggregation on the cluster, so the driver
    receives only the summed rows (distinct nouns and histogram bins), never the captions.
    """
    import pyarrow.compute as pc
    import ray

    labelled = [
        ray.data.read_parquet(files).select_columns([column]).map_batches(
            _label_captions, fn_kwargs={"source": name, "column": column}, batch_format="pyarrow", batch_size=None)
        for name, (files, column) in sources.items()
    ]
    captions = labelled[0].union(*labelled[1:]) if len(labelled) > 1 else labelled[0]
    rows = captions.map_batches(
        CaptionStatsStage,
        fn_constructor_kwargs={"column": "caption", "source_column": "source", **stage_options},
        batch_format="pyarrow", **resources)
    # One hash partition per stage actor: the summed rows (distinct nouns) are far fewer than the captions.
    summed = rows.groupby(["source", "kind", "key"], num_partitions=resources["compute"].max_size).sum("count")
    stats = {name: DensityStats() for name in sources}
    for batch in summed.iter_batches(batch_format="pyarrow", batch_size=65536):
        for source in pc.unique(batch["source"]).to_pylist():
            part = batch.filter(pc.equal(batch["source"], source))
            stats[source].add_rows(part["kind"].to_pylist(), part["key"].to_pylist(), part["sum(count)"].to_pylist())
    return stats


def run(config: DensityConfig) -> dict[str, Path]:
    """Compute every source's statistics on Ray and write the report; returns the written files."""
    from pipelines.ray_cluster import init_ray

    # Preflight, before any work: the tagger runs, a source can be read, the report can be written, the cluster
    # fits the stage. The tokenizer is optional: without it the token figures say why they are missing.
    try:
        extractor = build_noun_extractor(config.tagger)
    except TaggerUnavailable as err:
        raise ConfigError(f"tagger: {err}") from None
    resolved = resolve_sources(config)
    check_output_location("output_dir", config.output_dir)
    tokenizer = check_tokenizer(config.tokenizer, config.sources)
    if not tokenizer.available:
        print(f"[density] T5 token figures unavailable: {tokenizer.reason}", file=sys.stderr)

    ray = init_ray(address=config.ray.address, num_cpus=config.ray.num_cpus,
                   object_store_memory=config.ray.object_store_memory)
    resources = fit_stages([stats_stage(config)], ray.cluster_resources(), task_cpus=1.0)["ray"]
    concurrency = resources["compute"].max_size
    stage_options = {
        "tagger": config.tagger,
        "tokenizer": tokenizer.name_or_path if tokenizer.available else None,
        "tokenizer_subfolder": config.tokenizer.subfolder if tokenizer.available else None,
        "max_words": config.max_words,
        "min_english_share": config.min_english_share,
    }
    readable = {s.name: (resolved[s.name].files, s.column) for s in config.sources if resolved[s.name].available}
    for source in config.sources:
        where = resolved[source.name]
        if where.available:
            print(f"[density] {source.name}: {where.rows:,} captions ({source.column}) in {len(where.files)} file(s)")
        else:
            print(f"[density] {source.name}: skipped: {where.problem}", file=sys.stderr)
    print(f"[density] {concurrency} stage actor(s), batches of {config.ray.batch_size}", flush=True)
    explain_actor_warning(resources)
    start = time.perf_counter()
    stats = compute_stats(readable, stage_options, resources)
    elapsed = time.perf_counter() - start
    results = []
    for source in config.sources:
        where = resolved[source.name]
        result = SourceResult(source.name, source.manifest, source.column, problem=where.problem)
        if where.available:
            result.stats = stats[source.name]
            # Rows of manifest parts without the column are reported as rejected, so seen still adds up.
            if where.missing_column_rows:
                result.stats.rejected["missing_column"] += where.missing_column_rows
        results.append(result)
    seen = sum(s.seen for s in stats.values())
    rejected = sum(sum(s.rejected.values()) for s in stats.values())
    print(f"[density] {seen:,} captions in {elapsed:.1f} s ({seen / max(elapsed, 1e-9):,.0f} captions/s): "
          f"seen {seen:,} = counted {seen - rejected:,} + rejected {rejected:,}", flush=True)

    figures = build_figures(results, valid_threshold=config.valid_threshold, top_k=config.top_k,
                            tagger=extractor.tagger, lemmatizer=extractor.lemmatizer, tokenizer=tokenizer,
                            config=dump_config(config))
    written = write_report(figures, results, config.output_dir)
    print(render_markdown(figures, []))
    print(f"[density] report: {written['html']}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (configs/density/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set valid_threshold=5 (repeatable)")
    args = parser.parse_args(argv)
    return run_main("density", lambda: run(load_config(args.config, DensityConfig, args.overrides)))


if __name__ == "__main__":
    raise SystemExit(main())
