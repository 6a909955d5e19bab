"""The dataset folder: where each pass writes, how a unit is committed exactly once, and the final files.

Layout (docs/SHARD_FORMAT.md): `shards/<unit>.tar`, `manifest/<unit>.parquet` (the unit's commit marker, written
last), `rejected/<unit>.parquet`, and when the job completes `manifest.parquet`, `rejected.parquet` and
`dataset_card.json`. Resumable work state lives under `work/`:

    work/screen/<unit>.parquet   pass 1: every record of the unit, its cheap-filter verdict and pHash
    work/plan/<unit>.parquet     driver: the unit's final pre-encode verdicts (duplicates included)
    work/staging/<unit>/part-*   pass 2: encoded samples as they arrive (tar) + their keys (json)

Every file is written to a temp name and renamed. A unit's samples stream through the model stages in batches that
mix units, so they are staged as parts; whoever stages the part that completes a unit's plan assembles the unit's
shard (a k-way merge of the parts by key, so order is deterministic and memory bounded) and commits it. Staging is
idempotent: a retried or duplicated part only repeats keys, and each key is written once.

This module also defines the sample rows the stages pass along (dict-of-numpy batches): `key`, `unit`, `meta`
(the shard JSON metadata, as a string), `reject_stage` / `reject_reason` ("" while the sample is alive), `image`
(uint8 [H, W, 3]), then `latent_mean` / `latent_std` and `t5_<name>` as the encoders add them.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.durable import TMP_TAG, atomic_write_bytes, fsync_dir, publish, temp_name
from common.versions import library_versions
from curation.shard_format import (CARD_FILE, FORMAT_VERSION, MANIFEST_DIR, MANIFEST_FILE, REJECTED_DIR,
                                   REJECTED_FILE, SHARDS_DIR, ShardFormatError, ShardSample, iter_shard,
                                   manifest_row, write_shard)

WORK_DIR = "work"

SCREEN_SCHEMA = pa.schema([("unit", pa.string()), ("ordinal", pa.int64()), ("key", pa.string()),
                           ("source", pa.string()), ("source_id", pa.string()), ("stage", pa.string()),
                           ("reason", pa.string()), ("phash", pa.uint64()), ("orig_h", pa.int64()),
                           ("orig_w", pa.int64()), ("animated", pa.bool_())])
PLAN_SCHEMA = pa.schema([("ordinal", pa.int64()), ("key", pa.string()), ("source", pa.string()),
                         ("source_id", pa.string()), ("stage", pa.string()), ("reason", pa.string())])
REJECTED_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("source_id", pa.string()),
                             ("stage", pa.string()), ("reason", pa.string()), ("unit", pa.string())])
MANIFEST_BASE = [("key", pa.string()), ("shard", pa.string()), ("format_version", pa.int64()),
                 ("source", pa.string()), ("source_id", pa.string()), ("bucket_h", pa.int64()),
                 ("bucket_w", pa.int64()), ("latent_h", pa.int64()), ("latent_w", pa.int64()),
                 ("orig_h", pa.int64()), ("orig_w", pa.int64()), ("class_label", pa.int64())]


class IncompleteUnitError(RuntimeError):
    """Staged parts claim samples that cannot be found: the unit must be re-encoded."""


# ---- paths ---------------------------------------------------------------------------------------------------------
class DatasetLayout:
    """Paths of one dataset folder. Holds only the root, so it travels cheaply to workers."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def shard(self, unit: str) -> Path:
        return self.root / SHARDS_DIR / f"{unit}.tar"

    def manifest_part(self, unit: str) -> Path:
        return self.root / MANIFEST_DIR / f"{unit}.parquet"

    def rejected_part(self, unit: str) -> Path:
        return self.root / REJECTED_DIR / f"{unit}.parquet"

    @property
    def work(self) -> Path:
        return self.root / WORK_DIR

    def screen_part(self, unit: str) -> Path:
        return self.work / "screen" / f"{unit}.parquet"

    def plan(self, unit: str) -> Path:
        return self.work / "plan" / f"{unit}.parquet"

    def staging(self, unit: str) -> Path:
        return self.work / "staging" / unit

    def failed_marker(self, unit: str) -> Path:
        return self.work / "failed" / f"{unit}.json"

    def is_committed(self, unit: str) -> bool:
        from pipelines.job import is_committed

        return is_committed(self.manifest_part(unit))

    def is_screened(self, unit: str) -> bool:
        from pipelines.job import is_committed

        return is_committed(self.screen_part(unit))  # the screen part is pass 1's marker, with the same rules

    def drop_kept_pixels(self, unit: str) -> None:
        """Once `unit` is committed, its screen part keeps only the verdicts (the pixels pass 1 kept are spent)."""
        path = self.screen_part(unit)
        if path.is_file() and "pixels" in pq.read_schema(path).names:
            names = [n for n in pq.read_schema(path).names if n not in ("pixels", "caption_pixels")]
            write_parquet(path, pq.read_table(path, columns=names))

    def sweep(self, units: list[str]) -> None:
        """Remove what dead attempts at `units` left: temp files of their outputs and their staged parts. Each
        folder is listed once, however many units (a resumed job of 10,000 units stays linear)."""
        names = {f"{unit}.{ext}" for unit in units for ext in ("tar", "parquet")}
        for folder in (self.root / SHARDS_DIR, self.root / MANIFEST_DIR, self.root / REJECTED_DIR,
                       self.work / "screen", self.work / "plan"):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.startswith(".") and TMP_TAG in entry.name and \
                        entry.name[1:].split(TMP_TAG)[0] in names:
                    entry.unlink(missing_ok=True)
        for unit in units:
            shutil.rmtree(self.staging(unit), ignore_errors=True)


