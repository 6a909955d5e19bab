"""Recaption images with LLaVA on Ray workers: the images of a curated dataset (its manifest gains a caption
column) or every image of a source.

    ray job submit --working-dir . -- python -m pipelines.recaption --config configs/recaption/sa1b_vllm.yaml
    python -m pipelines.recaption --config configs/recaption/folder_cpu.yaml [--set section.field=value]

The DAG: plan (driver) -> ReadUnits (CPU tasks: read a source unit, keep the wanted samples, decode, shrink) ->
CaptionImages (actors holding a captioner, `caption.num_gpus` GPUs each) -> UnitCommitter (driver: one parquet
part per unit, written atomically).

Input. A curated dataset holds latents, not pixels (docs/SHARD_FORMAT.md), so the job re-reads the images from the
source it was curated from: `input.source` is the curation config's `source` section, unchanged. Its work units
name the dataset's shards (`shards/<unit>.tar`), so each unit is read once and its samples are joined to the
manifest by key (`make_key(source, source_id)`, what both sides compute). Without `input.dataset`, every sample
of the source is captioned.

Output (`output`, default `<dataset>/recaption_<name>`):

    parts/<unit>.parquet   key, unit, source, source_id, caption_<name>, ok, reason, attempts, provenance (JSON)
    captions.parquet       all parts, written when every unit is committed
    manifest.parquet       with a dataset: its manifest plus caption_<name> (null where captioning failed)
    recaption_card.json    counts (seen = captioned + failed; failures by reason), provenance, config, versions
    job.json               what this folder is being filled with; resuming it under other settings is refused

Exactly once: a unit is done exactly when parts/<unit>.parquet exists (written to a temp name, then renamed), so a
killed job rerun with the same command skips committed units and redoes the others. The dataset is only read.

Not done here: re-encoding the new captions with T5. The shards keep the T5 features encoded at curation time; to
train on LLaVA captions, put the `caption` section (same fields) in the curation config, where the T5 stage
encodes the new caption.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
from pydantic import Field, model_validator

from curation.captioners.config import CaptionStageConfig
from common.durable import atomic_write_bytes, sweep_temp
from curation.failures import describe, map_isolated, sample_rejection
from curation.sources.base import Rejection
from common.versions import library_versions
from curation.shard_format import read_manifest
from curation.sources import SourceConfig, WorkUnit
from common.config import ConfigError, StrictModel, dump_config, load_config
from pipelines.job import (Stage, StageResources, UnitsFailed, bind_output, captioner_needs, check_captioner_fits,
                           check_output_location,
                           claimed_output, digest, explain_actor_warning, fit_stages, is_committed, parquet_bytes,
                           resolve_models, run_main, write_parquet)

log = logging.getLogger("pipelines.recaption")

PARTS_DIR = "parts"
CAPTIONS_FILE = "captions.parquet"
MANIFEST_FILE = "manifest.parquet"
CARD_FILE = "recaption_card.json"
SOURCE_INDEX_DIR = "source_index"

# A row's `reason` when its unit is missing from the source or its sample from the unit.
NO_UNIT, NO_IMAGE = "source_unit_missing", "image_missing"


# --- config ---------------------------------------------------------------------------------------------------


class InputConfig(StrictModel):
    source: SourceConfig = Field(description="the curation config's source section (the images)")
    dataset: Path | None = Field(None, description="a curated dataset: caption its manifest rows; None: the whole source")
    source_caption: str = Field("original", description="caption to inject when caption.inject_source_caption "
                                                        "(manifest column caption_<name>, or the source's caption)")


class RayConfig(StrictModel):
    address: str | None = Field(None, description="None: RAY_ADDRESS (ray job submit), else a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray")
    object_store_memory: int | None = Field(None, ge=75 * 2**20)
    read_num_cpus: float = Field(1.0, gt=0, description="CPUs per read task")


class RecaptionConfig(StrictModel):
    input: InputConfig
    caption: CaptionStageConfig = Field(default_factory=CaptionStageConfig)
    output: Path | None = Field(None, description="default: <dataset>/recaption_<caption.name>")
    max_image_side: int | None = Field(
        1024, ge=64, description="images are shrunk to fit (aspect kept) before they travel to the captioning "
                                 "workers, whose processor then does the model's own preprocessing; None: originals")
    read_block_rows: int = Field(16, ge=1, description="decoded images per block a read task hands on")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _output_known(self):
        if self.output is None:
            if self.input.dataset is None:
                raise ValueError("output must be set when there is no input.dataset")
            self.output = self.input.dataset / f"recaption_{self.caption.name}"
        return self


# --- planning (driver) ----------------------------------------------------------------------------------------


def wanted_by_unit(cfg: RecaptionConfig) -> dict[str, dict[str, list]]:
    """Dataset mode: unit -> {key: [source, source_id, source caption]} from the manifest (unit = shard name)."""
    manifest = read_manifest(cfg.input.dataset)
    column = f"caption_{cfg.input.source_caption}"
    captions = manifest.column(column).to_pylist() if column in manifest.column_names else [None] * manifest.num_rows
    keys = manifest.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        raise ValueError(f"the manifest of {cfg.input.dataset} lists {len(keys) - len(set(keys))} keys more than once")
    wanted: dict[str, dict[str, list]] = defaultdict(dict)
    for key, shard, source, source_id, caption in zip(
            keys, manifest.column("shard").to_pylist(), manifest.column("source").to_pylist(),
            manifest.column("source_id").to_pylist(), captions):
        wanted[Path(shard).name.split(".")[0]][key] = [source, source_id, caption]
    return dict(wanted)


def committed_units(out: Path) -> set[str]:
    parts = out / PARTS_DIR
    if not parts.is_dir():
        return set()
    sweep_temp(parts)  # temp parts of a dead attempt
    return {p.stem for p in parts.glob("*.parquet") if not p.name.startswith(".") and is_committed(p)}


def caption_fingerprint(caption: CaptionStageConfig) -> dict:
    """The settings that decide what a caption says (not where or on how many workers it is made)."""
    return caption.model_dump(mode="json", include={
        "backend", "name", "model", "prompt", "source_prompt", "inject_source_caption", "chat_template",
        "max_new_tokens", "min_new_tokens", "quality", "options"}) | {
        "sampling_schedule": [s.model_dump() for s in caption.sampling_schedule()]}


# --- stages (plain classes; Ray runs them, they do not know it) -------------------------------------------------

# Rows between stages: key, unit, source, source_id, source_caption, image (uint8 HWC, empty when absent), error
# ("" when the image is fine, else why it cannot be captioned) and unit_rows: -1 on sample rows; on the one
# end-of-unit row a read task emits after a unit's last sample, the number of sample rows the unit produced.
ROW_COLUMNS = ("key", "unit", "source", "source_id", "source_caption", "image", "error", "unit_rows")


def _rows_to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    batch = {}
    for column in ROW_COLUMNS:
        values = [row[column] for row in rows]
        if column == "unit_rows":
            batch[column] = np.array(values, dtype=np.int64)
        else:
            batch[column] = np.empty(len(values), dtype=object)
            batch[column][:] = values  # element-wise: images of different sizes stay separate arrays
    return batch


_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)


class ReadUnits:
    """Read whole source units; emit the wanted samples decoded (EXIF-oriented RGB, shrunk to `max_side`) in
    blocks of `block_rows`, a row with the reason for each wanted sample that cannot be captioned, then one
    end-of-unit row. Without a wanted list every sample of the unit is wanted."""

    def __init__(self, source: dict, max_side: int | None, block_rows: int, source_caption: str):
        from pydantic import TypeAdapter

        self.source = TypeAdapter(SourceConfig).validate_python(source).build()
        self.max_side = max_side
        self.block_rows = block_rows
        self.source_caption = source_caption

    def image(self, data: bytes | None) -> np.ndarray:
        from PIL import Image

        from curation.images import decode

        side = self.max_side
        picture, _ = decode(data or b"", min_size_hw=(side, side) if side else None)
        if side and max(picture.size) > side:
            picture.thumbnail((side, side), Image.Resampling.BICUBIC)
        return np.asarray(picture)

    def read_unit(self, unit: WorkUnit, wanted: dict[str, list] | None) -> Iterator[dict]:
        seen: set[str] = set()
        for sample in self.source.iter_unit(unit):
            if (wanted is not None and sample.key not in wanted) or sample.key in seen:
                continue  # not in the dataset (filtered at curation), or a repeat of a sample already read
            seen.add(sample.key)
            caption = wanted[sample.key][2] if wanted is not None else sample.captions.get(self.source_caption)
            row = {"key": sample.key, "unit": unit.id, "source": sample.source, "source_id": sample.source_id,
                   "source_caption": caption, "image": _NO_IMAGE, "error": "", "unit_rows": -1}
            if sample.reject is not None:
                row["error"] = f"{sample.reject.stage}: {sample.reject.reason}"
            else:
                try:
                    row["image"] = self.image(sample.data)
                except Exception as err:  # noqa: BLE001 - one sample never stops the job
                    rejection = sample_rejection("decode_error", sample.key, err)
                    row["error"] = f"{rejection.stage}: {rejection.reason}"
            yield row
        for key in sorted(set(wanted or ()) - seen):
            source, source_id, caption = wanted[key]
            yield {"key": key, "unit": unit.id, "source": source, "source_id": source_id, "source_caption": caption,
                   "image": _NO_IMAGE, "error": NO_IMAGE, "unit_rows": -1}

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for unit_json, wanted_json in zip(batch["unit"], batch["wanted"]):
            unit = WorkUnit.from_row(json.loads(unit_json))
            wanted = json.loads(wanted_json) if wanted_json else None
            rows, count, failure = [], 0, ""
            try:
                for row in self.read_unit(unit, wanted):
                    rows.append(row)
                    count += 1
                    if len(rows) == self.block_rows:
                        yield _rows_to_batch(rows)
                        rows = []
            except Exception as err:  # noqa: BLE001 - the unit fails (listed at the end), the others go on
                failure = f"read: {describe(err)}"
                log.error("unit %s failed: %s", unit.id, failure, exc_info=True)
            # The end-of-unit row: how many sample rows the unit produced, or (in `error`) why it failed.
            rows.append({"key": "", "unit": unit.id, "source": "", "source_id": "", "source_caption": None,
                         "image": _NO_IMAGE, "error": failure, "unit_rows": count})
            yield _rows_to_batch(rows)


class CaptionImages:
    """Caption a batch with the configured captioner (built once per worker). Rows that arrive with an error
    pass through as failures with that reason and 0 attempts; end-of-unit rows pass through untouched."""

    def __init__(self, caption: dict):
        self.captioner = CaptionStageConfig.model_validate(caption).build()
        self.provenance = json.dumps(self.captioner.provenance(), sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        n = len(batch["key"])
        text: list[str | None] = [None] * n
        ok = [False] * n
        reason: list[str | None] = [str(e) or None for e in batch["error"]]
        attempts = [0] * n
        todo = [i for i in range(n) if batch["unit_rows"][i] < 0 and not batch["error"][i]]
        if todo:
            def caption(items):
                images, sources, metas = zip(*items) if items else ((), (), ())
                return self.captioner(list(images), list(sources), list(metas))

            items = [(Image.fromarray(np.asarray(batch["image"][i], dtype=np.uint8)),
                      _text(batch["source_caption"][i]) or None,
                      {"key": batch["key"][i], "source": batch["source"][i]}) for i in todo]
            results = map_isolated(caption, items, "caption", [str(batch["key"][i]) for i in todo])
            for i, result in zip(todo, results):
                if isinstance(result, Rejection):
                    reason[i] = f"{result.stage}: {result.reason}"
                    continue
                text[i], ok[i], reason[i], attempts[i] = result.text, result.ok, result.reason, result.attempts
        return {
            "key": batch["key"], "unit": batch["unit"], "source": batch["source"], "source_id": batch["source_id"],
            "unit_rows": batch["unit_rows"],
            "caption": np.array(text, dtype=object), "ok": np.array(ok, dtype=bool),
            "reason": np.array(reason, dtype=object), "attempts": np.array(attempts, dtype=np.int32),
            "provenance": np.array([self.provenance] * n, dtype=object),
        }


# --- commit (driver) --------------------------------------------------------------------------------------------


def _text(value) -> str | None:
    # Ray Data may turn an all-None text column into floats (NaN) on the way: only a str is a text
    return value if isinstance(value, str) else None


def part_schema(caption_name: str):
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("unit", pa.string()), ("source", pa.string()),
                      ("source_id", pa.string()), (f"caption_{caption_name}", pa.string()), ("ok", pa.bool_()),
                      ("reason", pa.string()), ("attempts", pa.int32()), ("provenance", pa.string())])


def write_part(out: Path, unit: str, rows: list[dict], caption_name: str) -> None:
    import pyarrow as pa

    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["key"]), schema=part_schema(caption_name))
    write_parquet(out / PARTS_DIR / f"{unit}.parquet", table)


class UnitCommitter:
    """Gathers caption rows by unit; a unit is written as parts/<unit>.parquet (atomically) once its end-of-unit
    row and as many sample rows as it announces are in, whichever arrives last."""

    def __init__(self, out: Path, caption_name: str):
        self.out = out
        self.caption_name = caption_name
        self.column = f"caption_{caption_name}"
        self.rows: dict[str, dict[str, dict]] = defaultdict(dict)
        self.expected: dict[str, int] = {}
        self.failed: dict[str, str] = {}

    def add(self, batch: dict[str, np.ndarray]) -> list[str]:
        """Take a batch of results; returns the units it completed (and committed)."""
        touched = []
        for i, unit in enumerate(batch["unit"]):
            unit = str(unit)
            touched.append(unit)
            if int(batch["unit_rows"][i]) >= 0:
                if _text(batch["reason"][i]):  # the unit could not be read: nothing of it is committed
                    self.failed[unit] = _text(batch["reason"][i])
                    continue
                self.expected[unit] = int(batch["unit_rows"][i])
                continue
            key = str(batch["key"][i])
            if key in self.rows[unit]:
                raise RuntimeError(f"key {key} of unit {unit} arrived twice in one run")
            self.rows[unit][key] = {
                "key": key, "unit": unit, "source": str(batch["source"][i]), "source_id": str(batch["source_id"][i]),
                self.column: _text(batch["caption"][i]), "ok": bool(batch["ok"][i]), "reason": _text(batch["reason"][i]),
                "attempts": int(batch["attempts"][i]), "provenance": str(batch["provenance"][i]),
            }
        for unit in self.failed:
            self.rows.pop(unit, None)
        done = [u for u in dict.fromkeys(touched) if self.expected.get(u) == len(self.rows.get(u, ()))]
        for unit in done:
            write_part(self.out, unit, list(self.rows.pop(unit, {}).values()), self.caption_name)
            del self.expected[unit]
        return done

    def unfinished(self) -> dict[str, str]:
        """Units not committed: unit -> why."""
        out = {unit: "not all of its rows came back from the captioning stage"
               for unit in set(self.rows) | set(self.expected)}
        return out | self.failed


# --- the job ----------------------------------------------------------------------------------------------------


def caption_stage(caption: CaptionStageConfig) -> Stage:
    return Stage("caption", StageResources(batch_size=caption.batch_size, concurrency=caption.concurrency,
                                           num_gpus=caption.num_gpus, num_cpus=caption.num_cpus))


def caption_units(cfg: RecaptionConfig, units: list[WorkUnit], wanted: dict | None, resources: dict) -> dict:
    """Run the Ray Data DAG over `units` and commit each unit as its last row comes back. Returns the units that
    could not be committed (unit -> reason); every other unit is committed."""
    import ray
    from tqdm import tqdm

    items = [{"unit": json.dumps(u.to_row()), "wanted": json.dumps(wanted[u.id]) if wanted is not None else ""}
             for u in units]
    reader = ReadUnits(cfg.input.source.model_dump(mode="json"), cfg.max_image_side, cfg.read_block_rows,
                       cfg.input.source_caption)
    committer = UnitCommitter(cfg.output, cfg.caption.name)
    explain_actor_warning(resources)
    ds = (
        ray.data.from_items(items, override_num_blocks=len(items))
        # an instance, not the class: reading runs as stateless tasks that Ray Data scales freely
        .map_batches(reader, batch_size=1, batch_format="numpy", num_cpus=cfg.ray.read_num_cpus)
        .map_batches(CaptionImages, fn_constructor_kwargs={"caption": cfg.caption.model_dump(mode="json", exclude_unset=True)},
                     batch_format="numpy", **resources["caption"])
    )
    pictures = sum(len(wanted[u.id]) for u in units) if wanted is not None else None
    with tqdm(total=pictures, desc="caption", unit="picture") as bar:
        committed = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            committed += len(committer.add(batch))
            bar.update(int((np.asarray(batch["unit_rows"]) < 0).sum()))
            bar.set_postfix(units=f"{committed}/{len(units)}", refresh=False)
    return committer.unfinished()


def consolidate(cfg: RecaptionConfig) -> dict:
    """captions.parquet from the parts, manifest.parquet with the new column (dataset mode), the card."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, column = cfg.output, f"caption_{cfg.caption.name}"
    parts = sorted(p for p in (out / PARTS_DIR).glob("*.parquet") if not p.name.startswith("."))
    captions = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by([("unit", "ascending"), ("key", "ascending")])
    keys = captions.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"committed parts hold {len(keys)} rows for {len(set(keys))} keys")
    if cfg.input.dataset is not None:
        manifest = read_manifest(cfg.input.dataset)
        if set(keys) != set(manifest.column("key").to_pylist()):
            raise RuntimeError(f"committed parts hold {len(keys)} keys, the manifest {manifest.num_rows}")
        if column in manifest.column_names:
            log.warning("the dataset's manifest already has %s: the updated manifest replaces it", column)
            manifest = manifest.drop_columns([column])
        # a lookup, not Table.join: it keeps the manifest's row order and its all-null columns (class_label)
        by_key = dict(zip(keys, captions.column(column).to_pylist()))
        new = pa.array([by_key[k] for k in manifest.column("key").to_pylist()], pa.string())
        atomic_write_bytes(out / MANIFEST_FILE, parquet_bytes(manifest.append_column(column, new)))
    atomic_write_bytes(out / CAPTIONS_FILE, parquet_bytes(captions))

    ok = captions.column("ok").to_pylist()
    # "decode_error: undecodable image: ..." counts as decode_error; the rows keep the details
    reasons = Counter(r.split(":")[0] for r, good in zip(captions.column("reason").to_pylist(), ok) if not good)
    provenance = next((json.loads(p) for p in captions.column("provenance").to_pylist() if p), None)
    card = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "caption": cfg.caption.name,
        "counts": {"seen": len(keys), "captioned": sum(ok), "failed": len(ok) - sum(ok),
                   "failed_by_reason": dict(sorted(reasons.items())),
                   "attempts": {str(k): v for k, v in sorted(Counter(captions.column("attempts").to_pylist()).items())}},
        "provenance": provenance,
        "t5_reencoded": False,  # see the module docs: the shards keep the T5 features of curation time
        "config": dump_config(cfg),
        "versions": library_versions(),
    }
    atomic_write_bytes(out / CARD_FILE, json.dumps(card, indent=2, default=str).encode())
    return card


