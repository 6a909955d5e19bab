"""ImageNet-style class folders (`<root>/<synset>/<image>`), for class-conditional stage-1 training.

The class index is the synset's position in a stable list: `classes_file` when given (ImageNet's
`LOC_synset_mapping.txt`: "n01440764 tench, Tinca tinca" per line), else the sorted folder names. Units are
`unit_size` images of the listing sorted by (synset, file name).
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from curation.sources.base import RawSample, Source, WorkUnit, chunked, is_image_name, list_files
from curation.sources.folder import read_file
from common.config import StrictModel


class ImageNetConfig(StrictModel):
    kind: Literal["imagenet"] = "imagenet"
    root: str = Field(description="folder of class folders (ImageNet's train/)")
    classes_file: str | None = Field(None, description="synset list defining class indices (LOC_synset_mapping.txt)")
    class_name_caption: bool = Field(False, description="store the class name as caption `class_name` "
                                     "(needs classes_file with names)")
    unit_size: int = Field(1000, ge=1)
    name: str = Field("imagenet", pattern=r"^[a-z0-9_]+$")
    max_units: int | None = Field(None, ge=1)

    def build(self) -> "ImageNetSource":
        return ImageNetSource(self)


class ImageNetSource(Source):
    @cached_property
    def classes(self) -> dict[str, tuple[int, str]]:
        """synset -> (class index, class name)."""
        if self.config.classes_file:
            entries = []
            for line in Path(self.config.classes_file).read_text().splitlines():
                synset, _, label = line.strip().partition(" ")
                if synset:
                    entries.append((synset, label.split(",")[0].strip() or synset))
        else:
            root = Path(self.config.root)
            entries = [(d.name, d.name) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        index: dict[str, tuple[int, str]] = {}
        for synset, label in entries:
            if synset in index:
                raise ValueError(f"source.classes_file lists synset {synset!r} twice")
            index[synset] = (len(index), label)
        return index

    def list_units(self, work_dir: Path) -> list[WorkUnit]:
        root = self.root()
        if not self.classes:
            raise FileNotFoundError(f"source.root {root} holds no class folders")
        # Only images inside a class folder are samples; the listing's sort order is (synset, file name).
        images = list_files(root, lambda rel: "/" in rel and is_image_name(rel))
        units = [WorkUnit(id=f"{self.name}-{index:06d}", kind="files", root=str(root.resolve()), paths=tuple(chunk))
                 for index, chunk in enumerate(chunked(images, self.config.unit_size))]
        return units[: self.config.max_units] if self.config.max_units else units

    def read_unit(self, unit: WorkUnit) -> Iterator[RawSample]:
        root = Path(unit.root)
        for rel in unit.paths:
            synset = rel.split("/", 1)[0]
            if synset not in self.classes:
                yield self.rejected(rel, unit, "source", f"class folder {synset!r} is not in source.classes_file")
                continue
            label, name = self.classes[synset]
            try:
                data = read_file(root / rel)
            except OSError as err:
                yield self.rejected(rel, unit, "source", f"unreadable file: {err}")
                continue
            captions = {"class_name": name} if self.config.class_name_caption else {}
            yield self.sample(rel, unit, data=data, captions=captions, class_label=label,
                              source_meta={"synset": synset})
