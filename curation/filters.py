"""Cheap per-sample filters and the first pass that applies them: decodable, minimum side, aspect ratio, pHash.

Each filter is configurable and each rejection is a `Rejection(stage, reason)`. The first pass (`ScreenStage`) reads
a whole unit, decodes every image at a small draft size (enough to find truncated files and to compute the pHash;
only the header when the near-duplicate search is off), and writes one record per sample to
`work/screen/<unit>.parquet`: the input to the global duplicate search.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from curation.aesthetic import AestheticConfig
from curation.dedup import phash_int
from curation.failures import mark_failed, sample_rejection
from curation.images import ImageError, ImageInfo, decode, is_animated, probe
from curation.sources.base import RawSample, Rejection, Source, WorkUnit
from curation.writer import SCREEN_SCHEMA, DatasetLayout, write_parquet
from common.config import StrictModel


class NearDuplicateConfig(StrictModel):
    hash_size: int = Field(8, ge=2, le=8, description="pHash side: hash_size**2 bits (at most 64)")
    max_distance: int = Field(4, ge=0, le=31, description="Hamming distance at or below which two images are "
                              "near-duplicates")


class FilterConfig(StrictModel):
    min_side: int | None = Field(None, ge=0, description="reject images whose shorter side is below this; "
                                 "default: the bucket base resolution")
    max_aspect_ratio: float | None = Field(4.0, ge=1.0, description="reject when max(H/W, W/H) exceeds this "
                                           "(PixArt's buckets end at 4)")
    max_pixels: int | None = Field(None, ge=1, description="reject images with more pixels (PIL's bomb guard "
                                   "always applies as well)")
    near_duplicates: NearDuplicateConfig | None = Field(default_factory=NearDuplicateConfig,
                                                        description="null disables the pHash search")
    aesthetic: AestheticConfig | None = Field(None, description="LAION aesthetic predictor on CLIP ViT-L/14 "
                                              "(a model stage, run after the cheap filters)")


def size_rejection(info: ImageInfo, min_side: int, max_aspect_ratio: float | None) -> Rejection | None:
    """The size filters, on the header's size in display orientation."""
    short, long = sorted(info.size_hw)
    if short < min_side:
        return Rejection("min_side", f"shorter side {short} px < min_side {min_side} ({info.height}x{info.width})")
    if max_aspect_ratio is not None and long / short > max_aspect_ratio:
        return Rejection("aspect_ratio", f"aspect ratio {long / short:.2f} > {max_aspect_ratio} "
                         f"({info.height}x{info.width})")
    return None


@dataclass
class Screened:
    rejection: Rejection | None
    info: ImageInfo | None = None
    phash: int | None = None
    animated: bool = False


def screen(sample: RawSample, min_side: int, max_aspect_ratio: float | None, max_pixels: int | None,
           hash_size: int | None) -> Screened:
    """Source problems, then decodability, then sizes, then pHash.

    With a pHash to compute, the image is decoded at a small draft size, which also reads the whole stream and so
    finds truncated files. Without one, only the header is read; a file whose pixels turn out to be broken is then
    rejected by the second pass instead.
    """
    if sample.reject is not None:
        return Screened(sample.reject)
    try:
        return _screen(sample, min_side, max_aspect_ratio, max_pixels, hash_size)
    except Exception as err:  # noqa: BLE001 - one sample never stops the job
        return Screened(sample_rejection("screen", sample.key, err))


def _screen(sample: RawSample, min_side: int, max_aspect_ratio: float | None, max_pixels: int | None,
            hash_size: int | None) -> Screened:
    try:
        if hash_size:
            # Aim the draft at twice the hash thumbnail: enough detail for a stable pHash, 1/8 scale for big JPEGs.
            side = 8 * hash_size
            image, info = decode(sample.data or b"", min_size_hw=(side, side), max_pixels=max_pixels)
        else:
            image, info = None, probe(sample.data or b"", max_pixels)
    except ImageError as err:
        return Screened(Rejection("decode", str(err)))
    rejection = size_rejection(info, min_side, max_aspect_ratio)
    if rejection is not None:
        return Screened(rejection, info)
    return Screened(None, info, phash_int(image, hash_size) if hash_size else None,
                    is_animated(sample.data or b"", info) if hash_size else False)


class ScreenStage:
    """Pass 1 over one unit: screen every record and write the unit's screen part. Unit row in, summary row out."""

    def __init__(self, source: Source, root: str | Path, filters: FilterConfig, min_side: int):
        self.source = source
        self.layout = DatasetLayout(root)
        self.filters = filters
        self.min_side = min_side

    def __call__(self, unit_row: dict) -> dict:
        """Unit row in, {unit, seen, passed, failed} out; `failed` is the reason when the unit could not be read."""
        unit = WorkUnit.from_row(unit_row)
        near = self.filters.near_duplicates
        records = []
        try:
            for sample in self.source.iter_unit(unit):
                result = screen(sample, self.min_side, self.filters.max_aspect_ratio, self.filters.max_pixels,
                                near.hash_size if near else None)
                records.append({
                    "unit": unit.id, "ordinal": sample.ordinal, "key": sample.key, "source": sample.source,
                    "source_id": sample.source_id, "stage": result.rejection.stage if result.rejection else "",
                    "reason": result.rejection.reason if result.rejection else "", "phash": result.phash,
                    "orig_h": result.info.height if result.info else None,
                    "orig_w": result.info.width if result.info else None, "animated": result.animated,
                })
            write_parquet(self.layout.screen_part(unit.id), pa.Table.from_pylist(records, schema=SCREEN_SCHEMA))
        except Exception as err:  # noqa: BLE001 - the unit fails, the job goes on with the others
            failure = mark_failed(self.layout, unit.id, "screen", err)
            return {"unit": unit.id, "seen": len(records), "passed": 0, "failed": failure["reason"]}
        passed = sum(1 for r in records if not r["stage"])
        return {"unit": unit.id, "seen": len(records), "passed": passed, "failed": ""}
