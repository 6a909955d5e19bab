"""The records sources produce, and the work units that split a source into deterministic slices.

A source is listed once on the driver (`list_units`, cheap: names, not bytes) and read unit by unit on workers
(`iter_unit`). Reading a unit is deterministic: the same unit yields the same samples in the same order, so a
sample's `(unit, ordinal)` names one occurrence of it across passes and across resumed runs.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from curation.shard_format import CAPTION_NAME_PATTERN, make_key

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class Rejection:
    """Why a sample was not accepted: `stage` is a short stable category, `reason` says it for humans."""

    stage: str
    reason: str


@dataclass(frozen=True)
class WorkUnit:
    """A deterministic slice of a source: one archive, or a fixed-size chunk of a sorted file listing.

    `id` names the unit's output files, so it is filename-safe and unique within a job. `paths` are relative to
    `root` for listings and absolute for archives; `sidecar` is an optional file the unit also needs (JourneyDB's
    routed annotations).
    """

    id: str
    kind: str  # "tar" | "files" | "records" | "stream"
    root: str
    paths: tuple[str, ...]
    sidecar: str | None = None

    def to_row(self) -> dict:
        row = asdict(self)
        row["paths"] = list(self.paths)
        return row

    def identity(self) -> dict:
        """What the unit is, independent of where its source folder sits: the row with `root` left out and paths
        under it made relative. A job resubmitted to a new Ray session finds its uploaded working dir at a new
        temp path; its units must still be the same units, or the output folder would refuse the resumed run."""
        def relative(path: str | None) -> str | None:
            if path is None or not Path(path).is_absolute():
                return path
            try:
                return str(Path(path).relative_to(self.root))
            except ValueError:
                return path

        return {"id": self.id, "kind": self.kind, "paths": [relative(p) for p in self.paths],
                "sidecar": relative(self.sidecar)}

    @classmethod
    def from_row(cls, row: dict) -> "WorkUnit":
        return cls(id=str(row["id"]), kind=str(row["kind"]), root=str(row["root"]),
                   paths=tuple(str(p) for p in row["paths"]), sidecar=row.get("sidecar") or None)


@dataclass
class RawSample:
    """One input record as read from its source: image bytes and what the source says about it.

    A record the source itself cannot use (a malformed annotation, an unsafe archive member, an image without its
    annotation) carries `reject` and is recorded, never dropped.
    """

    key: str
    source: str
    source_id: str
    unit: str
    ordinal: int = -1
    data: bytes | None = None
    captions: dict[str, str] = field(default_factory=dict)
    class_label: int | None = None
    source_meta: dict = field(default_factory=dict)
    reject: Rejection | None = None


def safe_unit_id(name: str) -> str:
    """A filename-safe unit id from a relative path or archive name (extensions dropped)."""
    for ext in TAR_EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9_\-]", "-", name.strip("/")) or "unit"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_EXTENSIONS)


def caption_names(captions: dict[str, str]) -> dict[str, str]:
    """Validate a config's `captions` map (caption name -> where the source finds it): names as shards allow."""
    for name in captions:
        if not CAPTION_NAME_PATTERN.match(name):
            raise ValueError(f"caption name {name!r} must match {CAPTION_NAME_PATTERN.pattern}")
    return captions


def chunked(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def list_files(root: Path, predicate) -> list[str]:
    """Sorted paths (relative to root, '/'-separated) of regular files under root that satisfy `predicate`.

    Symlinks that resolve outside root are skipped: data is untrusted, and a link must not pull in other files.
    """
    root = root.resolve()
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or not predicate(rel):
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            continue
        if path.is_file():
            found.append(rel)
    return sorted(found)


class Source(ABC):
    """A dataset layout: lists its work units and reads one unit into RawSamples."""

    name: str = "source"

    def __init__(self, config):
        self.config = config
        self.name = config.name

    def root(self) -> Path:
        """The configured `source.root`, which must be a folder (checked on the driver, before any work)."""
        root = Path(self.config.root)
        if not root.is_dir():
            raise FileNotFoundError(f"source.root {root} is not a folder")
        return root

    @abstractmethod
    def list_units(self, work_dir: Path) -> list[WorkUnit]:
        """All units, sorted, deterministic. `work_dir` is where a source may keep derived indexes."""

    @abstractmethod
    def read_unit(self, unit: WorkUnit) -> Iterator[RawSample]:
        """The unit's records in a deterministic order (ordinals are stamped by `iter_unit`)."""

    def iter_unit(self, unit: WorkUnit) -> Iterator[RawSample]:
        for ordinal, sample in enumerate(self.read_unit(unit)):
            sample.ordinal = ordinal
            yield sample

    def sample(self, source_id: str, unit: WorkUnit, **fields) -> RawSample:
        """A record keyed from its id in this source."""
        return RawSample(key=make_key(self.name, source_id), source=self.name, source_id=source_id, unit=unit.id,
                         **fields)

    def rejected(self, source_id: str, unit: WorkUnit, stage: str, reason: str, **fields) -> RawSample:
        return self.sample(source_id, unit, reject=Rejection(stage, reason), **fields)
