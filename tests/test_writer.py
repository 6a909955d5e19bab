import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.shard_format import FORMAT_VERSION, ShardSample, decode_sample, iter_shard, make_key, read_manifest
from curation.writer import (PLAN_SCHEMA, SCREEN_SCHEMA, DatasetLayout, IncompleteUnitError, RowBatch, UnitWriter,
                             commit_unit, finalize, object_array, sample_row, stage_part, try_commit, write_parquet)


def shard_sample(source_id: str, seed: int = 0, tokens: int = 5, caption: str = "a caption") -> ShardSample:
    rng = np.random.default_rng(seed)
    key = make_key("t", source_id)
    meta = {"key": key, "format_version": FORMAT_VERSION, "source": "t", "source_id": source_id,
            "bucket": [64, 48], "latent_hw": [8, 6], "orig_size": [640, 480], "captions": {"dense": caption},
            "t5_tokens": {"dense": tokens}, "class_label": None, "scores": {"aesthetic": 5.5}}
    return ShardSample(key=key, meta=meta, latent_mean=rng.standard_normal((4, 8, 6)).astype(np.float16),
                       latent_std=rng.random((4, 8, 6)).astype(np.float16),
                       t5={"dense": rng.standard_normal((tokens, 32)).astype(np.float16)})


def write_plan(layout, unit, encode_ids, rejected_ids=()):
    rows = [{"ordinal": i, "key": make_key("t", sid), "source": "t", "source_id": sid, "stage": "", "reason": ""}
            for i, sid in enumerate(encode_ids)]
    rows += [{"ordinal": 100 + i, "key": make_key("t", sid), "source": "t", "source_id": sid, "stage": "min_side",
              "reason": "too small"} for i, sid in enumerate(rejected_ids)]
    write_parquet(layout.plan(unit), pa.Table.from_pylist(rows, schema=PLAN_SCHEMA))
    screen = [{"unit": unit, "ordinal": r["ordinal"], "key": r["key"], "source": "t", "source_id": r["source_id"],
               "stage": r["stage"], "reason": r["reason"], "phash": None, "orig_h": 1, "orig_w": 1} for r in rows]
    write_parquet(layout.screen_part(unit), pa.Table.from_pylist(screen, schema=SCREEN_SCHEMA))


def no_temp_files(root):
    return not [p for p in root.rglob(".*") if p.is_file()]


def test_committed_unit_reads_with_webdataset_and_pyarrow(tmp_path):
    import webdataset as wds

    layout = DatasetLayout(tmp_path)
    samples = [shard_sample(str(i), seed=i, tokens=3 + i) for i in range(3)]
    counts = commit_unit(layout, "u0", samples, [{"key": "k", "source": "t", "source_id": "x", "stage": "decode",
                                                  "reason": "truncated"}])
    assert counts == {"unit": "u0", "accepted": 3, "rejected": 1}
    assert no_temp_files(tmp_path)
    # webdataset's own reader groups members by key; the format's decoder reads its raw dicts.
    read = [decode_sample(raw) for raw in wds.WebDataset(str(layout.shard("u0")), shardshuffle=False)]
    assert [s.key for s in read] == [s.key for s in samples]
    for got, want in zip(read, samples):
        np.testing.assert_array_equal(got.latent_mean, want.latent_mean)
        np.testing.assert_array_equal(got.t5["dense"], want.t5["dense"])
    manifest = pq.read_table(layout.manifest_part("u0"))
    assert manifest.column("key").to_pylist() == [s.key for s in samples]
    assert manifest.column("shard").to_pylist() == ["shards/u0.tar"] * 3
    assert manifest.column("t5_tokens_dense").to_pylist() == [3, 4, 5]
    assert manifest.column("score_aesthetic").to_pylist() == [5.5] * 3
    assert manifest.schema.field("class_label").type == pa.int64()
    assert pq.read_table(layout.rejected_part("u0")).to_pylist() == [
        {"key": "k", "source": "t", "source_id": "x", "stage": "decode", "reason": "truncated", "unit": "u0"}]


def test_unit_without_accepted_samples_commits_without_a_tar(tmp_path):
    layout = DatasetLayout(tmp_path)
    commit_unit(layout, "empty", [], [])
    assert layout.is_committed("empty") and not layout.shard("empty").exists()
    assert pq.read_table(layout.manifest_part("empty")).num_rows == 0


def test_staged_parts_commit_once_complete_in_key_order(tmp_path):
    layout = DatasetLayout(tmp_path)
    ids = [str(i) for i in range(6)]
    samples = {sid: shard_sample(sid, seed=int(sid)) for sid in ids}
    write_plan(layout, "u", ids, rejected_ids=["small"])
    stage_part(layout, "u", [samples["4"], samples["1"]], [])
    stage_part(layout, "u", [samples["4"], samples["1"]], [])  # a retried task: same part name, replaced
    stage_part(layout, "u", [samples["0"]], [{"key": samples["5"].key, "stage": "caption", "reason": "refused"}])
    assert not try_commit(layout, "u") and not layout.is_committed("u")
    stage_part(layout, "u", [samples["3"], samples["2"], samples["0"]], [])  # "0" arrives twice
    assert len(list(layout.staging("u").glob("*.tar"))) == 3
    assert try_commit(layout, "u") and layout.is_committed("u")
    written = list(iter_shard(layout.shard("u")))
    expected = sorted(samples[s].key for s in ids[:5])
    assert [s.key for s in written] == expected  # each key once, sorted, the late rejection left out
    rejected = {r["source_id"]: r["stage"] for r in pq.read_table(layout.rejected_part("u")).to_pylist()}
    assert rejected == {"small": "min_side", "5": "caption"}
    assert try_commit(layout, "u")  # idempotent
    assert no_temp_files(tmp_path)


