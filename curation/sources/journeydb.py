"""JourneyDB: image archives (`000.tgz`, ...) or extracted image folders, plus the annotation JSONL.

Each JSONL line describes one image: `img_path` ("./000/<hash>.jpg"), `prompt` (the Midjourney prompt),
`Task1.Style` (style words) and `Task2.Caption` (a descriptive caption). They become captions `prompt`, `style`
and `caption`. Work units: one per archive, `unit_size` images per chunk of extracted folders.

The annotation file covers the whole dataset and is large, so it is read once, on the driver, and routed into one
small file per unit (`<work>/journeydb/<unit>.jsonl`); a unit's reader then needs only its own annotations.
Every annotation line is seen and accepted or rejected: malformed lines, and lines whose image no archive or file
of this job holds, become rejected records of a `journeydb-annotations` unit (stage `source` for a malformed line
or a missing image file; `outside_job` for an image whose archive or folder is not part of this job: a partial
download, or cut by `max_units`).
"""
from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from common.durable import atomic_write_bytes, publish
from curation.sources.base import (RawSample, Source, WorkUnit, chunked, is_image_name, is_tar_name, list_files,
                                   safe_unit_id)
from curation.sources.folder import read_file
from curation.sources.tars import iter_tar, normalise_member_name
from common.config import StrictModel

ROUTING_DIR = "journeydb"
PROBLEMS_UNIT = "journeydb-annotations"


class JourneyDBConfig(StrictModel):
    kind: Literal["journeydb"] = "journeydb"
    root: str = Field(description="folder of image archives (000.tgz, ...) and/or extracted image folders")
    annotations: str = Field(description="annotation JSONL (img_path, prompt, Task1.Style, Task2.Caption)")
    unit_size: int = Field(1000, ge=1, description="images per work unit for extracted folders")
    name: str = Field("journeydb", pattern=r"^[a-z0-9_]+$")
    max_units: int | None = Field(None, ge=1)

    def build(self) -> "JourneyDBSource":
        return JourneyDBSource(self)


def archive_folder(archive: str) -> str:
    """'imgs/000.tgz' -> '000': the folder its members' img_paths start with."""
    base = posixpath.basename(archive)
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _text(value) -> str | None:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(v.strip() for v in value)
    return None


def compact_annotation(record: dict) -> dict:
    """The fields we keep from one JSONL record, as captions (missing or ill-typed fields are simply absent)."""
    task1 = record.get("Task1") if isinstance(record.get("Task1"), dict) else {}
    task2 = record.get("Task2") if isinstance(record.get("Task2"), dict) else {}
    captions = {"prompt": _text(record.get("prompt")), "style": _text(task1.get("Style")),
                "caption": _text(task2.get("Caption"))}
    return {name: text for name, text in captions.items() if text is not None}


