"""Decoding untrusted image bytes into RGB pictures: orientation, colour modes, draft decoding, bomb guard.

Every failure is an `ImageError` whose message is the reason recorded for the rejected sample, so no exception from
a bad file ever escapes into a job. PIL's decompression-bomb guard stays on: its warning (over
`Image.MAX_IMAGE_PIXELS`) is turned into a rejection as well as its error (over twice that).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# EXIF orientations 5..8 rotate by 90 degrees: the displayed width is the stored height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image that cannot be used; `str(err)` is the human-readable reason that gets recorded."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, in display orientation (after EXIF rotation)."""

    height: int
    width: int
    format: str
    mode: str
    orientation: int = 1

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.height, self.width


def open_image(data: bytes, max_pixels: int | None = None) -> tuple[Image.Image, ImageInfo]:
    """Open (lazily: pixels are not decoded yet) and describe an image; raise ImageError for anything unusable."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"decompression bomb: {err}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unidentified format)") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for malformed headers
        raise ImageError(f"unreadable image header: {type(err).__name__}: {err}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"degenerate image size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"decompression bomb: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return image, ImageInfo(height=height, width=width, format=str(image.format), mode=image.mode,
                            orientation=orientation)


def is_animated(data: bytes, info: ImageInfo) -> bool:
    """More than one frame (GIF, APNG, animated WebP); read from the header, no pixels decoded. JPEGs never are."""
    if info.format == "JPEG":
        return False
    try:
        return bool(getattr(Image.open(io.BytesIO(data)), "is_animated", False))
    except Exception:  # noqa: BLE001 - a frame table that cannot be read: treat as a still picture
        return False


def probe(data: bytes, max_pixels: int | None = None) -> ImageInfo:
    """Header-only description (size after EXIF orientation, format, mode); decodes no pixels."""
    return open_image(data, max_pixels)[1]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited over white (a transparent logo stays readable);
    16-bit and 32-bit integer images are scaled to 8 bits rather than clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode != "F" and array.max(initial=0) > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _oriented_to_stored(size_wh: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size_wh[1], size_wh[0]) if orientation in _TRANSPOSING_ORIENTATIONS else size_wh


DRAFT_SCALES = (8, 4, 2, 1)


def draft_scale(stored_wh: tuple[int, int], want_wh: tuple[int, int]) -> int:
    """The DCT scale a JPEG draft decode of a `stored_wh` image uses when asked for at least `want_wh`: the largest
    of 8, 4, 2, 1 that divides neither side below the request (PIL's rule), 1 when the image is smaller."""
    ratio = min(stored_wh[0] // max(1, want_wh[0]), stored_wh[1] // max(1, want_wh[1]))
    return next((s for s in DRAFT_SCALES if ratio >= s), 1)


def draft_size(stored_wh: tuple[int, int], scale: int) -> tuple[int, int]:
    """The size a JPEG decodes to at DCT `scale` (libjpeg rounds up)."""
    return -(-stored_wh[0] // scale), -(-stored_wh[1] // scale)


def decode(data: bytes, min_size_hw: tuple[int, int] | None = None, max_pixels: int | None = None,
           draft: bool = True) -> tuple[Image.Image, ImageInfo]:
    """Decode to an RGB picture in display orientation.

    With `min_size_hw` and `draft`, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale that still covers
    that size: the DCT skips the detail a downscale would throw away, which is most of the cost for large photos.
    The returned ImageInfo always describes the original (undrafted) image.
    """
    image, info = open_image(data, max_pixels)
    try:
        if draft and min_size_hw is not None and info.format == "JPEG":
            want = _oriented_to_stored((max(1, min_size_hw[1]), max(1, min_size_hw[0])), info.orientation)
            if draft_scale(image.size, want) > 1:
                image.draft(image.mode, want)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            if info.orientation != 1:
                image = ImageOps.exif_transpose(image)
            image = to_rgb(image)
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated data, bad Huffman tables, broken chunks, ...
        raise ImageError(f"undecodable image: {type(err).__name__}: {err}") from None
    return image, info
