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
from curation.buckets import BucketConfig, Bucketed, Bucketer, pixels_to_bytes
from curation.images import ImageError, ImageInfo, is_animated, probe
from curation.sources.base import RawSample, Rejection, Source, WorkUnit
from curation.writer import SCREEN_SCHEMA, DatasetLayout
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
    bucketed: Bucketed | None = None  # the bucket crop, when pass 1 keeps it for pass 2


def screen(sample: RawSample, min_side: int, max_aspect_ratio: float | None, max_pixels: int | None,
           hash_size: int | None, bucketer: Bucketer | None = None, keep_pixels: bool = False) -> Screened:
    """Source problems, then decodability, then sizes, then pHash.

    With a pHash to compute or pixels to keep, the picture is decoded once, as pass 2 would (`bucketer`: the draft
    decode that covers the bucket), which also reads the whole stream and so finds truncated files; the pHash is
    taken from that decode. Otherwise only the header is read, and a file whose pixels turn out to be broken is
    rejected by the second pass instead.
    """
    if sample.reject is not None:
        return Screened(sample.reject)
    try:
        bucketer = bucketer or Bucketer(BucketConfig(), max_pixels)
        return _screen(sample, min_side, max_aspect_ratio, max_pixels, hash_size, bucketer, keep_pixels)
    except Exception as err:  # noqa: BLE001 - one sample never stops the job
        return Screened(sample_rejection("screen", sample.key, err))


def _screen(sample: RawSample, min_side: int, max_aspect_ratio: float | None, max_pixels: int | None,
            hash_size: int | None, bucketer: Bucketer, keep_pixels: bool) -> Screened:
    data = sample.data or b""
    bucketed = None
    try:
        if hash_size or keep_pixels:
            bucketed = bucketer(data)
            info = bucketed.info
        else:
            info = probe(data, max_pixels)
    except ImageError as err:
        return Screened(Rejection("decode", str(err)))
    rejection = size_rejection(info, min_side, max_aspect_ratio)
    if rejection is not None:
        return Screened(rejection, info)
    if not hash_size:
        return Screened(None, info, bucketed=bucketed if keep_pixels else None)
    return Screened(None, info, phash_int(hash_input(bucketed.decoded, hash_size), hash_size),
                    is_animated(data, info), bucketed if keep_pixels else None)


def hash_input(image, hash_size: int):
    """The picture the pHash is computed from: the decode, box-reduced by an integer factor to at least twice the
    hash's 4 * hash_size thumbnail. The same result for the same decode, and a fraction of the cost of letting the
    hash's Lanczos resize read every decoded pixel."""
    factor = min(image.size) // (8 * hash_size)
    return image.reduce(factor) if factor >= 2 else image


class ScreenStage:
    """Pass 1 over one unit: screen every record and write the unit's screen part. Unit row in, summary row out.

    With `buckets.keep_pixels`, each picture that passes is decoded once, here, and its bucket crop is kept in the
    screen part (written a row group at a time, so a unit never sits in memory) for pass 2 to reuse.
    """

    ROW_GROUP = 32

    def __init__(self, source: Source, root: str | Path, filters: FilterConfig, min_side: int,
                 buckets: BucketConfig | None = None, caption_image_size: int | None = None):
        self.source = source
        self.layout = DatasetLayout(root)
        self.filters = filters
        self.min_side = min_side
        buckets = buckets or BucketConfig()
        self.keep_pixels = buckets.keep_pixels
        self.bucketer = Bucketer(buckets, filters.max_pixels, caption_image_size)
        self.schema = SCREEN_SCHEMA
        if self.keep_pixels:
            self.schema = SCREEN_SCHEMA.append(pa.field("pixels", pa.binary())).append(
                pa.field("caption_pixels", pa.binary()))

    def __call__(self, unit_row: dict) -> dict:
        """Unit row in, {unit, seen, passed, failed} out; `failed` is the reason when the unit could not be read."""
        import pyarrow.parquet as pq

        from common.durable import publish, temp_name

        unit = WorkUnit.from_row(unit_row)
        near = self.filters.near_duplicates
        target = self.layout.screen_part(unit.id)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(target)
        seen = passed = 0
        try:
            with pq.ParquetWriter(tmp, self.schema) as writer:
                records = []
                for sample in self.source.iter_unit(unit):
                    result = screen(sample, self.min_side, self.filters.max_aspect_ratio, self.filters.max_pixels,
                                    near.hash_size if near else None, self.bucketer, self.keep_pixels)
                    record = {
                        "unit": unit.id, "ordinal": sample.ordinal, "key": sample.key, "source": sample.source,
                        "source_id": sample.source_id, "stage": result.rejection.stage if result.rejection else "",
                        "reason": result.rejection.reason if result.rejection else "", "phash": result.phash,
                        "orig_h": result.info.height if result.info else None,
                        "orig_w": result.info.width if result.info else None, "animated": result.animated,
                    }
                    if self.keep_pixels:
                        kept = result.bucketed
                        record["pixels"] = pixels_to_bytes(kept.pixels) if kept else None
                        record["caption_pixels"] = pixels_to_bytes(kept.caption_pixels) if kept else None
                    records.append(record)
                    seen += 1
                    passed += not record["stage"]
                    if len(records) == self.ROW_GROUP:
                        writer.write_table(pa.Table.from_pylist(records, schema=self.schema))
                        records = []
                writer.write_table(pa.Table.from_pylist(records, schema=self.schema))
            publish(tmp, target)
        except Exception as err:  # noqa: BLE001 - the unit fails, the job goes on with the others
            tmp.unlink(missing_ok=True)
            failure = mark_failed(self.layout, unit.id, "screen", err)
            return {"unit": unit.id, "seen": seen, "passed": 0, "failed": failure["reason"]}
        return {"unit": unit.id, "seen": seen, "passed": passed, "failed": ""}
