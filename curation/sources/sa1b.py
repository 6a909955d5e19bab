"""SA-1B: tars of `sa_N.jpg` + `sa_N.json`. Only the JSON's `image` block is used (the masks are large and unused).

Layout: `<root>/sa_000000.tar, sa_000001.tar, ...`, one work unit per tar. The sample id is the annotation's
`image_id`, so a tar re-packed or renamed still yields the same keys.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from curation.sources.base import RawSample, Source, WorkUnit, safe_unit_id
from curation.sources.tars import TarMember, iter_tar, split_member_name
from common.config import StrictModel

# The `image` block comes first in SA-1B annotations: decoding just it skips parsing megabytes of mask RLE.
_IMAGE_BLOCK = re.compile(rb'^\s*\{\s*"image"\s*:\s*')
_IMAGE_EXTS = ("jpg", "jpeg")


class SA1BConfig(StrictModel):
    kind: Literal["sa1b"] = "sa1b"
    root: str = Field(description="folder holding the SA-1B tars")
    pattern: str = Field("sa_*.tar", description="glob of the tars under root")
    name: str = Field("sa1b", pattern=r"^[a-z0-9_]+$", description="source name in keys and manifests")
    max_units: int | None = Field(None, ge=1, description="read only the first N tars (smoke runs)")

    def build(self) -> "SA1BSource":
        return SA1BSource(self)


class AnnotationError(ValueError):
    pass


def parse_image_block(data: bytes) -> dict:
    """The `image` block of an SA-1B annotation: {image_id, width, height, file_name}, validated."""
    block = None
    match = _IMAGE_BLOCK.match(data)
    if match:
        try:
            block, _ = json.JSONDecoder().raw_decode(data[match.end():].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            block = None
    if block is None:  # keys in another order, or a malformed file: the full parse says which
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise AnnotationError(f"malformed annotation JSON: {err}") from None
        if not isinstance(document, dict) or "image" not in document:
            raise AnnotationError("annotation JSON has no 'image' block")
        block = document["image"]
    if not isinstance(block, dict):
        raise AnnotationError(f"annotation 'image' block is a {type(block).__name__}, not an object")
    image_id = block.get("image_id")
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or str(image_id).strip() == "":
        raise AnnotationError(f"annotation has no usable image_id (got {image_id!r})")
    out = {"image_id": str(image_id)}
    for field in ("width", "height"):
        value = block.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise AnnotationError(f"annotation {field} must be a positive integer (got {value!r})")
        out[field] = value
    out["file_name"] = str(block.get("file_name", ""))
    return out


class SA1BSource(Source):
    def list_units(self, work_dir: Path) -> list[WorkUnit]:
        root = self.root()
        tars = sorted(root.glob(self.config.pattern))
        if self.config.max_units:
            tars = tars[: self.config.max_units]
        return [WorkUnit(id=safe_unit_id(tar.name), kind="tar", root=str(root), paths=(str(tar.resolve()),))
                for tar in tars]

    def read_unit(self, unit: WorkUnit) -> Iterator[RawSample]:
        # jpg and json of a sample are adjacent in SA-1B tars; pairing by stem tolerates any order at the cost of
        # holding unpaired members until their partner (or the end of the tar) arrives.
        pending: dict[str, dict[str, TarMember]] = {}
        for member in iter_tar(unit.paths[0]):
            where = f"{unit.id}/{member.name}"
            if member.problem:
                yield self.rejected(where, unit, "source", member.problem)
                continue
            stem, ext = split_member_name(member.name)
            slot = "image" if ext in _IMAGE_EXTS else "json" if ext == "json" else None
            if slot is None:
                yield self.rejected(where, unit, "source", f"unexpected member {member.name!r} in an SA-1B tar")
                continue
            group = pending.setdefault(stem, {})
            if slot in group:
                yield self.rejected(where, unit, "duplicate_id", f"member {member.name!r} appears twice in the tar")
                continue
            group[slot] = member
            if len(group) == 2:
                del pending[stem]
                yield self._pair(unit, stem, group["image"], group["json"])
        for stem, group in pending.items():
            if "image" in group:
                yield self.rejected(f"{unit.id}/{group['image'].name}", unit, "source",
                                    f"missing annotation {stem}.json for {group['image'].name}")
            else:
                yield self.rejected(f"{unit.id}/{group['json'].name}", unit, "source",
                                    f"annotation {group['json'].name} has no image")

    def _pair(self, unit: WorkUnit, stem: str, image: TarMember, annotation: TarMember) -> RawSample:
        try:
            block = parse_image_block(annotation.data or b"")
        except AnnotationError as err:
            return self.rejected(f"{unit.id}/{annotation.name}", unit, "source", f"{annotation.name}: {err}")
        return self.sample(block["image_id"], unit, data=image.data, source_meta=block)
