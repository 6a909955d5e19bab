"""The official PixArt-alpha training layout: `data_info.json` next to a folder of images.

PixArt-alpha's InternalData reads `InternData/partition/data_info.json` (or a list of such files): a JSON list of
records `{"path": "<image, relative to InternImgs/>", "prompt": "...", "height": h, "width": w, "ratio": h / w}`;
PixArt-Sigma adds caption fields such as `sharegpt4v`. `captions` says which record fields become which captions
(default: `prompt` -> caption `prompt`). The declared size is kept as source metadata; the job measures the real one.

Work units are `unit_size` consecutive records of one file. The JSON is read once, on the driver, and routed into
one small JSONL file per unit (`<work>/pixart/<unit>.jsonl`), reused while the input files are unchanged. Every
record is seen: a record that is not an object, has no usable `path`, a path that leaves the image folder, or an
image that is missing or unreadable becomes a rejected record with the reason.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field, field_validator

from common.config import ConfigError, StrictModel
from common.durable import atomic_write_bytes
from curation.sources.base import RawSample, Source, WorkUnit, caption_names, safe_unit_id
from curation.sources.folder import read_file
from curation.sources.tars import normalise_member_name

ROUTING_DIR = "pixart"


class PixArtConfig(StrictModel):
    kind: Literal["pixart"] = "pixart"
    data_info: list[str] = Field(min_length=1, description="data_info.json file(s): JSON lists of "
                                 "{path, prompt, height, width, ratio}")
    images: str | None = Field(None, description="folder the records' paths are relative to (PixArt's "
                               "InternImgs/); default: the folder holding each data_info file")
    captions: dict[str, str] = Field(default_factory=lambda: {"prompt": "prompt"},
                                     description="caption name -> record field, e.g. {prompt: prompt, "
                                                 "sharegpt4v: sharegpt4v}")
    unit_size: int = Field(1000, ge=1, description="records per work unit")
    name: str = Field("pixart", pattern=r"^[a-z0-9_]+$")
    max_units: int | None = Field(None, ge=1)

    @field_validator("data_info", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("captions")
    @classmethod
    def _caption_names(cls, captions: dict[str, str]) -> dict[str, str]:
        return caption_names(captions)

    def build(self) -> "PixArtSource":
        return PixArtSource(self)


def load_records(path: Path) -> list:
    """The records of one data_info file; a file that is not a JSON list is a config error, not a bad record."""
    try:
        records = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"source.data_info {path} is not valid JSON: {err}") from None
    if not isinstance(records, list):
        raise ConfigError(f"source.data_info {path} holds a JSON {type(records).__name__}; PixArt's data_info.json "
                          f"is a list of records")
    return records


class PixArtSource(Source):
    def images_root(self, info: Path) -> Path:
        """The image folder as configured, not resolved: a relative one resolves on each worker against its own
        working dir (each node's copy, under `ray job submit`), and the units, which the output folder is bound
        to, do not change with the Ray session's temp path."""
        root = Path(self.config.images) if self.config.images else info.parent
        if not root.is_dir():
            raise FileNotFoundError(f"source.images {root} is not a folder")
        return root

    # ---- listing and routing (driver) ---------------------------------------------------------------------------
    def list_units(self, work_dir: Path) -> list[WorkUnit]:
        routing = Path(work_dir) / ROUTING_DIR
        stems = [safe_unit_id(Path(p).stem) for p in self.config.data_info]
        units = []
        for file_index, name in enumerate(self.config.data_info):
            info = Path(name)
            if not info.is_file():
                raise FileNotFoundError(f"source.data_info {info} is not a file")
            root = self.images_root(info)
            # Two files with one name (part0/data_info.json, part1/data_info.json) keep their units apart.
            stem = stems[file_index] if stems.count(stems[file_index]) == 1 else f"{file_index}-{stems[file_index]}"
            units += self._route(info, root, stem, routing)
        return units[: self.config.max_units] if self.config.max_units else units

    def _route(self, info: Path, root: Path, stem: str, routing: Path) -> list[WorkUnit]:
        """Split one data_info file into per-unit JSONL files; the unit list (written last) marks a finished
        routing of these bytes with this unit size, so a resumed job reuses it."""
        stat = info.stat()
        fingerprint = {"data_info": str(info.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "unit_size": self.config.unit_size}
        tag = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        marker = routing / f"{stem}.units.json"
        try:
            listed = json.loads(marker.read_text())
            if listed.get("tag") == tag:
                return [WorkUnit.from_row(row) for row in listed["units"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent, or an interrupted routing: route again
        records = load_records(info)
        size = self.config.unit_size
        units = []
        for chunk, start in enumerate(range(0, len(records), size)):
            unit_id = f"{stem}-{chunk:06d}"
            lines = "".join(json.dumps({"index": i, "record": records[i]}) + "\n"
                            for i in range(start, min(start + size, len(records))))
            sidecar = routing / f"{unit_id}.jsonl"
            atomic_write_bytes(sidecar, lines.encode())
            units.append(WorkUnit(id=unit_id, kind="records", root=str(root),
                                  paths=(f"{info.name}:{start}:{min(start + size, len(records))}",),
                                  sidecar=str(sidecar)))
        atomic_write_bytes(marker, json.dumps({"tag": tag, "units": [u.to_row() for u in units]}).encode())
        return units

    # ---- reading (workers) --------------------------------------------------------------------------------------
    def read_unit(self, unit: WorkUnit) -> Iterator[RawSample]:
        info_name = unit.paths[0].split(":", 1)[0]
        root = Path(unit.root).resolve()
        for line in Path(unit.sidecar).read_text().splitlines():
            entry = json.loads(line)
            yield self._record(entry["index"], entry["record"], info_name, root, unit)

    def _record(self, index: int, record, info_name: str, root: Path, unit: WorkUnit) -> RawSample:
        where = f"{info_name}#{index}"
        if not isinstance(record, dict):
            return self.rejected(where, unit, "source", f"record {index} of {info_name} is a JSON "
                                 f"{type(record).__name__}, not an object")
        path = record.get("path")
        if not isinstance(path, str) or not path.strip():
            return self.rejected(where, unit, "source", f"record {index} of {info_name} has no path")
        rel = normalise_member_name(path.strip())
        if rel is None:
            return self.rejected(where, unit, "source", f"record {index} of {info_name}: path {path!r} leaves "
                                 f"the image folder")
        if not (root / rel).resolve().is_relative_to(root):
            return self.rejected(rel, unit, "source", f"record {index} of {info_name}: {rel!r} is a link out of "
                                 f"the image folder")
        try:
            data = read_file(root / rel)
        except OSError as err:
            return self.rejected(rel, unit, "source", f"record {index} of {info_name}: image missing or "
                                 f"unreadable: {err.strerror or err}")
        captions = {}
        for name, field in self.config.captions.items():
            value = record.get(field)
            if isinstance(value, str):
                captions[name] = value.strip()
        meta = {"data_info": info_name, "index": index}
        for field in ("height", "width"):
            if isinstance(record.get(field), int) and not isinstance(record.get(field), bool):
                meta[f"declared_{field}"] = record[field]
        return self.sample(rel, unit, data=data, captions=captions, source_meta=meta)
