"""Test inputs: real photos packed into the sources' layouts, and every kind of bad file the pipeline must survive.

Each generator returns bytes (or writes a file) and says in its name what is wrong with it; `sa1b_fixture` builds a
small SA-1B dataset whose expected outcome is counted by hand in its docstring.
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from curation.captioners.base import CaptionResult, Captioner


# ---- image bytes ----------------------------------------------------------------------------------------------------
def jpeg_bytes(image: Image.Image, quality: int = 90, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, **options)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def photo(photos_dir: Path, name: str) -> bytes:
    return (Path(photos_dir) / name).read_bytes()


def gradient(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (distinct pHashes for distinct seeds)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def truncated_jpeg(data: bytes) -> bytes:
    return data[: len(data) // 2]


def zero_bytes() -> bytes:
    return b""


def not_an_image() -> bytes:
    return b"<html><body>404 not found</body></html>\n" * 20


def png_with_alpha(height: int = 200, width: int = 300, picture: Image.Image | None = None) -> bytes:
    """Left half opaque, right half fully transparent (composited over white it must read white). The opaque part
    is red, or `picture` when given."""
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0) if picture is None else np.asarray(picture.convert("RGB").resize((width, height)))
    rgba[:, : width // 2, 3] = 255
    return png_bytes(Image.fromarray(rgba, "RGBA"))


def cmyk_jpeg(height: int = 200, width: int = 300) -> bytes:
    return jpeg_bytes(gradient(height, width, seed=11).convert("CMYK"))


def gray16_png(height: int = 200, width: int = 300, picture: Image.Image | None = None) -> bytes:
    """A 16-bit greyscale PNG: a horizontal ramp, or `picture` scaled to 16 bits."""
    if picture is None:
        values = np.tile(np.linspace(0, 65535, width).astype(np.uint16), (height, 1))
    else:
        values = np.asarray(picture.convert("L").resize((width, height)), np.uint16) * 257
    return png_bytes(Image.fromarray(values))  # PIL writes mode I;16 as a 16-bit greyscale PNG


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def rgb16_png(height: int = 120, width: int = 160, picture: Image.Image | None = None) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one): a red-to-blue ramp, or `picture`."""
    if picture is None:
        ramp = np.linspace(0, 65535, width)
        pixels = np.zeros((height, width, 3))
        pixels[..., 0], pixels[..., 2] = ramp[::-1], ramp
    else:
        pixels = np.asarray(picture.convert("RGB").resize((width, height)), np.float64) * 257
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels.astype(">u2"))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def decompression_bomb_png(width: int = 20000, height: int = 10000) -> bytes:
    """A few hundred bytes claiming 200 megapixels (over twice PIL's MAX_IMAGE_PIXELS): a 1-bit PNG of zeros."""
    row = b"\x00" + bytes((width + 7) // 8)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(row * height, 9)) + _png_chunk(b"IEND", b""))


def grayscale_jpeg(data: bytes) -> bytes:
    return jpeg_bytes(Image.open(io.BytesIO(data)).convert("L"))


def crop(data: bytes, box: tuple[float, float, float, float]) -> Image.Image:
    """A crop of a photo, box in fractions (left, top, right, bottom): new content with real-photo statistics."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    return image.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))


def exif_rotated_jpeg(data: bytes, orientation: int = 6) -> bytes:
    """The same pixels stored sideways with the EXIF tag that rotates them back: orientation 6 displays the stored
    image rotated 90 degrees clockwise, so we store it rotated 90 degrees counter-clockwise."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    stored = image.transpose(Image.Transpose.ROTATE_90) if orientation == 6 else image
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(stored, exif=exif.tobytes())


def recompressed(data: bytes, scale: float = 0.8, quality: int = 70) -> bytes:
    """A near-duplicate: the same photo resized and re-encoded."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return jpeg_bytes(image.resize((int(image.width * scale), int(image.height * scale))), quality=quality)


# ---- archives ---------------------------------------------------------------------------------------------------------
def sa1b_annotation(image_id, width: int, height: int, file_name: str, masks: int = 3) -> bytes:
    """An SA-1B-style annotation: the image block first, then (unused) mask annotations."""
    annotations = [{"id": image_id * 100 + i, "bbox": [0, 0, 10, 10], "area": 100,
                    "segmentation": {"size": [height, width], "counts": "x" * 500}} for i in range(masks)]
    return json.dumps({"image": {"image_id": image_id, "width": width, "height": height, "file_name": file_name},
                       "annotations": annotations}).encode()


def write_tar(path: Path, members: list[tuple[str, bytes]], symlinks: list[tuple[str, str]] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in symlinks:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def sa1b_pair(image_id: int, data: bytes) -> list[tuple[str, bytes]]:
    size = Image.open(io.BytesIO(data)).size if data[:2] == b"\xff\xd8" else (0, 0)
    return [(f"sa_{image_id}.jpg", data), (f"sa_{image_id}.json", sa1b_annotation(image_id, size[0] or 1,
                                                                                  size[1] or 1, f"sa_{image_id}.jpg"))]


def sa1b_fixture(root: Path, photos_dir: Path) -> dict:
    """Two SA-1B tars mixing the real photos (and crops of them) with bad input; returns EXPECTED_SA1B.

    Hand count, with min_side 64, max_aspect_ratio 4 and near-duplicates at max_distance 6 (the pHashes of
    distinct pictures here are >= 22 bits apart; the recompressed dog is 2 bits from the dog):

    sa_000000.tar (19 records): sa_1 dog, sa_2 dogs, sa_3 truck stored sideways with EXIF orientation 6
      (displays as the original 1200x1800 H x W), sa_7 PNG with alpha, sa_8 CMYK JPEG, sa_9 16-bit grey PNG,
      sa_10 greyscale JPEG: accepted (7). sa_4 truncated JPEG, sa_5 zero bytes, sa_6 HTML bytes, sa_11
      decompression bomb: decode (4). sa_12 malformed JSON, sa_13 without JSON, sa_14.json without image,
      ../evil.jpg, link.jpg symlink: source (5). sa_15 40x60: min_side. sa_16 100x600: aspect_ratio.
      sa_17 the dog resized and recompressed: near_duplicate (key sa1b-1-... sorts before sa1b-17-...).
    sa_000001.tar (3 records): sa_20 groceries, sa_21 16-bit RGB PNG: accepted (2). sa_2 again: duplicate_id.
    sa_000002..4.tar (2 records each): crops of the photos, sa_30..sa_35: accepted (6); they give a job
      enough units to be interrupted between commits.
    Totals: seen 28 = accepted 15 + rejected 13.
    """
    dog, dogs = photo(photos_dir, "dog.jpg"), photo(photos_dir, "dogs.jpg")
    truck, groceries = photo(photos_dir, "truck.jpg"), photo(photos_dir, "groceries.jpg")
    first = [
        *sa1b_pair(1, dog), *sa1b_pair(2, dogs), *sa1b_pair(3, exif_rotated_jpeg(truck)),
        *sa1b_pair(4, truncated_jpeg(dog)), *sa1b_pair(5, zero_bytes()), *sa1b_pair(6, not_an_image()),
        *sa1b_pair(7, png_with_alpha(picture=crop(dog, (0.5, 0, 1, 1)))),
        *sa1b_pair(8, jpeg_bytes(crop(groceries, (0, 0, 0.5, 0.6)).convert("CMYK"))),
        *sa1b_pair(9, gray16_png(picture=crop(truck, (0, 0, 0.6, 0.6)))),
        *sa1b_pair(10, jpeg_bytes(crop(dogs, (0, 0, 0.5, 1)).convert("L"))),
        *sa1b_pair(11, decompression_bomb_png()),
        ("sa_12.jpg", jpeg_bytes(gradient(200, 300, seed=12))), ("sa_12.json", b'{"image": {"image_id": 12, '),
        ("sa_13.jpg", jpeg_bytes(gradient(200, 300, seed=13))),
        ("sa_14.json", sa1b_annotation(14, 300, 200, "sa_14.jpg")),
        ("../evil.jpg", dog),
        *sa1b_pair(15, jpeg_bytes(gradient(40, 60, seed=15))),
        *sa1b_pair(16, jpeg_bytes(gradient(100, 600, seed=16))),
        *sa1b_pair(17, recompressed(dog)),
    ]
    write_tar(root / "sa_000000.tar", first, symlinks=[("link.jpg", "/etc/passwd")])
    second = [*sa1b_pair(20, groceries), *sa1b_pair(21, rgb16_png(picture=crop(groceries, (0.4, 0.4, 1, 1)))),
              *sa1b_pair(2, dogs)]
    write_tar(root / "sa_000001.tar", second)
    crops = [(dog, (0, 0, 0.55, 0.55)), (truck, (0.45, 0, 1, 0.55)), (dogs, (0, 0.45, 0.55, 1)),
             (groceries, (0.2, 0.2, 0.8, 0.8)), (truck, (0.2, 0.2, 0.8, 0.8)), (dog, (0.25, 0, 0.75, 1))]
    for index in range(3):
        pairs = [sa1b_pair(30 + 2 * index + j, jpeg_bytes(crop(*crops[2 * index + j]))) for j in range(2)]
        write_tar(root / f"sa_00000{index + 2}.tar", [member for pair in pairs for member in pair])
    return EXPECTED_SA1B


EXPECTED_SA1B = {
    "seen": 28,
    "accepted_ids": {"1", "2", "3", "7", "8", "9", "10", "20", "21", "30", "31", "32", "33", "34", "35"},
    "rejected_by_reason": {"decode": 4, "source": 5, "min_side": 1, "aspect_ratio": 1, "near_duplicate": 1,
                           "duplicate_id": 1},
}


# ---- a test captioner ---------------------------------------------------------------------------------------------
class SyntheticCaptioner(Captioner):
    """Describes an image by its size and mean colour, deterministically; optionally slow, or failing on request.

    Used as `backend: tests.fixtures_data:SyntheticCaptioner` (a module:factory backend). `delay_s` per batch makes
    a job slow enough to be killed mid-run; `fail_ids` / `raise_ids` exercise the captioner's failure paths.
    """

    def __init__(self, name: str = "synthetic", delay_s: float = 0.0, fail_ids: list[str] = (),
                 raise_ids: list[str] = (), inject_source_caption: bool = False):
        self.name = name
        self.delay_s = delay_s
        self.fail_ids = set(fail_ids)
        self.raise_ids = set(raise_ids)

    def __call__(self, images, source_captions, metas):
        time.sleep(self.delay_s)
        out = []
        for image, source, meta in zip(images, source_captions, metas):
            if meta["source_id"] in self.raise_ids:
                raise RuntimeError(f"captioner crashed on {meta['source_id']}")
            if meta["source_id"] in self.fail_ids:
                out.append(CaptionResult(text=None, ok=False, reason="refused", attempts=2))
                continue
            r, g, b = (int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0))
            text = f"a {image.width}x{image.height} picture, mean colour {r} {g} {b}"
            if source:
                text += f"; source says: {source}"
            out.append(CaptionResult(text=text, ok=True))
        return out

    def provenance(self) -> dict:
        return {"backend": "tests.fixtures_data:SyntheticCaptioner"}


# ---- the standard curation job of the Ray tests ------------------------------------------------------------------
def curate_config(data_root: Path, output: Path, t5_dir: Path, vae_dir: Path, caption_delay_s: float = 0.0) -> dict:
    """The SA-1B fixture at 64 px (toy buckets), tiny models, sized for a 2-CPU local Ray."""
    return {
        "source": {"kind": "sa1b", "root": str(data_root)},
        "output": str(output),
        "buckets": {"resolution": 64},
        "filters": {"min_side": 64, "near_duplicates": {"max_distance": 6}},
        "caption": {"backend": "tests.fixtures_data:SyntheticCaptioner", "name": "synthetic",
                    "options": {"delay_s": caption_delay_s} if caption_delay_s else {},
                    "num_gpus": 0, "num_cpus": 0.25, "batch_size": 2},
        "vae": {"model": str(vae_dir)},
        "t5": {"model": str(t5_dir), "captions": ["synthetic"]},
        "ray": {"read_num_cpus": 0.5, "write_num_cpus": 0.5, "progress": False,
                "vae": {"num_cpus": 0.25, "batch_size": 4},
                "t5": {"num_cpus": 0.25, "batch_size": 8}},
    }


def reference_run(base: Path, photos_dir: Path, t5_dir: Path, vae_dir: Path) -> Path:
    """The uninterrupted run of the standard job, made once per test session (Ray must be up). Returns its folder,
    holding `sa1b/` (input), `config.yaml` and `out/` (the dataset)."""
    import yaml

    from common.config import load_config
    from pipelines.curate import CurateConfig, run

    if (base / "out" / "dataset_card.json").is_file():
        return base
    sa1b_fixture(base / "sa1b", photos_dir)
    (base / "config.yaml").write_text(yaml.safe_dump(curate_config(base / "sa1b", base / "out", t5_dir, vae_dir)))
    run(load_config(base / "config.yaml", CurateConfig))
    return base