def write_parquet(path: Path, table: pa.Table) -> None:
    """Durable parquet write: temp name in the same folder, fsync, rename, fsync the folder."""
    from pipelines.job import write_parquet as durable

    durable(path, table)


# ---- sample rows ------------------------------------------------------------------------------------------------------
def object_array(items: Iterable) -> np.ndarray:
    """A 1-D object array of arbitrary items (np.array would try to stack equal-shaped arrays)."""
    items = list(items)
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def sample_row(key: str, unit: str, meta: dict, image: np.ndarray | None = None, reject_stage: str = "",
               reject_reason: str = "") -> dict:
    return {"key": key, "unit": unit, "meta": json.dumps(meta, sort_keys=True, ensure_ascii=False),
            "reject_stage": reject_stage, "reject_reason": reject_reason,
            "image": image if image is not None else np.zeros((0, 0, 3), np.uint8)}


class RowBatch:
    """Mutable view of a dict-of-numpy batch: decoded metas, alive mask, rejection. `to_batch()` writes back."""

    def __init__(self, batch: dict):
        self.columns = {name: object_array(values) for name, values in batch.items()}
        self.metas = [json.loads(m) for m in self.columns["meta"]]

    def __len__(self) -> int:
        return len(self.metas)

    def alive(self) -> list[int]:
        return [i for i, stage in enumerate(self.columns["reject_stage"]) if not stage]

    def reject(self, index: int, stage: str, reason: str) -> None:
        self.columns["reject_stage"][index] = stage
        self.columns["reject_reason"][index] = reason

    def to_batch(self) -> dict:
        self.columns["meta"] = object_array(json.dumps(m, sort_keys=True, ensure_ascii=False) for m in self.metas)
        return self.columns


# ---- committing a unit --------------------------------------------------------------------------------------------
def _manifest_table(rows: list[dict]) -> pa.Table:
    fields = list(MANIFEST_BASE)
    known = {name for name, _ in fields}
    extra = sorted({name for row in rows for name in row} - known)
    for name in extra:
        kind = pa.int64() if name.startswith("t5_tokens_") else pa.float64() if name.startswith("score_") else pa.string()
        fields.append((name, kind))
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def commit_unit(layout: DatasetLayout, unit: str, samples: Iterable[ShardSample], rejected: list[dict]) -> dict:
    """Write a unit's shard, rejected part, then manifest part (the commit marker). Returns its counts.

    `samples` may be a stream; they are written in the order given. A unit without accepted samples gets no tar.
    """
    rows: list[dict] = []
    shard_rel = f"{SHARDS_DIR}/{unit}.tar"

    def recorded(stream: Iterable[ShardSample]) -> Iterator[ShardSample]:
        for sample in stream:
            rows.append(manifest_row(sample, shard_rel))
            yield sample

    stream = iter(samples)
    first = next(stream, None)
    if first is not None:
        write_shard(layout.shard(unit), recorded(_chain(first, stream)))
    rejected_rows = [{**{name: row.get(name) for name in REJECTED_SCHEMA.names}, "unit": unit} for row in rejected]
    write_parquet(layout.rejected_part(unit), pa.Table.from_pylist(rejected_rows, schema=REJECTED_SCHEMA))
    write_parquet(layout.manifest_part(unit), _manifest_table(rows))
    return {"unit": unit, "accepted": len(rows), "rejected": len(rejected_rows)}


def _chain(first, rest):
    yield first
    yield from rest


