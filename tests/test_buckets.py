import numpy as np
import pytest
from PIL import Image

from curation.buckets import ASPECT_RATIO_256, BucketConfig, bucket_table, closest_bucket, cover_size, resize_to_bucket
from curation.images import decode
from tests.fixtures_data import exif_rotated_jpeg, photo

# PixArt-alpha's ASPECT_RATIO_1024 (diffusion/data/datasets/utils.py), copied as the independent truth.
OFFICIAL_1024 = {
    '0.25': [512., 2048.], '0.26': [512., 1984.], '0.27': [512., 1920.], '0.28': [512., 1856.],
    '0.32': [576., 1792.], '0.33': [576., 1728.], '0.35': [576., 1664.], '0.4': [640., 1600.],
    '0.42': [640., 1536.], '0.48': [704., 1472.], '0.5': [704., 1408.], '0.52': [704., 1344.],
    '0.57': [768., 1344.], '0.6': [768., 1280.], '0.68': [832., 1216.], '0.72': [832., 1152.],
    '0.78': [896., 1152.], '0.82': [896., 1088.], '0.88': [960., 1088.], '0.94': [960., 1024.],
    '1.0': [1024., 1024.], '1.07': [1024., 960.], '1.13': [1088., 960.], '1.21': [1088., 896.],
    '1.29': [1152., 896.], '1.38': [1152., 832.], '1.46': [1216., 832.], '1.67': [1280., 768.],
    '1.75': [1344., 768.], '2.0': [1408., 704.], '2.09': [1472., 704.], '2.4': [1536., 640.],
    '2.5': [1600., 640.], '2.89': [1664., 576.], '3.0': [1728., 576.], '3.11': [1792., 576.],
    '3.62': [1856., 512.], '3.75': [1920., 512.], '3.88': [1984., 512.], '4.0': [2048., 512.],
}
OFFICIAL_512_SOME = {'0.26': [256.0, 992.0], '0.68': [416.0, 608.0], '1.0': [512.0, 512.0], '2.89': [832.0, 288.0],
                     '3.62': [928.0, 256.0], '4.0': [1024.0, 256.0]}


def test_official_tables():
    assert len(ASPECT_RATIO_256) == 40
    assert bucket_table(1024) == {k: (int(h), int(w)) for k, (h, w) in OFFICIAL_1024.items()}
    table512 = bucket_table(512)
    assert len(table512) == 40
    for key, (h, w) in OFFICIAL_512_SOME.items():
        assert table512[key] == (h, w)
    ratios = [float(k) for k in ASPECT_RATIO_256]
    assert min(ratios) == 0.25 and max(ratios) == 4.0 and ratios == sorted(ratios)


def test_tables_agree_with_diffusers_binning_tables():
    # diffusers ships 33-entry subsets of the same tables for its PixArt pipeline's resolution binning.
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                        ASPECT_RATIO_1024_BIN)

    for resolution, bins in ((256, ASPECT_RATIO_256_BIN), (512, ASPECT_RATIO_512_BIN), (1024, ASPECT_RATIO_1024_BIN)):
        ours = bucket_table(resolution)
        for key, (h, w) in bins.items():
            assert ours[key] == (int(h), int(w)), (resolution, key)


def test_other_resolutions_scale_the_256_table_to_a_multiple():
    table = bucket_table(64, multiple=8)
    assert list(table) == list(ASPECT_RATIO_256)
    for key, (h, w) in table.items():
        assert h % 8 == 0 and w % 8 == 0 and h >= 8 and w >= 8
        h256, w256 = ASPECT_RATIO_256[key]
        assert abs(h - h256 / 4) <= 4 and abs(w - w256 / 4) <= 4  # nearest multiple of 8 of the scaled side
    assert table["1.0"] == (64, 64) and table["4.0"] == (128, 32)
    assert BucketConfig(resolution=64).table()["0.25"] == (32, 128)  # default multiple 16 off the official sizes
    assert BucketConfig(resolution=1024).resolved_multiple == 64


def official_closest(height, width, ratios):
    """PixArt's get_closest_ratio, written out."""
    aspect = height / width
    key = min(ratios.keys(), key=lambda r: abs(float(r) - aspect))
    return ratios[key], float(key)


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_closest_bucket_matches_the_official_rule(resolution):
    table = bucket_table(resolution)
    rng = np.random.default_rng(resolution)
    for height, width in rng.integers(50, 5000, size=(400, 2)):
        key, bucket = closest_bucket(int(height), int(width), table)
        expected_bucket, expected_ratio = official_closest(int(height), int(width), table)
        assert bucket == expected_bucket and float(key) == expected_ratio


def test_resize_to_bucket_matches_resize_then_center_crop(photos_dir):
    image = Image.open(photos_dir / "dogs.jpg").convert("RGB")  # 1072 x 603
    bucket = closest_bucket(image.height, image.width, bucket_table(256))[1]
    out = resize_to_bucket(image, bucket)
    assert out.size == (bucket[1], bucket[0])
    # Reference: PixArt's two steps (Resize to the covering size with int() sizes, then CenterCrop).
    ch, cw = bucket
    if ch / image.height > cw / image.width:
        size = ch, int(image.width * ch / image.height)
    else:
        size = int(image.height * cw / image.width), cw
    resized = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    top, left = int(round((size[0] - ch) / 2.0)), int(round((size[1] - cw) / 2.0))
    reference = np.asarray(resized.crop((left, top, left + cw, top + ch)), np.float64)
    assert np.abs(np.asarray(out, np.float64) - reference).mean() < 2.0