def preflight(cfg: RecaptionConfig) -> tuple[list[WorkUnit], dict | None, dict]:
    """Before any work and before job.json: the captioner's model resolves, the output can be written, the input
    lists, the cluster fits the captioning stage. Raises ConfigError naming the field."""
    from pipelines.ray_cluster import init_ray
    from pipelines.submit_paths import check_job_paths

    check_job_paths(cfg, outputs=["output"])

    resolve_models(captioner_needs("caption", cfg.caption))
    check_output_location("output", cfg.output)
    try:
        units = cfg.input.source.build().list_units(cfg.output / SOURCE_INDEX_DIR)
        wanted = wanted_by_unit(cfg) if cfg.input.dataset is not None else None
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"input: {err}") from None
    ray = init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory)
    cluster = ray.cluster_resources()
    check_captioner_fits("caption", cfg.caption, cluster)
    resources = fit_stages([caption_stage(cfg.caption)], cluster, cfg.ray.read_num_cpus)
    return units, wanted, resources


def run(cfg: RecaptionConfig) -> dict:
    """Caption every wanted image that no committed part holds yet, then consolidate. Returns the card; raises
    UnitsFailed (after every other unit is committed) when some units could not be read."""
    with claimed_output(cfg.output):
        units, wanted, resources = preflight(cfg)
        listing = [u.identity() for u in units] if wanted is None else sorted((u, sorted(k)) for u, k in wanted.items())
        bind_output(cfg.output, caption_fingerprint(cfg.caption), digest(listing), len(listing), "caption.")
    done = committed_units(cfg.output)
    if wanted is not None:
        listed = {u.id for u in units}
        for unit in sorted(set(wanted) - listed - done):  # the source no longer has this shard's unit
            rows = [{"key": k, "unit": unit, "source": s, "source_id": i, f"caption_{cfg.caption.name}": None,
                     "ok": False, "reason": NO_UNIT, "attempts": 0, "provenance": None}
                    for k, (s, i, _) in wanted[unit].items()]
            write_part(cfg.output, unit, rows, cfg.caption.name)
        units = [u for u in units if u.id in wanted]
    pending = [u for u in units if u.id not in done]
    log.info("%d units, %d already committed, %d to caption", len(units), len(units) - len(pending), len(pending))
    if pending:
        failed = caption_units(cfg, pending, wanted, resources)
        if failed:
            raise UnitsFailed("recaption", failed)
    return consolidate(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file (configs/recaption/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set caption.batch_size=32 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def body():
        cfg = load_config(args.config, RecaptionConfig, args.overrides)
        card = run(cfg)
        print(json.dumps({"output": str(cfg.output), **card["counts"]}, indent=2))

    return run_main("recaption", body)


if __name__ == "__main__":
    sys.exit(main())