def stage_part(layout: DatasetLayout, unit: str, samples: list[ShardSample], rejected: list[dict]) -> Path:
    """Stage some of a unit's encoded samples and late rejections. The part is named by its keys, so staging the
    same samples again (a retried task) replaces it instead of adding a copy."""
    keys = sorted([s.key for s in samples] + [r["key"] for r in rejected])
    name = "part-" + hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
    folder = layout.staging(unit)
    if samples:
        write_shard(folder / f"{name}.tar", sorted(samples, key=lambda s: s.key))
    sidecar = {"keys": sorted(s.key for s in samples), "rejected": rejected}
    atomic_write_bytes(folder / f"{name}.json", json.dumps(sidecar).encode())  # after the tar: it vouches for it
    fsync_dir(folder.parent)  # the unit's staging folder itself, when this part created it
    return folder / f"{name}.json"


def read_plan(layout: DatasetLayout, unit: str) -> list[dict]:
    return pq.read_table(layout.plan(unit)).to_pylist()


def try_commit(layout: DatasetLayout, unit: str) -> bool:
    """Commit `unit` if every sample its plan sends to encoding has been staged. True when it is committed."""
    if layout.is_committed(unit):
        return True
    plan = read_plan(layout, unit)
    expected = {row["key"] for row in plan if not row["stage"]}
    staged: dict[str, Path] = {}
    late: dict[str, dict] = {}
    folder = layout.staging(unit)
    for sidecar in sorted(folder.glob("part-*.json")) if folder.is_dir() else []:
        try:
            part = json.loads(sidecar.read_text())
        except FileNotFoundError:  # another worker committed this unit and cleaned up meanwhile
            return layout.is_committed(unit)
        except ValueError:  # a damaged part vouches for nothing: its samples count as not staged
            continue
        for key in part["keys"]:
            staged.setdefault(key, sidecar.with_suffix(".tar"))
        for row in part["rejected"]:
            late.setdefault(row["key"], row)
    if not expected <= set(staged) | set(late):
        return False
    accepted = {key for key in expected if key in staged}
    try:
        parts = sorted({staged[key] for key in accepted})
        merged = heapq.merge(*(iter_shard(p) for p in parts), key=lambda s: s.key)
        samples = _unique_samples(merged, accepted)
        by_key = {row["key"]: row for row in plan}
        rejected = [row for row in plan if row["stage"]]
        rejected += [{**late[key], "source": by_key[key]["source"], "source_id": by_key[key]["source_id"]}
                     for key in sorted(expected - accepted)]
        commit_unit(layout, unit, samples, rejected)
    except FileNotFoundError as err:
        if layout.is_committed(unit):  # a concurrent assembler of the same unit finished first
            return True
        raise IncompleteUnitError(f"unit {unit}: a staged part vanished ({err.filename})") from None
    except (tarfile.TarError, ShardFormatError, OSError, ValueError) as err:
        raise IncompleteUnitError(f"unit {unit}: a staged part is damaged ({type(err).__name__}: {err})") from None
    return True


def _unique_samples(merged: Iterable[ShardSample], accepted: set[str]) -> Iterator[ShardSample]:
    written: set[str] = set()
    for sample in merged:
        if sample.key in accepted and sample.key not in written:
            written.add(sample.key)
            yield sample
    missing = accepted - written
    if missing:
        raise IncompleteUnitError(f"staged parts vouch for {len(missing)} samples their tars lack, e.g. {sorted(missing)[:3]}")


class UnitWriter:
    """The pipeline's sink stage: stage a batch's samples per unit, commit every unit the batch completes.

    Returns one summary row per unit in the batch: {unit, staged, committed}.
    """

    def __init__(self, root: str | Path):
        self.layout = DatasetLayout(root)

    def __call__(self, batch: dict) -> dict:
        rows = RowBatch(batch)
        by_unit: dict[str, tuple[list[ShardSample], list[dict]]] = {}
        t5_columns = [c for c in rows.columns if c.startswith("t5_")]
        for i, meta in enumerate(rows.metas):
            unit = rows.columns["unit"][i]
            samples, rejected = by_unit.setdefault(unit, ([], []))
            if rows.columns["reject_stage"][i]:
                rejected.append({"key": rows.columns["key"][i], "stage": rows.columns["reject_stage"][i],
                                 "reason": rows.columns["reject_reason"][i]})
                continue
            t5 = {column[3:]: np.asarray(rows.columns[column][i]) for column in t5_columns}
            samples.append(ShardSample(key=rows.columns["key"][i], meta=meta,
                                       latent_mean=np.asarray(rows.columns["latent_mean"][i]),
                                       latent_std=np.asarray(rows.columns["latent_std"][i]), t5=t5))
        out = {"unit": [], "staged": [], "committed": []}
        for unit, (samples, rejected) in sorted(by_unit.items()):
            stage_part(self.layout, unit, samples, rejected)
            out["unit"].append(unit)
            out["staged"].append(len(samples) + len(rejected))
            try:
                committed = try_commit(self.layout, unit)
            except IncompleteUnitError:  # left for the driver's final sweep, which reports it
                committed = False
            out["committed"].append(committed)
        return {name: np.asarray(values) for name, values in out.items()}