def test_cover_size_covers_the_bucket():
    for h, w in [(1500, 2250), (600, 100), (100, 600), (1000, 1000), (333, 777)]:
        bucket = closest_bucket(h, w, bucket_table(256))[1]
        ch, cw = cover_size(h, w, bucket)
        assert ch >= bucket[0] and cw >= bucket[1]
        assert min(ch - bucket[0], cw - bucket[1]) <= 1  # tight on one side


def test_draft_decode_is_smaller_and_matches_full_decode(photos_dir):
    data = photo(photos_dir, "truck.jpg")  # 1800 x 1200
    bucket = closest_bucket(1200, 1800, bucket_table(256))[1]
    need = cover_size(1200, 1800, bucket)
    drafted, info = decode(data, min_size_hw=need)
    full, _ = decode(data, draft=False)
    assert info.size_hw == (1200, 1800) and full.size == (1800, 1200)
    assert drafted.width < full.width / 2 and drafted.height >= need[0] and drafted.width >= need[1]
    a = np.asarray(resize_to_bucket(drafted, bucket), np.float64)
    b = np.asarray(resize_to_bucket(full, bucket), np.float64)
    assert np.abs(a - b).mean() < 3.0


def test_draft_respects_exif_orientation(photos_dir):
    rotated = exif_rotated_jpeg(photo(photos_dir, "truck.jpg"))
    bucket = closest_bucket(1200, 1800, bucket_table(256))[1]
    image, info = decode(rotated, min_size_hw=cover_size(1200, 1800, bucket))
    assert info.size_hw == (1200, 1800) and info.orientation == 6
    assert image.width > image.height and image.height >= bucket[0]
    upright, _ = decode(photo(photos_dir, "truck.jpg"), min_size_hw=cover_size(1200, 1800, bucket))
    a = np.asarray(resize_to_bucket(image, bucket), np.float64)
    b = np.asarray(resize_to_bucket(upright, bucket), np.float64)
    assert np.abs(a - b).mean() < 4.0


def test_bucket_config_errors_name_the_field():
    from common.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="resample"):
        validate_config({"resample": "sharpest"}, BucketConfig)
    with pytest.raises(ConfigError, match="resolution"):
        validate_config({"resolution": 4}, BucketConfig)


def test_bucket_stage_reads_what_the_plan_sends_and_flags_changed_input(tmp_path, photos_dir):
    import json

    import pyarrow as pa

    from curation.buckets import BucketStage, InputChangedError
    from curation.failures import read_failed
    from curation.shard_format import make_key
    from curation.sources import FolderConfig, build_source
    from curation.writer import PLAN_SCHEMA, DatasetLayout, write_parquet

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(photo(photos_dir, "truck.jpg"))
    (tmp_path / "in" / "b.jpg").write_bytes(b"\xff\xd8\xff broken")
    (tmp_path / "in" / "c.jpg").write_bytes(photo(photos_dir, "dog.jpg"))
    source = build_source(FolderConfig(root=str(tmp_path / "in")))
    unit = source.list_units(tmp_path)[0]
    layout = DatasetLayout(tmp_path / "out")

    def plan(stages):
        rows = [{"ordinal": i, "key": make_key("folder", sid), "source": "folder", "source_id": sid, "stage": st,
                 "reason": st} for i, (sid, st) in enumerate(stages)]
        write_parquet(layout.plan(unit.id), pa.Table.from_pylist(rows, schema=PLAN_SCHEMA))

    plan([("a.jpg", ""), ("b.jpg", ""), ("c.jpg", "near_duplicate")])
    stage = BucketStage(source, layout.root, BucketConfig(resolution=256), caption_image_size=100)
    rows = list(stage(unit.to_row()))
    assert [r["key"] for r in rows] == [make_key("folder", "a.jpg"), make_key("folder", "b.jpg")]  # c is skipped
    good, bad = rows
    meta = json.loads(good["meta"])
    assert meta["orig_size"] == [1200, 1800] and meta["bucket"] == [208, 304]
    assert good["image"].shape == (208, 304, 3) and good["caption_image"].shape == (100, 150, 3)
    assert bad["reject_stage"] == "decode" and bad["image"].shape == (0, 0, 3) and bad["caption_image"].size == 0
    # Changed input fails the unit (recorded for the driver), not the job: the stage stops, nothing raises.
    plan([("a.jpg", ""), ("renamed.jpg", ""), ("c.jpg", "")])
    assert len(list(stage(unit.to_row()))) == 1
    failure = read_failed(layout, unit.id)
    assert failure["stage"] == "bucket" and failure["reason"].startswith(InputChangedError.__name__)
    assert "was" in failure["reason"]
