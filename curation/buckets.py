"""PixArt-alpha's aspect-ratio buckets: the official 40-bucket tables, nearest ratio, resize-to-cover + center crop.

A bucket is a pixel size [H, W]; images of similar aspect ratio share one, so a batch stacks without padding.
`bucket_table(256|512|1024)` is the official ASPECT_RATIO_<res> table (ratios 0.25..4, ratio = H / W). Other base
resolutions (the demo trains at 64 px) scale the 256 table and round each side to `multiple`; the official 512 and
1024 tables are exactly that rule applied with multiples of 32 and 64.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from common.config import StrictModel

# Official ASPECT_RATIO_256 (PixArt-alpha, diffusion/data/datasets/utils.py): ratio key -> [H, W].
ASPECT_RATIO_256: dict[str, tuple[int, int]] = {
    "0.25": (128, 512), "0.26": (128, 496), "0.27": (128, 480), "0.28": (128, 464),
    "0.32": (144, 448), "0.33": (144, 432), "0.35": (144, 416), "0.4": (160, 400),
    "0.42": (160, 384), "0.48": (176, 368), "0.5": (176, 352), "0.52": (176, 336),
    "0.57": (192, 336), "0.6": (192, 320), "0.68": (208, 304), "0.72": (208, 288),
    "0.78": (224, 288), "0.82": (224, 272), "0.88": (240, 272), "0.94": (240, 256),
    "1.0": (256, 256), "1.07": (256, 240), "1.13": (272, 240), "1.21": (272, 224),
    "1.29": (288, 224), "1.38": (288, 208), "1.46": (304, 208), "1.67": (320, 192),
    "1.75": (336, 192), "2.0": (352, 176), "2.09": (368, 176), "2.4": (384, 160),
    "2.5": (400, 160), "2.89": (416, 144), "3.0": (432, 144), "3.11": (448, 144),
    "3.62": (464, 128), "3.75": (480, 128), "3.88": (496, 128), "4.0": (512, 128),
}
# The official tables are ASPECT_RATIO_256 scaled by 2 and 4; their sides are multiples of these.
OFFICIAL_MULTIPLES = {256: 16, 512: 32, 1024: 64}


class BucketConfig(StrictModel):
    """Which bucket table images are resized to."""

    resolution: int = Field(256, ge=16, description="base resolution: 256/512/1024 give PixArt's official tables")
    multiple: int | None = Field(None, ge=1, description="round scaled sides to this; default: 16 for 256 and for "
                                 "non-official resolutions (VAE factor 8 x patch 2), 32 for 512, 64 for 1024")
    resample: str = Field("bicubic", description="PIL resampling filter (PixArt uses bicubic)")
    draft: bool = Field(True, description="decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that still "
                        "covers the bucket: several times faster for large photos")
    keep_pixels: bool = Field(True, description="decode each picture once: pass 1 keeps its bucket crop (raw, "
                              "H x W x 3 bytes: 196 KB at 256 px, 3 MB at 1024 px) in work/screen/ until its unit "
                              "is committed, and pass 2 reuses it. false: pass 2 decodes again (less temporary disk); "
                              "the output is the same either way")

    @field_validator("resample")
    @classmethod
    def _known_filter(cls, value: str) -> str:
        if value.upper() not in Image.Resampling.__members__:
            raise ValueError(f"unknown resampling filter {value!r}; one of {sorted(Image.Resampling.__members__)}")
        return value

    @property
    def resolved_multiple(self) -> int:
        return self.multiple if self.multiple is not None else OFFICIAL_MULTIPLES.get(self.resolution, 16)

    def table(self) -> dict[str, tuple[int, int]]:
        return bucket_table(self.resolution, self.resolved_multiple)


@lru_cache(maxsize=None)
def _table(resolution: int, multiple: int) -> tuple[tuple[str, tuple[int, int]], ...]:
    def side(value: int) -> int:
        return max(multiple, int(round(value * resolution / 256 / multiple)) * multiple)

    return tuple((ratio, (side(h), side(w))) for ratio, (h, w) in ASPECT_RATIO_256.items())


def bucket_table(resolution: int = 256, multiple: int | None = None) -> dict[str, tuple[int, int]]:
    """Ratio key (H / W as in the official tables) -> bucket [H, W] for a base resolution."""
    if multiple is None:
        multiple = OFFICIAL_MULTIPLES.get(resolution, 16)
    return dict(_table(int(resolution), int(multiple)))


def closest_bucket(height: int, width: int, table: dict[str, tuple[int, int]]) -> tuple[str, tuple[int, int]]:
    """The bucket whose ratio key is nearest to height / width (ties go to the smaller ratio, as officially)."""
    aspect = height / width
    ratio = min(table, key=lambda key: abs(float(key) - aspect))
    return ratio, table[ratio]


def cover_size(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The smallest size with the image's aspect ratio that covers the bucket: what gets decoded before the crop."""
    scale = max(bucket[0] / height, bucket[1] / width)
    return max(bucket[0], round(height * scale)), max(bucket[1], round(width * scale))


