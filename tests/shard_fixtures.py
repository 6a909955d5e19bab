"""Small, valid shard datasets written with curation.shard_format, for the loader and trainer tests.

A dataset here is what `pipelines/curate.py` would write (shards/, manifest/ parts, manifest.parquet), built from
synthetic latents so the tests need no VAE: each sample's posterior mean is one of a few smooth patterns (so a tiny
model has something to learn), its std small, and its caption features a fixed random projection of its pattern id.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.shard_format import (
    FORMAT_VERSION, MANIFEST_DIR, MANIFEST_FILE, SHARDS_DIR, ShardSample, make_key, manifest_row, write_shard,
)


@dataclass(frozen=True)
class FixtureSpec:
    samples_per_bucket: dict[tuple[int, int], int]  # pixel bucket (H, W) -> sample count
    units: int = 2  # shards
    caption_names: tuple[str, ...] = ("llava",)
    t5_width: int = 32
    latent_channels: int = 4
    num_classes: int | None = None  # set: class-conditional data with class_label = pattern id % num_classes
    patterns: int = 4
    tokens: tuple[int, int] = (3, 7)  # caption token counts cycle through this inclusive range
    seed: int = 0


def _pattern(pid: int, channels: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, np.pi, h), np.linspace(0, np.pi, w), indexing="ij")
    waves = [np.sin((pid + 1) * yy + c) * np.cos((c + 1) * xx - pid) for c in range(channels)]
    return np.stack(waves).astype(np.float32) * 4.0  # about the VAE's unscaled latent range


def make_samples(spec: FixtureSpec) -> list[ShardSample]:
    """Every sample of the dataset, in a fixed order."""
    rng = np.random.default_rng(spec.seed)
    projection = rng.standard_normal((spec.patterns, spec.t5_width)).astype(np.float32)
    samples = []
    for (H, W), count in sorted(spec.samples_per_bucket.items()):
        h, w = H // 8, W // 8
        for i in range(count):
            pid = i % spec.patterns
            source_id = f"{H}x{W}/{i:05d}"
            key = make_key("fixture", source_id)
            t5, tokens, captions = {}, {}, {}
            for name in spec.caption_names:
                low, high = spec.tokens
                n = low + i % (high - low + 1)
                feats = projection[pid][None] + 0.1 * rng.standard_normal((n, spec.t5_width)).astype(np.float32)
                t5[name], tokens[name], captions[name] = feats.astype(np.float16), n, f"pattern {pid} ({name})"
            meta = {
                "key": key, "format_version": FORMAT_VERSION, "source": "fixture", "source_id": source_id,
                "bucket": [H, W], "latent_hw": [h, w], "orig_size": [H + 7 * i, W + 5 * i], "captions": captions,
                "t5_tokens": tokens,
                "class_label": (pid % spec.num_classes) if spec.num_classes else None,
            }
            mean = _pattern(pid, spec.latent_channels, h, w) + 0.05 * rng.standard_normal((spec.latent_channels, h, w))
            std = np.full((spec.latent_channels, h, w), 0.02, dtype=np.float32)
            samples.append(ShardSample(key=key, meta=meta, latent_mean=mean.astype(np.float16),
                                       latent_std=std.astype(np.float16), t5=t5))
    return samples


def write_dataset(root: str | Path, spec: FixtureSpec, consolidate: bool = True) -> list[ShardSample]:
    """Write the dataset as the curation writer does: tar per unit, manifest part per unit, then manifest.parquet.
    Samples are dealt to units round-robin, so every unit holds every bucket. Returns the samples."""
    root = Path(root)
    samples = make_samples(spec)
    rows = []
    for unit in range(spec.units):
        name = f"unit-{unit:04d}"
        mine = samples[unit::spec.units]
        shard = f"{SHARDS_DIR}/{name}.tar"
        write_shard(root / shard, mine)
        part = [manifest_row(s, shard) for s in mine]
        (root / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part), root / MANIFEST_DIR / f"{name}.parquet")
        rows.extend(part)
    if consolidate:
        pq.write_table(pa.Table.from_pylist(rows), root / MANIFEST_FILE)
    return samples