class JourneyDBSource(Source):
    # ---- listing and routing (driver) -------------------------------------------------------------------------
    def list_units(self, work_dir: Path) -> list[WorkUnit]:
        root = self.root()
        if not Path(self.config.annotations).is_file():
            raise FileNotFoundError(f"source.annotations {self.config.annotations} is not a file")
        root_abs = str(root.resolve())
        units = [WorkUnit(id=f"arc-{safe_unit_id(rel)}", kind="tar", root=root_abs, paths=(str((root / rel).resolve()),))
                 for rel in list_files(root, is_tar_name)]
        images = list_files(root, is_image_name)
        units += [WorkUnit(id=f"files-{index:06d}", kind="files", root=root_abs, paths=tuple(chunk))
                  for index, chunk in enumerate(chunked(images, self.config.unit_size))]
        if self.config.max_units:
            units = units[: self.config.max_units]
        routing = Path(work_dir) / ROUTING_DIR
        summary = self._route(units, routing)
        units = [WorkUnit(u.id, u.kind, u.root, u.paths, sidecar=str(routing / f"{u.id}.jsonl")) for u in units]
        if summary["problems"]:
            units.append(WorkUnit(id=PROBLEMS_UNIT, kind="records", root=root_abs, paths=(),
                                  sidecar=str(routing / f"{PROBLEMS_UNIT}.jsonl")))
        return units

    def _route(self, units: list[WorkUnit], routing: Path) -> dict:
        """Split the annotation JSONL into one file per unit; reused when the same annotations and units were
        routed before (the summary, written last, is the marker)."""
        annotations = Path(self.config.annotations)
        stat = annotations.stat()
        fingerprint = {"annotations": str(annotations.resolve()), "size": stat.st_size,
                       "mtime_ns": stat.st_mtime_ns, "units": [u.id for u in units]}
        summary_path = routing / "_summary.json"
        if summary_path.is_file():
            try:
                summary = json.loads(summary_path.read_text())
            except ValueError:  # an empty or torn summary (a power loss): route again
                summary = {}
            if isinstance(summary, dict) and summary.get("fingerprint") == fingerprint:
                return summary
        by_file = {rel: u.id for u in units if u.kind == "files" for rel in u.paths}
        by_archive = {archive_folder(u.paths[0]): u.id for u in units if u.kind == "tar"}
        folders = {rel.split("/", 1)[0] for rel in by_file if "/" in rel}  # extracted folders in this job
        # Lines are buffered per unit and appended to temp files in chunks: the full file never sits in memory.
        routing.mkdir(parents=True, exist_ok=True)
        # The problems (rejected lines) are one more buffer: a partial download may leave millions of them.
        targets = [u.id for u in units] + [PROBLEMS_UNIT]
        temp = {target: routing / f".{target}.jsonl.tmp" for target in targets}
        for path in temp.values():
            path.write_bytes(b"")
        buffers: dict[str, list[str]] = {target: [] for target in targets}

        def flush(unit_id: str) -> None:
            with open(temp[unit_id], "a", encoding="utf-8") as handle:
                handle.writelines(f"{line}\n" for line in buffers[unit_id])
            buffers[unit_id].clear()

        routed = problems = unmatched = 0

        def add(target: str, line: str) -> None:
            buffers[target].append(line)
            if len(buffers[target]) >= 10_000:
                flush(target)

        def problem(lineno: int, reason: str, stage: str = "source") -> None:
            nonlocal problems
            problems += 1
            add(PROBLEMS_UNIT, json.dumps({"line": lineno, "stage": stage, "reason": reason}))
        with open(annotations, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    if not isinstance(record, dict):
                        raise ValueError(f"a JSON {type(record).__name__}, not an object")
                    img_path = record.get("img_path")
                    if not isinstance(img_path, str) or not img_path.strip():
                        raise ValueError("no img_path")
                except (ValueError, UnicodeDecodeError) as err:
                    problem(lineno, f"malformed JSONL line {lineno}: {err}")
                    continue
                path = normalise_member_name(img_path.strip())
                if path is None:
                    problem(lineno, f"line {lineno}: unsafe img_path {img_path!r}")
                    continue
                unit = by_file.get(path) or by_archive.get(path.split("/", 1)[0])
                if unit is None:
                    unmatched += 1
                    if path.split("/", 1)[0] in folders:
                        problem(lineno, f"line {lineno}: image file {path!r} is missing")
                    else:
                        problem(lineno, f"line {lineno}: no archive or folder of this job holds {path!r}",
                                "outside_job")
                    continue
                add(unit, json.dumps({"line": lineno, "img_path": path, **compact_annotation(record)}))
                routed += 1
        for target, path in temp.items():
            flush(target)
            publish(path, routing / f"{target}.jsonl")
        summary = {"fingerprint": fingerprint, "routed": routed, "problems": problems, "unmatched": unmatched}
        atomic_write_bytes(summary_path, json.dumps(summary).encode())
        return summary

    # ---- reading (workers) --------------------------------------------------------------------------------------
    def read_unit(self, unit: WorkUnit) -> Iterator[RawSample]:
        if unit.kind == "records":
            for line in Path(unit.sidecar).read_text().splitlines():
                problem = json.loads(line)
                yield self.rejected(f"annotations:line-{problem['line']}", unit, problem.get("stage", "source"),
                                    problem["reason"])
            return
        annotations: dict[str, dict] = {}
        for line in Path(unit.sidecar).read_text().splitlines():
            record = json.loads(line)
            first = annotations.setdefault(record["img_path"], record)
            if first is not record:
                yield self.rejected(f"{record['img_path']}#line-{record['line']}", unit, "duplicate_id",
                                    f"annotation line {record['line']} repeats img_path {record['img_path']!r} "
                                    f"(first on line {first['line']})")
        seen: set[str] = set()
        for source_id, data, problem in self._iter_images(unit):
            if problem:
                yield self.rejected(source_id, unit, "source", problem)
                continue
            if source_id in seen:
                yield self.rejected(source_id, unit, "duplicate_id", f"{source_id!r} appears twice in unit {unit.id}")
                continue
            seen.add(source_id)
            record = annotations.pop(source_id, None)
            if record is None:
                yield self.rejected(source_id, unit, "source", f"missing annotation: no JSONL line for {source_id!r}")
                continue
            captions = {k: v for k, v in record.items() if k not in ("line", "img_path")}
            yield self.sample(source_id, unit, data=data, captions=captions,
                              source_meta={"annotation_line": record["line"]})
        for source_id, record in annotations.items():
            yield self.rejected(f"{source_id}#line-{record['line']}", unit, "source",
                                f"annotation line {record['line']} names {source_id!r}, which is not in unit {unit.id}")

    def _iter_images(self, unit: WorkUnit) -> Iterator[tuple[str, bytes | None, str | None]]:
        if unit.kind == "files":
            for rel in unit.paths:
                try:
                    yield rel, read_file(Path(unit.root) / rel), None
                except OSError as err:
                    yield rel, None, f"unreadable file: {err}"
            return
        folder = archive_folder(unit.paths[0])
        for member in iter_tar(unit.paths[0]):
            name = member.name if member.name.startswith(f"{folder}/") else f"{folder}/{member.name}"
            if member.problem:
                yield name, None, member.problem
            elif not is_image_name(member.name):
                yield name, None, f"unexpected member {member.name!r} in a JourneyDB archive"
            else:
                yield name, member.data, None