# ---- finishing the job ----------------------------------------------------------------------------------------------
def _consolidate(parts: list[Path], target: Path, empty_schema: pa.Schema) -> int:
    """Concatenate parquet parts into one file, streaming (one part in memory at a time). Returns the row count."""
    schemas = [pq.read_schema(p) for p in parts]
    schema = pa.unify_schemas([empty_schema, *schemas]) if schemas else empty_schema
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    rows = 0
    with pq.ParquetWriter(tmp, schema) as out:
        for part in parts:
            table = pq.read_table(part)
            for name in schema.names:
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
            out.write_table(table.select(schema.names).cast(schema))
            rows += len(table)
    publish(tmp, target)
    return rows


def finalize(layout: DatasetLayout, units: list[str], config: dict, info: dict | None = None) -> dict:
    """Write manifest.parquet, rejected.parquet and dataset_card.json from the committed parts of `units`.

    Checks the invariant the whole design exists for: every record the sources yielded (pass 1 counted them) is
    in exactly one of the two tables.
    """
    from datetime import datetime, timezone

    missing = [u for u in units if not layout.is_committed(u)]
    if missing:
        raise IncompleteUnitError(f"{len(missing)} units are not committed, e.g. {missing[:3]}")
    accepted = _consolidate([layout.manifest_part(u) for u in units], layout.root / MANIFEST_FILE,
                            pa.schema(MANIFEST_BASE))
    rejected = _consolidate([layout.rejected_part(u) for u in units], layout.root / REJECTED_FILE, REJECTED_SCHEMA)
    seen = sum(pq.read_metadata(layout.screen_part(u)).num_rows for u in units if layout.is_screened(u))
    if seen != accepted + rejected:
        raise IncompleteUnitError(f"counts do not add up: seen {seen} != accepted {accepted} + rejected {rejected}")
    manifest = pq.read_table(layout.root / MANIFEST_FILE, columns=["bucket_h", "bucket_w", "key"])
    keys = manifest.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        raise IncompleteUnitError("a key appears twice in the manifest")
    buckets = Counter(f"{h}x{w}" for h, w in zip(manifest.column("bucket_h").to_pylist(),
                                                 manifest.column("bucket_w").to_pylist()))
    stages = Counter(pq.read_table(layout.root / REJECTED_FILE, columns=["stage"]).column("stage").to_pylist())
    card = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": {"seen": seen, "accepted": accepted, "rejected": rejected,
                   "rejected_by_reason": dict(sorted(stages.items()))},
        "units": len(units),
        "buckets": dict(sorted(buckets.items())),
        **(info or {}),
        "config": config,
        "library_versions": library_versions(),
    }
    atomic_write_bytes(layout.root / CARD_FILE, json.dumps(card, indent=2, sort_keys=False).encode())
    return card


def remove_staging(layout: DatasetLayout, unit: str) -> None:
    shutil.rmtree(layout.staging(unit), ignore_errors=True)


def plot_card(card: dict, path: Path) -> None:
    """dataset_card.png: where the samples went (accepted, rejected per stage) and how they fill the buckets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = card["counts"]
    outcomes = {"accepted": counts["accepted"], **counts["rejected_by_reason"]}
    buckets = sorted(card["buckets"].items(), key=lambda kv: int(kv[0].split("x")[0]) / int(kv[0].split("x")[1]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    left.barh(list(outcomes)[::-1], list(outcomes.values())[::-1],
              color=["tab:red"] * (len(outcomes) - 1) + ["tab:green"])
    left.set_title(f"{counts['seen']} samples seen")
    left.set_xlabel("samples")
    from matplotlib.ticker import MaxNLocator

    left.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5-sample ticks on small data
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlim(0, max(outcomes.values(), default=0) * 1.15 or 1)
    left.bar_label(left.containers[0], fontsize=8)
    right.set_title("accepted samples per bucket (H x W, wide to tall)")
    if buckets:
        bars = right.bar([b for b, _ in buckets], [n for _, n in buckets], color="tab:blue")
        right.bar_label(bars, fontsize=7)
        right.set_ylim(0, max(n for _, n in buckets) * 1.15)
        right.tick_params(axis="x", rotation=90)
    else:
        from curation.density_report import empty_panel

        empty_panel(right, "no accepted samples")
    fig.tight_layout()
    tmp = temp_name(path)
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    publish(tmp, path)
