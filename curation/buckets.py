"""PixArt-alpha's aspect-ratio buckets: the official 40-bucket tables, nearest ratio, resize-to-cover + center crop.

A bucket is a pixel size [H, W]; images of similar aspect ratio share one, so a batch stacks without padding.
`bucket_table(256|512|1024)` is the official ASPECT_RATIO_<res> table (ratios 0.25..4, ratio = H / W). Other base
resolutions (the demo trains at 64 px) scale the 256 table and round each side to `multiple`; the official 512 and
1024 tables are exactly that rule applied with multiples of 32 and 64.
"""
from __future__ import annotations

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
        self.buckets = buckets
        self.table = buckets.table()
        self.max_pixels = max_pixels
        self.caption_image_size = caption_image_size

    def __call__(self, unit_row: dict):
        from curation.failures import mark_failed
        from curation.sources.base import WorkUnit
        from curation.writer import read_plan

        unit = WorkUnit.from_row(unit_row)
        try:
            todo = {row["ordinal"]: row["key"] for row in read_plan(self.layout, unit.id) if not row["stage"]}
            for sample in self.source.iter_unit(unit):
                key = todo.pop(sample.ordinal, None)
                if key is None:
                    continue
                if key != sample.key:
                    raise InputChangedError(f"unit {unit.id}: record {sample.ordinal} is now {sample.key}, was "
                                            f"{key} when screened; use a fresh output folder for changed input")
                yield self.prepare(sample)
            if todo:
                raise InputChangedError(f"unit {unit.id}: {len(todo)} screened records are gone from the input")
        except Exception as err:  # noqa: BLE001 - the unit fails, the job goes on with the others
            # Its samples that went out are staged but the unit never commits: a rerun redoes it from its plan.
            mark_failed(self.layout, unit.id, "bucket", err)

    def prepare(self, sample) -> dict:
        """One sample's row: decoded and resized to its bucket, or rejected with the stage and reason."""
        from curation.failures import sample_rejection
        from curation.images import ImageError
        from curation.shard_format import FORMAT_VERSION
        from curation.writer import sample_row

        meta = {"key": sample.key, "format_version": FORMAT_VERSION, "source": sample.source,
                "source_id": sample.source_id, "captions": dict(sample.captions), "class_label": sample.class_label}
        if sample.source_meta:
            meta["source_meta"] = sample.source_meta
        try:
            row = self._bucketed(sample, meta)
        except Exception as err:  # noqa: BLE001 - one sample never stops the job
            rejection = sample_rejection("decode" if isinstance(err, ImageError) else "bucket", sample.key, err)
            row = sample_row(sample.key, sample.unit, meta, reject_stage=rejection.stage,
                             reject_reason=rejection.reason)
        if self.caption_image_size and "caption_image" not in row:
            row["caption_image"] = np.zeros((0, 0, 3), np.uint8)
        return row

    def _bucketed(self, sample, meta: dict) -> dict:
        from curation.images import decode, probe
        from curation.writer import sample_row

        info = probe(sample.data or b"", self.max_pixels)
        _, bucket = closest_bucket(info.height, info.width, self.table)
        need = cover_size(info.height, info.width, bucket)
        if self.caption_image_size:
            caption_hw = scaled_size(info.height, info.width, self.caption_image_size)
            need = (max(need[0], caption_hw[0]), max(need[1], caption_hw[1]))
        image, info = decode(sample.data or b"", min_size_hw=need, max_pixels=self.max_pixels,
                             draft=self.buckets.draft)
        pixels = np.asarray(resize_to_bucket(image, bucket, self.buckets.resample))
        if pixels.shape != (bucket[0], bucket[1], 3):
            raise ValueError(f"resized to {pixels.shape}, not the bucket {bucket}")
        meta.update(bucket=list(bucket), orig_size=[info.height, info.width])
        row = sample_row(sample.key, sample.unit, meta, image=pixels)
        if self.caption_image_size:
            height, width = caption_hw
            row["caption_image"] = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
        return row
