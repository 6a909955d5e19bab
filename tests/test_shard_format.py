"""The shard format round-trips through our reader, webdataset's reader and pyarrow, and rejects what it must."""
import io

import numpy as np
import pytest

from curation import shard_format as sf


def _sample(key="sa1b-1-abc", h=4, w=6, tokens=5, width=8, seed=0) -> sf.ShardSample:
    rng = np.random.default_rng(seed)
    meta = {
        "key": key, "format_version": sf.FORMAT_VERSION, "source": "sa1b", "source_id": "1",
        "bucket": [h * 8, w * 8], "latent_hw": [h, w], "orig_size": [480, 720],
        "captions": {"llava": "a dog on grass"}, "t5_tokens": {"llava": tokens}, "class_label": None,
    }
    return sf.ShardSample(
        key=key, meta=meta,
        latent_mean=rng.standard_normal((4, h, w)).astype(np.float16),
        latent_std=rng.random((4, h, w)).astype(np.float16),
        t5={"llava": rng.standard_normal((tokens, width)).astype(np.float16)},
    )


def test_make_key_is_deterministic_and_webdataset_safe():
    a = sf.make_key("sa1b", "sa_1.jpg")
    assert a == sf.make_key("sa1b", "sa_1.jpg")
    assert "." not in a and sf.KEY_PATTERN.match(a)
    # ids that clean to the same text still get distinct keys
    assert sf.make_key("folder", "a/b.jpg") != sf.make_key("folder", "a-b.jpg")


def test_round_trip_own_reader_webdataset_and_manifest(tmp_path):
    import webdataset as wds

    samples = [_sample(key=f"k{i}", seed=i) for i in range(3)]
    shard = tmp_path / sf.SHARDS_DIR / "u0.tar"
    assert sf.write_shard(shard, samples) == 3
    assert not [p for p in shard.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind

    back = list(sf.iter_shard(shard))
    assert [s.key for s in back] == ["k0", "k1", "k2"]
    np.testing.assert_array_equal(back[1].latent_mean, samples[1].latent_mean)
    np.testing.assert_array_equal(back[2].t5["llava"], samples[2].t5["llava"])

    # webdataset's own reader groups the members under the same keys and decodes the arrays.
    got = list(wds.WebDataset(str(shard), shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == ["k0", "k1", "k2"]
    np.testing.assert_array_equal(got[0]["latent_std.npy"], samples[0].latent_std)
    assert got[0]["json"]["captions"]["llava"] == "a dog on grass"

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [sf.manifest_row(s, "shards/u0.tar") for s in samples]
    (tmp_path / sf.MANIFEST_DIR).mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / sf.MANIFEST_DIR / "a.parquet")
    extra = dict(rows[2], score_aesthetic=5.5)
    pq.write_table(pa.Table.from_pylist([extra]), tmp_path / sf.MANIFEST_DIR / "b.parquet")
    table = sf.read_manifest(tmp_path)
    assert table.num_rows == 3 and table.column("score_aesthetic").to_pylist() == [None, None, 5.5]
    assert table.column("caption_llava").to_pylist() == ["a dog on grass"] * 3


@pytest.mark.parametrize("breakage, message", [
    (lambda s: s.meta.pop("bucket"), "required fields"),
    (lambda s: setattr(s, "latent_mean", s.latent_mean.astype(np.float32)), "float16"),
    (lambda s: s.meta.update(latent_hw=[9, 9]), "latent_hw"),
    (lambda s: s.meta.update(t5_tokens={"llava": 99}), "t5_tokens"),
    (lambda s: s.meta.update(format_version=99), "format_version"),
    (lambda s: setattr(s, "key", "has.dot"), "key"),
])
def test_invalid_samples_are_refused_with_the_reason(tmp_path, breakage, message):
    sample = _sample()
    breakage(sample)
    with pytest.raises(sf.ShardFormatError, match=message):
        sf.write_shard(tmp_path / "x.tar", [sample])
    assert not (tmp_path / "x.tar").exists()


def test_reader_never_unpickles(tmp_path):
    obj = np.array([{"evil": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    members = sf.encode_sample(_sample(key="k"))
    members[sf.MEAN_EXT] = buf.getvalue()
    with pytest.raises(sf.ShardFormatError, match="not a readable"):
        sf.decode_sample(members, "k")


def test_duplicate_keys_in_one_shard_are_refused(tmp_path):
    with pytest.raises(sf.ShardFormatError, match="twice"):
        sf.write_shard(tmp_path / "d.tar", [_sample(key="same"), _sample(key="same")])