def test_a_part_without_its_tar_is_detected(tmp_path):
    layout = DatasetLayout(tmp_path)
    write_plan(layout, "u", ["a"])
    stage_part(layout, "u", [shard_sample("a")], [])
    next(layout.staging("u").glob("*.tar")).unlink()
    with pytest.raises(IncompleteUnitError):
        try_commit(layout, "u")
    assert not layout.is_committed("u")


def test_unit_writer_stage_groups_rows_by_unit(tmp_path):
    layout = DatasetLayout(tmp_path)
    a, b = shard_sample("a"), shard_sample("b", seed=1)
    write_plan(layout, "u1", ["a"])
    write_plan(layout, "u2", ["b", "c"])
    rows = []
    for unit, sample in (("u1", a), ("u2", b)):
        row = sample_row(sample.key, unit, sample.meta)
        row.update(latent_mean=sample.latent_mean, latent_std=sample.latent_std, t5_dense=sample.t5["dense"])
        rows.append(row)
    dead = sample_row(make_key("t", "c"), "u2", {}, reject_stage="vae", reject_reason="nan")
    dead.update(latent_mean=np.zeros((0, 0, 0), np.float16), latent_std=np.zeros((0, 0, 0), np.float16),
                t5_dense=np.zeros((0, 32), np.float16))
    rows.append(dead)
    batch = {name: object_array(row[name] for row in rows) for name in rows[0]}
    out = UnitWriter(tmp_path)(batch)
    assert list(out["unit"]) == ["u1", "u2"] and list(out["committed"]) == [True, True]
    assert read_manifest(tmp_path).num_rows == 2
    assert pq.read_table(layout.rejected_part("u2")).column("stage").to_pylist() == ["vae"]


def test_finalize_counts_add_up_and_the_card_says_so(tmp_path):
    layout = DatasetLayout(tmp_path)
    write_plan(layout, "u1", ["a", "b"], rejected_ids=["x"])
    write_plan(layout, "u2", ["c"])
    commit_unit(layout, "u1", [shard_sample("a"), shard_sample("b")],
                [{"key": make_key("t", "x"), "source": "t", "source_id": "x", "stage": "min_side", "reason": "r"}])
    with pytest.raises(IncompleteUnitError, match="not committed"):
        finalize(layout, ["u1", "u2"], {})
    commit_unit(layout, "u2", [shard_sample("c", caption="other")], [])
    card = finalize(layout, ["u1", "u2"], {"some": "config"}, {"captions": ["dense"]})
    assert card["counts"] == {"seen": 4, "accepted": 3, "rejected": 1, "rejected_by_reason": {"min_side": 1}}
    assert card["buckets"] == {"64x48": 3} and card["format_version"] == FORMAT_VERSION
    assert {"torch", "ray", "diffusers", "pyarrow"} <= set(card["library_versions"])
    assert json.loads((tmp_path / "dataset_card.json").read_text()) == card
    assert pq.read_table(tmp_path / "manifest.parquet").num_rows == 3 == read_manifest(tmp_path).num_rows
    # A record that is in neither table breaks the invariant loudly.
    write_plan(layout, "u2", ["c", "lost"])
    with pytest.raises(IncompleteUnitError, match="do not add up"):
        finalize(layout, ["u1", "u2"], {})


def test_row_batch_round_trip():
    rows = [sample_row("k", "u", {"key": "k", "captions": {}}), sample_row("j", "u", {"key": "j"}, reject_stage="x")]
    batch = RowBatch({name: np.asarray([r[name] for r in rows], dtype=object) for name in ("key", "unit", "meta",
                                                                                        "reject_stage", "reject_reason")})
    assert batch.alive() == [0]
    batch.metas[0]["captions"]["new"] = "text"
    batch.reject(0, "caption", "why")
    out = batch.to_batch()
    assert json.loads(out["meta"][0])["captions"] == {"new": "text"} and list(out["reject_stage"]) == ["caption", "x"]


def test_sweep_removes_only_the_named_units_temp_files_and_staging(tmp_path):
    layout = DatasetLayout(tmp_path)
    dead = [layout.shard("u1").with_name(".u1.tar.tmp-0badf00d"),
            layout.manifest_part("u1").with_name(".u1.parquet.tmp-12345678"),
            layout.screen_part("u1").with_name(".u1.parquet.tmp-deadbeef")]
    kept = [layout.shard("u10").with_name(".u10.tar.tmp-0badf00d"), layout.shard("u1"), layout.manifest_part("u1")]
    for path in dead + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    layout.staging("u1").mkdir(parents=True)
    (layout.staging("u1") / "part-1.json").write_text("{}")
    layout.sweep(["u1"])
    assert not any(p.exists() for p in dead) and all(p.exists() for p in kept)
    assert not layout.staging("u1").exists()
