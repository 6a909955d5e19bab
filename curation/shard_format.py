"""The shard format: the one contract between curation (writer) and training (reader).

Specified in docs/SHARD_FORMAT.md; this module is its executable form. Bump FORMAT_VERSION on any change a reader
of the previous version would misread, and keep `decode_sample` able to read every version it claims to.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from common.durable import publish, temp_name

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

SHARDS_DIR = "shards"
MANIFEST_DIR = "manifest"
REJECTED_DIR = "rejected"
MANIFEST_FILE = "manifest.parquet"
REJECTED_FILE = "rejected.parquet"
CARD_FILE = "dataset_card.json"

# webdataset splits a member name at the first dot: the key must not contain one.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,200}$")
CAPTION_NAME_PATTERN = re.compile(r"^[a-z0-9_]{1,40}$")

META_EXT = "json"
MEAN_EXT = "latent_mean.npy"
STD_EXT = "latent_std.npy"
T5_PREFIX = "t5_"  # one member per encoded caption: f"{key}.t5_{name}.npy"


def aspect_ratio_key(height: float, width: float) -> float:
    """The ratio key of PixArt's ASPECT_RATIO tables (H / W as the tables write it, e.g. 0.57) nearest to
    height / width: the key curation picks a sample's bucket by (from its orig_size), and the aspect-ratio
    micro-condition the official multi-scale models are trained and sampled with (`get_closest_ratio`)."""
    from curation.buckets import ASPECT_RATIO_256, closest_bucket

    return float(closest_bucket(height, width, ASPECT_RATIO_256)[0])


class ShardFormatError(ValueError):
    """A sample or shard that does not follow the format; the message says what was expected."""


@dataclass
class ShardSample:
    """One training sample as stored: latent posterior (mean, std) plus the text encodings of its captions.

    `meta` is the sample's JSON member; its required fields are listed in REQUIRED_META.
    """

    key: str
    meta: dict
    latent_mean: np.ndarray  # float16 [C, h, w]
    latent_std: np.ndarray  # float16 [C, h, w]
    t5: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float16 [n_valid_tokens, D]


REQUIRED_META = ("key", "format_version", "source", "source_id", "bucket", "latent_hw", "orig_size", "captions")


def make_key(source: str, source_id: str) -> str:
    """A deterministic sample key from a source name and the sample's id in that source.

    Keys are derived, never counted, so a resumed job names every sample exactly as the first attempt did.
    Characters webdataset would misread (dots, slashes) are replaced; a hash suffix keeps distinct ids distinct.
    """
    import hashlib

    clean = re.sub(r"[^A-Za-z0-9_\-]", "-", f"{source}-{source_id}")[:150]
    digest = hashlib.sha1(f"{source}\0{source_id}".encode()).hexdigest()[:10]
    return f"{clean}-{digest}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any decoding failure is a format error
        raise ShardFormatError(f"{what}: not a readable .npy array ({err})") from None


def validate_sample(sample: ShardSample) -> None:
    """Raise ShardFormatError naming what is wrong; used by the writer before writing and the reader after reading."""
    meta = sample.meta
    if not KEY_PATTERN.match(sample.key):
        raise ShardFormatError(f"key {sample.key!r} must match {KEY_PATTERN.pattern}")
    missing = [name for name in REQUIRED_META if name not in meta]
    if missing:
        raise ShardFormatError(f"{sample.key}: meta lacks required fields {missing}")
    if meta["format_version"] not in SUPPORTED_VERSIONS:
        raise ShardFormatError(f"{sample.key}: format_version {meta['format_version']} not in {SUPPORTED_VERSIONS}")
    if meta["key"] != sample.key:
        raise ShardFormatError(f"{sample.key}: meta key {meta['key']!r} differs from member key")
    for name, arr in (("latent_mean", sample.latent_mean), ("latent_std", sample.latent_std)):
        if arr.dtype != np.float16 or arr.ndim != 3:
            raise ShardFormatError(f"{sample.key}: {name} must be float16 [C, h, w], got {arr.dtype} {arr.shape}")
    if sample.latent_mean.shape != sample.latent_std.shape:
        raise ShardFormatError(f"{sample.key}: latent_mean {sample.latent_mean.shape} != latent_std {sample.latent_std.shape}")
    if list(sample.latent_mean.shape[1:]) != list(meta["latent_hw"]):
        raise ShardFormatError(f"{sample.key}: latent shape {sample.latent_mean.shape} does not match latent_hw {meta['latent_hw']}")
    if not (np.isfinite(sample.latent_mean).all() and np.isfinite(sample.latent_std).all()):
        raise ShardFormatError(f"{sample.key}: latent holds NaN or inf")
    for name, arr in sample.t5.items():
        if not CAPTION_NAME_PATTERN.match(name):
            raise ShardFormatError(f"{sample.key}: caption name {name!r} must match {CAPTION_NAME_PATTERN.pattern}")
        if arr.dtype != np.float16 or arr.ndim != 2 or arr.shape[0] < 1:
            raise ShardFormatError(f"{sample.key}: t5_{name} must be float16 [n_tokens>=1, D], got {arr.dtype} {arr.shape}")
        if meta.get("t5_tokens", {}).get(name) != arr.shape[0]:
            raise ShardFormatError(f"{sample.key}: meta t5_tokens[{name!r}] does not match the stored {arr.shape[0]} tokens")


def encode_sample(sample: ShardSample) -> dict[str, bytes]:
    """Member suffix -> bytes, as webdataset groups them (`{key}.{suffix}`)."""
    validate_sample(sample)
    members = {
        META_EXT: json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode(),
        MEAN_EXT: _npy_bytes(sample.latent_mean),
        STD_EXT: _npy_bytes(sample.latent_std),
    }
    for name, arr in sample.t5.items():
        members[f"{T5_PREFIX}{name}.npy"] = _npy_bytes(arr)
    return members


def decode_sample(members: dict[str, bytes], key: str | None = None) -> ShardSample:
    """Inverse of encode_sample. Accepts webdataset's raw sample dict (with `__key__`/`__url__` entries)."""
    key = key or members.get("__key__")
    if META_EXT not in members:
        raise ShardFormatError(f"{key}: no .json member")
    try:
        meta = json.loads(members[META_EXT])
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardFormatError(f"{key}: .json member is not valid JSON ({err})") from None
    for ext in (MEAN_EXT, STD_EXT):
        if ext not in members:
            raise ShardFormatError(f"{key}: no .{ext} member")
    t5 = {
        suffix[len(T5_PREFIX) : -len(".npy")]: _npy_load(data, f"{key}.{suffix}")
        for suffix, data in members.items()
        if suffix.startswith(T5_PREFIX) and suffix.endswith(".npy")
    }
    sample = ShardSample(
        key=str(key),
        meta=meta,
        latent_mean=_npy_load(members[MEAN_EXT], f"{key}.{MEAN_EXT}"),
        latent_std=_npy_load(members[STD_EXT], f"{key}.{STD_EXT}"),
        t5=t5,
    )
    validate_sample(sample)
    return sample


