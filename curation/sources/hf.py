"""Hugging Face `datasets`: a hub id, a folder saved with `save_to_disk`, or local data files (parquet, json, ...).

The image column holds an `Image` feature (read undecoded: the job decodes, and rejects what does not decode),
raw bytes, or a local file path; caption columns are named in `captions` (caption name -> column).

Work units, deterministic so that a resumed job reads the same records again:
- map-style (the default; Arrow files, random access): `unit_size` consecutive rows, source id `<split>/<row>`;
- `streaming: true` (large hub sets, nothing prepared on disk first): one unit per shard of the stream (a data
  file), read front to back, source id `<split>/<shard>/<position>`.
An `id_column` gives the records their own ids instead. A row that cannot be read becomes a rejected record; a
stream that breaks mid-shard ends its unit with one rejected record that says how far it got.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field, field_validator

from common.config import ConfigError, StrictModel
from curation.sources.base import RawSample, Source, WorkUnit, caption_names
from curation.sources.folder import read_file


class HFDatasetConfig(StrictModel):
    kind: Literal["hf"] = "hf"
    dataset: str = Field(description="hub id, a folder saved with save_to_disk, or a data-file format "
                                     "(parquet, json, csv, imagefolder) with data_files")
    subset: str | None = Field(None, description="the dataset's configuration name (load_dataset's `name`)")
    split: str = "train"
    data_files: str | list[str] | None = Field(None, description="data files or globs (load_dataset's data_files)")
    revision: str | None = Field(None, description="hub revision (a commit, for a reproducible job)")
    image_column: str = "image"
    captions: dict[str, str] = Field(default_factory=dict, description="caption name -> column, e.g. "
                                     "{original: text}")
    id_column: str | None = Field(None, description="a column of unique ids (default: the row's position)")
    label_column: str | None = Field(None, description="an integer class column (class-conditional data)")
    streaming: bool = Field(False, description="stream the dataset instead of preparing it on disk first; "
                                               "units are then the stream's shards (a save_to_disk folder is "
                                               "always read in place, map-style)")
    unit_size: int = Field(1000, ge=1, description="rows per work unit (map-style)")
    name: str = Field("hf", pattern=r"^[a-z0-9_]+$")
    max_units: int | None = Field(None, ge=1)

    @field_validator("captions")
    @classmethod
    def _caption_names(cls, captions: dict[str, str]) -> dict[str, str]:
        return caption_names(captions)

    def build(self) -> "HFDatasetSource":
        return HFDatasetSource(self)


def saved_to_disk(path: Path) -> bool:
    """A folder written by Dataset.save_to_disk / DatasetDict.save_to_disk."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def caption_text(value) -> str | None:
    """A caption from a cell: a string, or the first non-empty string of a list (several captions per image)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)):
        return next((v.strip() for v in value if isinstance(v, str) and v.strip()), None)
    return None


class HFDatasetSource(Source):
    def __init__(self, config: HFDatasetConfig):
        super().__init__(config)
        self._dataset = None

    def __getstate__(self) -> dict:
        # Workers reopen the dataset themselves (memory-mapped or streamed); an open one does not travel.
        return {**self.__dict__, "_dataset": None}

    # ---- opening ---------------------------------------------------------------------------------------------------
    @property
    def local_folder(self) -> Path | None:
        path = Path(self.config.dataset).expanduser()
        return path if path.is_dir() else None

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = self._open()
        return self._dataset

    def _open(self):
        import datasets

        c = self.config
        folder = self.local_folder
        if folder is not None and saved_to_disk(folder):
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if c.split not in loaded:
                    raise ConfigError(f"source.split {c.split!r} is not a split of {folder}; it has "
                                      f"{sorted(loaded)}")
                loaded = loaded[c.split]
        else:
            try:
                loaded = datasets.load_dataset(c.dataset, c.subset, split=c.split, data_files=c.data_files,
                                               revision=c.revision, streaming=c.streaming)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"source.dataset {c.dataset!r}: {err}") from None
            except ValueError as err:  # an unknown split or subset, data files that match nothing
                raise ConfigError(f"source.dataset {c.dataset!r}: {err}") from None
        columns = loaded.column_names
        wanted = {"source.image_column": c.image_column, "source.id_column": c.id_column,
                  "source.label_column": c.label_column,
                  **{f"source.captions.{name}": column for name, column in c.captions.items()}}
        for setting, column in wanted.items():
            if column is not None and columns is not None and column not in columns:
                raise ConfigError(f"{setting}: {column!r} is not a column of {c.dataset}; its columns are {columns}")
        if isinstance(loaded.features.get(c.image_column) if loaded.features else None, datasets.Image):
            loaded = loaded.cast_column(c.image_column, datasets.Image(decode=False))
        return loaded

    @property
    def streaming(self) -> bool:
        import datasets

        return isinstance(self.dataset, datasets.IterableDataset)

    # ---- units (driver) ----------------------------------------------------------------------------------------------
    def list_units(self, work_dir: Path) -> list[WorkUnit]:
        root = self.config.dataset  # as configured, for the reason PixArtSource.images_root gives
        if self.streaming:
            shards = self.dataset.num_shards
            units = [WorkUnit(id=f"shard-{i:06d}", kind="stream", root=root, paths=(f"{i}/{shards}",))
                     for i in range(shards)]
        else:
            rows, size = len(self.dataset), self.config.unit_size
            units = [WorkUnit(id=f"rows-{start // size:06d}", kind="records", root=root,
                              paths=(f"{start}:{min(start + size, rows)}",))
                     for start in range(0, rows, size)]
        return units[: self.config.max_units] if self.config.max_units else units

    # ---- reading (workers) -------------------------------------------------------------------------------------------
    def read_unit(self, unit: WorkUnit) -> Iterator[RawSample]:
        split = self.config.split
        if unit.kind == "stream":
            index, shards = (int(v) for v in unit.paths[0].split("/"))
            yield from self._read_stream(unit, index, shards, split)
            return
        start, stop = (int(v) for v in unit.paths[0].split(":"))
        for row_index in range(start, stop):
            fallback_id = f"{split}/{row_index}"
            try:
                row = self.dataset[row_index]
            except Exception as err:  # a damaged Arrow file or a row the features cannot represent
                yield self.rejected(fallback_id, unit, "source", f"row {row_index} unreadable: "
                                    f"{type(err).__name__}: {err}")
                continue
            yield self._sample(row, fallback_id, unit)

    def _read_stream(self, unit: WorkUnit, index: int, shards: int, split: str) -> Iterator[RawSample]:
        stream = iter(self.dataset.shard(num_shards=shards, index=index))
        position = 0
        while True:
            try:
                row = next(stream)
            except StopIteration:
                return
            except Exception as err:  # a corrupt or truncated data file, a dropped connection
                yield self.rejected(f"{split}/{index}/#stream-error-{position}", unit, "source",
                                    f"shard {index} of {shards} unreadable after {position} rows: "
                                    f"{type(err).__name__}: {err}")
                return
            yield self._sample(row, f"{split}/{index}/{position}", unit)
            position += 1

    def _sample(self, row: dict, fallback_id: str, unit: WorkUnit) -> RawSample:
        c = self.config
        source_id = fallback_id
        if c.id_column is not None:
            value = row.get(c.id_column)
            if value is None or str(value).strip() == "":
                return self.rejected(fallback_id, unit, "source", f"no id in column {c.id_column!r}")
            source_id = str(value).strip()
        data, problem = self._image_bytes(row.get(c.image_column))
        if problem:
            return self.rejected(source_id, unit, "source", problem)
        captions = {name: text for name, column in c.captions.items()
                    if (text := caption_text(row.get(column))) is not None}
        label = row.get(c.label_column) if c.label_column else None
        return self.sample(source_id, unit, data=data, captions=captions,
                           class_label=int(label) if isinstance(label, int) and not isinstance(label, bool) else None)

    def _image_bytes(self, value) -> tuple[bytes | None, str | None]:
        """(bytes, None), or (None, why not): an undecoded Image cell ({bytes, path}), raw bytes or a file path."""
        column = self.config.image_column
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"]), None
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return (bytes(value), None) if value else (None, f"empty image in column {column!r}")
        if isinstance(value, str) and value:
            if "://" in value:
                return None, f"column {column!r} holds a URL ({value[:80]}); download the images first"
            path = Path(value)
            if not path.is_absolute() and self.local_folder is not None:
                path = self.local_folder / path
            try:
                return read_file(path), None
            except OSError as err:
                return None, f"unreadable image file: {err}"
        if value is None:
            return None, f"no image in column {column!r}"
        return None, f"column {column!r} holds a {type(value).__name__}, not an image"
