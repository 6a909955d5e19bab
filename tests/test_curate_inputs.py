"""The real input space of the curation job: every (height, width) from 1 to 20,000 against each official bucket
table (property tests), and real encoded files at the sizes cameras and datasets produce, as baseline and
progressive JPEG, PNG and WebP, through the real job."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.config import load_config
from curation.buckets import bucket_table, closest_bucket, cover_size, crop_box, resize_to_bucket
from curation.images import draft_scale, draft_size
from curation.shard_format import iter_shard

SIDES = st.integers(min_value=1, max_value=20_000)
# Sizes that crashed before the crop box was clamped (a -1e-14 offset from float rounding).
CRASHED = [(375, 500), (1500, 2000), (3000, 4000)]


def with_crashes(test):
    for h, w in CRASHED:
        test = example(h, w)(test)
    return test


@pytest.mark.parametrize("resolution", [256, 512, 1024])
@settings(max_examples=150, deadline=None)
@with_crashes
@given(height=SIDES, width=SIDES)
def test_bucket_arithmetic_gives_exactly_the_bucket_for_every_size(resolution, height, width):
    table = bucket_table(resolution)
    ratio, bucket = closest_bucket(height, width, table)
    # The nearest ratio key (ties to the smaller ratio, as the official code): checked against a brute force.
    best = min(abs(float(k) - height / width) for k in table)
    assert abs(float(ratio) - height / width) == best and bucket == table[ratio]
    # The cover size holds the bucket and keeps the aspect ratio to within the rounding of one side.
    cover_h, cover_w = cover_size(height, width, bucket)
    assert cover_h >= bucket[0] and cover_w >= bucket[1]
    assert abs(cover_h * width - cover_w * height) <= max(height, width)
    # A JPEG draft decode (DCT scale 1/s) still covers what the resize needs; twice the scale would not.
    scale = draft_scale((width, height), (cover_w, cover_h))
    assert scale in (1, 2, 4, 8)
    drafted_w, drafted_h = draft_size((width, height), scale)
    if scale > 1:
        assert drafted_w >= cover_w and drafted_h >= cover_h
    if scale < 8:
        assert width // (2 * scale) < cover_w or height // (2 * scale) < cover_h
    # The crop box lies inside the (drafted) image, and the resize gives exactly the bucket, never raising.
    left, top, right, bottom = crop_box(drafted_h, drafted_w, bucket)
    assert 0 <= left < right <= drafted_w and 0 <= top < bottom <= drafted_h
    if drafted_w * drafted_h <= 300_000:  # the PIL resize itself on the small ones (the box check covers all)
        out = resize_to_bucket(Image.new("RGB", (drafted_w, drafted_h), (10, 20, 30)), bucket)
        assert out.size == (bucket[1], bucket[0])


@pytest.mark.parametrize("size_hw", [(500, 375), (4000, 3000), (1080, 1920)])
def test_draft_size_is_what_pil_decodes(size_hw):
    """draft_scale/draft_size describe PIL's own draft decode (libjpeg DCT scaling), checked on real JPEGs."""
    from curation.images import decode

    height, width = size_hw
    data = io.BytesIO()
    flat_picture(height, width, 1).save(data, "JPEG")
    for need in [(height, width), (height // 3, width // 3), (64, 64), (1, 1)]:
        image, _ = decode(data.getvalue(), min_size_hw=need)
        scale = draft_scale((width, height), (need[1], need[0]))
        assert image.size == draft_size((width, height), scale)


# ---- real encoded files through the job ----------------------------------------------------------------------------
CAMERA_SIZES_WH = [(500, 375), (375, 500), (333, 500), (640, 480), (1024, 768), (1920, 1080), (2000, 1500),
                   (4000, 3000), (4032, 3024), (6000, 4000)]
ENCODINGS = {"baseline.jpg": ("JPEG", {"quality": 85}), "progressive.jpg": ("JPEG", {"progressive": True}),
             "png": ("PNG", {"compress_level": 1}), "webp": ("WEBP", {"quality": 50, "method": 0})}


def flat_picture(height: int, width: int, seed: int) -> Image.Image:
    """Smooth ramps (they encode small and fast even at 24 megapixels), different per seed."""
    x = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)
    y = np.linspace(255, 0, height, dtype=np.float32).astype(np.uint8)
    array = np.empty((height, width, 3), np.uint8)
    array[..., 0] = x[None, :]
    array[..., 1] = y[:, None]
    array[..., 2] = (seed * 37) % 256
    return Image.fromarray(array)


@pytest.mark.slow
def test_camera_sizes_in_every_encoding_through_the_curation_job(ray_cluster, tmp_path, tiny_vae_dir):
    from pipelines.curate import CurateConfig, main, run

    folder = tmp_path / "photos"
    folder.mkdir()
    expected = {}
    for seed, (width, height) in enumerate(CAMERA_SIZES_WH):
        picture = flat_picture(height, width, seed)
        for suffix, (fmt, options) in ENCODINGS.items():
            name = f"{width}x{height}.{suffix}"
            picture.save(folder / name, fmt, **options)
            expected[name] = (height, width)
    config = {"source": {"kind": "folder", "root": str(folder), "unit_size": 8}, "output": str(tmp_path / "out"),
              "buckets": {"resolution": 256}, "filters": {"near_duplicates": None},
              "vae": {"model": str(tiny_vae_dir)}, "t5": None,
              "ray": {"progress": False, "vae": {"batch_size": 8}}}
    # First as a user without network would: the default hub VAE stops the job at once, one line naming
    # vae.model, with no output folder left to refuse the corrected rerun.
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump({**config, "vae": {}}))
    assert main(["--config", str(tmp_path / "hub.yaml")]) == 2
    assert not (tmp_path / "out").exists()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    card = run(load_config(tmp_path / "config.yaml", CurateConfig))

    counts = card["counts"]
    assert counts == {"seen": 40, "accepted": 40, "rejected": 0, "rejected_by_reason": {}}
    manifest = {row["source_id"]: row for row in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert set(manifest) == set(expected)
    table = bucket_table(256)
    for name, (height, width) in expected.items():
        row = manifest[name]
        assert (row["orig_h"], row["orig_w"]) == (height, width), name
        assert (row["bucket_h"], row["bucket_w"]) == closest_bucket(height, width, table)[1], name
    for shard in sorted({row["shard"] for row in manifest.values()}):
        for sample in iter_shard(tmp_path / "out" / shard):
            bucket_h, bucket_w = sample.meta["bucket"]
            assert sample.latent_mean.shape == (4, bucket_h // 8, bucket_w // 8)
            assert np.isfinite(sample.latent_mean.astype(np.float32)).all()
    assert json.loads((tmp_path / "out" / "dataset_card.json").read_text())["counts"]["seen"] == 40
    assert math.isclose(sum(card["buckets"].values()), 40)