def write_shard(path: str | Path, samples: Iterable[ShardSample]) -> int:
    """Write a webdataset tar atomically (temp name, then rename). Returns the number of samples written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    count = 0
    seen: set[str] = set()
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if sample.key in seen:
                raise ShardFormatError(f"key {sample.key!r} appears twice in shard {path.name}")
            seen.add(sample.key)
            for suffix, data in encode_sample(sample).items():
                info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                info.size = len(data)
                info.mtime = 0  # byte-identical shards for identical input
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
            count += 1
    publish(tmp, path)
    return count


def iter_shard(path: str | Path) -> Iterable[ShardSample]:
    """Read a shard without webdataset (tests, tools). Members are grouped by key in tar order."""
    group: dict[str, bytes] = {}
    current = None
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile() or "/" in info.name or info.name.startswith("."):
                continue
            key, _, suffix = info.name.partition(".")
            if key != current and group:
                yield decode_sample(group, current)
                group = {}
            current = key
            group[suffix] = tar.extractfile(info).read()
    if group:
        yield decode_sample(group, current)


def manifest_row(sample: ShardSample, shard: str) -> dict:
    """The manifest row of an accepted sample (see docs/SHARD_FORMAT.md for the columns)."""
    meta = sample.meta
    row = {
        "key": sample.key,
        "shard": shard,
        "format_version": meta["format_version"],
        "source": meta["source"],
        "source_id": meta["source_id"],
        "bucket_h": int(meta["bucket"][0]),
        "bucket_w": int(meta["bucket"][1]),
        "latent_h": int(meta["latent_hw"][0]),
        "latent_w": int(meta["latent_hw"][1]),
        "orig_h": int(meta["orig_size"][0]),
        "orig_w": int(meta["orig_size"][1]),
        "class_label": meta.get("class_label"),
    }
    for name, text in meta["captions"].items():
        row[f"caption_{name}"] = text
    for name, count in meta.get("t5_tokens", {}).items():
        row[f"t5_tokens_{name}"] = int(count)
    for name, value in meta.get("scores", {}).items():
        row[f"score_{name}"] = float(value)
    return row


def read_manifest(root: str | Path):
    """The dataset's manifest as a pyarrow Table: the consolidated file if the job finished, else its committed parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    if (root / MANIFEST_FILE).is_file():
        return pq.read_table(root / MANIFEST_FILE)
    parts = sorted(p for p in (root / MANIFEST_DIR).glob("*.parquet") if not p.name.startswith("."))
    if not parts:
        raise FileNotFoundError(f"{root} holds no {MANIFEST_FILE} and no committed parts under {MANIFEST_DIR}/")
    # Parts may differ in optional columns (a caption or score that only some sources have): promote, don't fail.
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