def crop_box(height: int, width: int, bucket: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centered box (left, top, right, bottom) of an image `height` x `width` that scales to exactly `bucket`.

    The box keeps the bucket's aspect ratio and spans the image along the side that limits the scale. Float division
    can make that side exceed the image by a rounding error (a box offset of -1e-14, which PIL refuses), so the
    box is clamped inside the image: it never leaves it, whatever the sizes.
    """
    bucket_h, bucket_w = bucket
    scale = max(bucket_h / height, bucket_w / width)
    crop_w, crop_h = min(float(width), bucket_w / scale), min(float(height), bucket_h / scale)
    left, top = max(0.0, (width - crop_w) / 2), max(0.0, (height - crop_h) / 2)
    return left, top, min(float(width), left + crop_w), min(float(height), top + crop_h)


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int], resample: str = "bicubic") -> Image.Image:
    """Resize to cover `bucket` (H, W), then center crop to it, as one PIL resize over the crop box.

    Equivalent to PixArt's Resize(cover) + CenterCrop(bucket) without the intermediate image; the box is in the
    coordinates of `image` (which may be a draft-decoded reduction of the original). The result is exactly the
    bucket's size for every input size.
    """
    bucket_h, bucket_w = bucket
    width, height = image.size
    return image.resize((bucket_w, bucket_h), Image.Resampling[resample.upper()],
                        box=crop_box(height, width, bucket))


class InputChangedError(RuntimeError):
    """A unit no longer reads as it did when it was screened: its output folder belongs to other input."""


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) with the shorter side at most `short_side`, aspect kept (never upscaled)."""
    scale = min(1.0, short_side / min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class Bucketed:
    """What one picture becomes: its bucket, the header info, the decode the crop was cut from (the pHash is taken
    from it too), the crop itself and, when captioning wants one, an uncropped picture for the captioner."""

    bucket: tuple[int, int]
    info: object  # curation.images.ImageInfo of the original
    decoded: Image.Image
    pixels: np.ndarray
    caption_pixels: np.ndarray | None = None


class Bucketer:
    """Decode + resize to the bucket, written once for both passes: JPEGs are draft-decoded at the smallest DCT
    scale that still covers the bucket (and the caption picture, when there is one)."""

    def __init__(self, buckets: BucketConfig, max_pixels: int | None = None, caption_image_size: int | None = None):
        self.buckets = buckets
        self.table = buckets.table()
        self.max_pixels = max_pixels
        self.caption_image_size = caption_image_size

    def __call__(self, data: bytes) -> Bucketed:
        from curation.images import decode, probe

        info = probe(data, self.max_pixels)
        _, bucket = closest_bucket(info.height, info.width, self.table)
        need = cover_size(info.height, info.width, bucket)
        if self.caption_image_size:
            caption_hw = scaled_size(info.height, info.width, self.caption_image_size)
            need = (max(need[0], caption_hw[0]), max(need[1], caption_hw[1]))
        image, info = decode(data, min_size_hw=need, max_pixels=self.max_pixels, draft=self.buckets.draft)
        pixels = np.asarray(resize_to_bucket(image, bucket, self.buckets.resample))
        if pixels.shape != (bucket[0], bucket[1], 3):
            raise ValueError(f"resized to {pixels.shape}, not the bucket {bucket}")
        caption = None
        if self.caption_image_size:
            caption = np.asarray(image.resize((caption_hw[1], caption_hw[0]), Image.Resampling.BICUBIC))
        return Bucketed(bucket, info, image, pixels, caption)


class BucketStage:
    """Pass 2 reader over one unit: the samples its plan sends to encoding, decoded and resized to their bucket.

    Unit row in, sample rows out (a generator: a large unit streams). JPEGs are draft-decoded at the smallest DCT
    scale that still covers the bucket. With `caption_image_size`, a second, uncropped picture with that shorter
    side goes along for the captioner (captioners see more than a 256 px crop).
    """

    def __init__(self, source, root, buckets: BucketConfig, max_pixels: int | None = None,
                 caption_image_size: int | None = None):
        from curation.writer import DatasetLayout

        self.source = source
        self.layout = DatasetLayout(root)
        self.bucketer = Bucketer(buckets, max_pixels, caption_image_size)
        self.caption_image_size = caption_image_size

    def __call__(self, unit_row: dict):
        from curation.failures import mark_failed
        from curation.sources.base import WorkUnit
        from curation.writer import read_plan

        unit = WorkUnit.from_row(unit_row)
        try:
            todo = {row["ordinal"]: row["key"] for row in read_plan(self.layout, unit.id) if not row["stage"]}
            kept = kept_pixels(self.layout.screen_part(unit.id), set(todo))
            for sample in self.source.iter_unit(unit):
                key = todo.pop(sample.ordinal, None)
                if key is None:
                    continue
                if key != sample.key:
                    raise InputChangedError(f"unit {unit.id}: record {sample.ordinal} is now {sample.key}, was "
                                            f"{key} when screened; use a fresh output folder for changed input")
                yield self.prepare(sample, kept.get(sample.ordinal))
            if todo:
                raise InputChangedError(f"unit {unit.id}: {len(todo)} screened records are gone from the input")
        except Exception as err:  # noqa: BLE001 - the unit fails, the job goes on with the others
            # Its samples that went out are staged but the unit never commits: a rerun redoes it from its plan.
            mark_failed(self.layout, unit.id, "bucket", err)

    def prepare(self, sample, kept: Bucketed | None = None) -> dict:
        """One sample's row: decoded and resized to its bucket (or what pass 1 kept of it), or rejected with the
        stage and reason."""
        from curation.failures import sample_rejection
        from curation.images import ImageError
        from curation.shard_format import FORMAT_VERSION
        from curation.writer import sample_row

        meta = {"key": sample.key, "format_version": FORMAT_VERSION, "source": sample.source,
                "source_id": sample.source_id, "captions": dict(sample.captions), "class_label": sample.class_label}
        if sample.source_meta:
            meta["source_meta"] = sample.source_meta
        try:
            bucketed = kept if kept is not None else self.bucketer(sample.data or b"")
            meta.update(bucket=list(bucketed.bucket), orig_size=[bucketed.info.height, bucketed.info.width])
            row = sample_row(sample.key, sample.unit, meta, image=bucketed.pixels)
            if self.caption_image_size:
                row["caption_image"] = bucketed.caption_pixels
        except Exception as err:  # noqa: BLE001 - one sample never stops the job
            rejection = sample_rejection("decode" if isinstance(err, ImageError) else "bucket", sample.key, err)
            row = sample_row(sample.key, sample.unit, meta, reject_stage=rejection.stage,
                             reject_reason=rejection.reason)
        if self.caption_image_size and "caption_image" not in row:
            row["caption_image"] = np.zeros((0, 0, 3), np.uint8)
        return row


# ---- pixels kept between the passes ------------------------------------------------------------------------------
def pixels_to_bytes(pixels: np.ndarray | None) -> bytes | None:
    """An array as .npy bytes (raw: no compression to pay for; read back without pickle)."""
    if pixels is None:
        return None
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(pixels), allow_pickle=False)
    return buffer.getvalue()


def pixels_from_bytes(data: bytes | None) -> np.ndarray | None:
    if data is None:
        return None
    import io

    return np.load(io.BytesIO(data), allow_pickle=False)


class _KeptInfo:
    """The ImageInfo fields pass 2 needs from a kept sample (the original's size)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width


def kept_pixels(screen_part, ordinals: set[int]):
    """ordinal -> Bucketed that pass 1 kept for the wanted `ordinals`, streamed from the unit's screen part a row
    group at a time (an empty mapping when pass 1 kept none). A lazy mapping: rows are read as the unit is."""
    import pyarrow.parquet as pq

    if not screen_part.is_file():
        return {}
    file = pq.ParquetFile(screen_part)
    if "pixels" not in file.schema_arrow.names:
        return {}
    return _KeptRows(file, ordinals)


class _KeptRows:
    """Walks the screen part in ordinal order alongside the source, keeping only the current row group."""

    COLUMNS = ["ordinal", "orig_h", "orig_w", "pixels", "caption_pixels"]

    def __init__(self, file, ordinals: set[int]):
        self.batches = file.iter_batches(batch_size=32, columns=self.COLUMNS)
        self.ordinals = ordinals
        self.buffer: dict[int, dict] = {}
        self.last = -1

    def get(self, ordinal: int):
        while ordinal > self.last:
            batch = next(self.batches, None)
            if batch is None:
                break
            rows = batch.to_pylist()
            self.buffer = {r["ordinal"]: r for r in rows if r["ordinal"] in self.ordinals and r["pixels"] is not None}
            self.last = rows[-1]["ordinal"] if rows else self.last
        row = self.buffer.pop(ordinal, None)
        if row is None:
            return None
        pixels = pixels_from_bytes(row["pixels"])
        return Bucketed((pixels.shape[0], pixels.shape[1]), _KeptInfo(row["orig_h"], row["orig_w"]), None, pixels,
                        pixels_from_bytes(row["caption_pixels"]))
