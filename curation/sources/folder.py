"""A plain folder of images with `.txt` captions, and/or webdataset tars of `<key>.<image ext>` + `<key>.txt`.

Layout: `<root>/**/name.jpg` (+ `name.txt`) -> units of `unit_size` images from the sorted listing;
`<root>/**/*.tar` -> one unit per tar, samples grouped as webdataset groups them (adjacent members sharing a key).
Source ids are relative paths (`sub/name.jpg`, `shard-0001/key`), so they are stable across runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from curation.sources.base import (IMAGE_EXTENSIONS, RawSample, Source, WorkUnit, chunked, is_image_name,
                                   is_tar_name, list_files, safe_unit_id)
from curation.sources.tars import TarMember, iter_tar, split_member_name
from common.config import StrictModel

_IMAGE_EXTS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


class FolderConfig(StrictModel):
    kind: Literal["folder"] = "folder"
    root: str = Field(description="folder of images (with optional captions) and/or webdataset tars")
    unit_size: int = Field(1000, ge=1, description="images per work unit for loose files")
    caption_ext: str = Field(".txt", pattern=r"^\.[A-Za-z0-9]+$", description="caption file extension")
    caption_name: str = Field("original", pattern=r"^[a-z0-9_]+$", description="caption name of those files")
    name: str = Field("folder", pattern=r"^[a-z0-9_]+$")
    max_units: int | None = Field(None, ge=1)

    def build(self) -> "FolderSource":
        return FolderSource(self)


def read_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


def read_file(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class FolderSource(Source):
    def list_units(self, work_dir: Path) -> list[WorkUnit]:
        root = self.root()
        units = [WorkUnit(id=f"wds-{safe_unit_id(rel)}", kind="tar", root=str(root.resolve()),
                          paths=(str((root / rel).resolve()),))
                 for rel in list_files(root, is_tar_name)]
        images = list_files(root, is_image_name)
        units += [WorkUnit(id=f"files-{index:06d}", kind="files", root=str(root.resolve()), paths=tuple(chunk))
                  for index, chunk in enumerate(chunked(images, self.config.unit_size))]
        return units[: self.config.max_units] if self.config.max_units else units

    def read_unit(self, unit: WorkUnit) -> Iterator[RawSample]:
        if unit.kind == "tar":
            yield from self._read_tar(unit)
        else:
            yield from self._read_files(unit)

    def _read_files(self, unit: WorkUnit) -> Iterator[RawSample]:
        root = Path(unit.root)
        for rel in unit.paths:
            path = root / rel
            try:
                data = read_file(path)
            except OSError as err:
                yield self.rejected(rel, unit, "source", f"unreadable file: {err}")
                continue
            captions = {}
            caption_path = path.with_suffix(self.config.caption_ext)
            if caption_path.is_file():
                try:
                    captions[self.config.caption_name] = read_text(read_file(caption_path))
                except OSError as err:
                    yield self.rejected(rel, unit, "source", f"unreadable caption file: {err}")
                    continue
            yield self.sample(rel, unit, data=data, captions=captions)

    def _read_tar(self, unit: WorkUnit) -> Iterator[RawSample]:
        tar_name = Path(unit.paths[0]).relative_to(unit.root).as_posix()
        caption_ext = self.config.caption_ext.lstrip(".").lower()
        group: dict[str, TarMember] = {}
        current = None

        def flush():
            source_id = f"{tar_name}/{current}"
            image_ext = next((ext for ext in _IMAGE_EXTS if ext in group), None)
            if image_ext is None:
                return self.rejected(source_id, unit, "source", f"sample {current!r} has no image member "
                                     f"(members: {sorted(group)})")
            captions = {}
            if caption_ext in group:
                captions[self.config.caption_name] = read_text(group[caption_ext].data or b"")
            return self.sample(source_id, unit, data=group[image_ext].data, captions=captions)

        for member in iter_tar(unit.paths[0]):
            if member.problem:
                yield self.rejected(f"{tar_name}/{member.name}", unit, "source", member.problem)
                continue
            stem, ext = split_member_name(member.name)
            if stem != current and group:
                yield flush()
                group = {}
            current = stem
            group.setdefault(ext, member)
        if group:
            yield flush()
