"""The curation job end to end on a local Ray (the SA-1B fixture with every kind of bad input), plus its config
and command-line errors (no Ray needed)."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from curation.shard_format import decode_sample, make_key
from common.config import ConfigError, load_config
from pipelines.curate import CurateConfig, main, run
from tests.fixtures_data import EXPECTED_SA1B, reference_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory, photos_dir, tiny_t5_dir, tiny_vae_dir) -> Path:
    return reference_run(tmp_path_factory.getbasetemp() / "curate-reference", photos_dir, tiny_t5_dir, tiny_vae_dir)


@pytest.mark.slow
def test_end_to_end_output_matches_the_hand_count(reference):
    import webdataset as wds

    out = reference / "out"
    card = json.loads((out / "dataset_card.json").read_text())
    counts = card["counts"]
    assert counts["seen"] == EXPECTED_SA1B["seen"] == counts["accepted"] + counts["rejected"]
    assert counts["rejected_by_reason"] == EXPECTED_SA1B["rejected_by_reason"]
    assert card["vae"]["latent_channels"] == 4 and card["vae"]["downsample_factor"] == 8
    assert card["captions"] == ["synthetic"] and card["config"]["buckets"]["resolution"] == 64

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert {row["source_id"] for row in manifest} == EXPECTED_SA1B["accepted_ids"]
    assert len({row["key"] for row in manifest}) == len(manifest)
    assert all(row["key"] == make_key("sa1b", row["source_id"]) for row in manifest)
    assert Counter(row["stage"] for row in rejected) == EXPECTED_SA1B["rejected_by_reason"]
    by_id = {row["source_id"]: row for row in rejected}
    assert by_id["17"]["stage"] == "near_duplicate" and make_key("sa1b", "1") in by_id["17"]["reason"]
    assert by_id["2"]["stage"] == "duplicate_id" and by_id["2"]["unit"] == "sa_000001"
    assert by_id["11"]["stage"] == "decode" and "decompression bomb" in by_id["11"]["reason"]

    # Every shard reads with webdataset's own reader and holds exactly the manifest's samples.
    shards = sorted({row["shard"] for row in manifest})
    samples = [decode_sample(raw) for shard in shards
               for raw in wds.WebDataset(str(out / shard), shardshuffle=False)]
    assert sorted(s.key for s in samples) == sorted(row["key"] for row in manifest)
    rows = {row["key"]: row for row in manifest}
    for sample in samples:
        row, meta = rows[sample.key], sample.meta
        assert list(sample.latent_mean.shape) == [4, row["bucket_h"] // 8, row["bucket_w"] // 8]
        assert sample.latent_std.dtype == np.float16 and (sample.latent_std > 0).all()
        caption = meta["captions"]["synthetic"]
        assert caption == row["caption_synthetic"] and caption.startswith(f"a {row['bucket_w']}x{row['bucket_h']}")
        n = len(caption.encode()) + 1  # ByT5 tokens, caption shorter than 120 bytes
        assert sample.t5["synthetic"].shape == (n, 32) and meta["t5_tokens"]["synthetic"] == row["t5_tokens_synthetic"] == n
        assert meta["caption_provenance"]["synthetic"]["backend"] == "tests.fixtures_data:SyntheticCaptioner"
    truck = rows[make_key("sa1b", "3")]  # stored sideways with EXIF orientation 6: displays 1200 x 1800
    assert (truck["orig_h"], truck["orig_w"]) == (1200, 1800) and (truck["bucket_h"], truck["bucket_w"]) == (48, 80)
    assert rows[make_key("sa1b", "1")]["caption_synthetic"] is not None
    assert (out / "dataset_card.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temp file left behind


@pytest.mark.slow
def test_rerun_of_a_finished_job_does_no_work_and_changed_settings_are_refused(reference):
    config = load_config(reference / "config.yaml", CurateConfig)
    parts = sorted((reference / "out" / "manifest").glob("*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in parts} | {
        p: p.stat().st_mtime_ns for p in (reference / "out" / "shards").glob("*.tar")}
    card = run(config)
    assert card["counts"]["accepted"] == len(EXPECTED_SA1B["accepted_ids"])
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(ConfigError, match="filters.min_side"):
        run(load_config(reference / "config.yaml", CurateConfig, ["filters.min_side=65"]))


def test_shipped_configs_validate():
    configs = sorted((ROOT / "configs" / "curation").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"sa1b", "journeydb", "imagenet", "folder"}
    for path in configs:
        config = load_config(path, CurateConfig)
        assert config.buckets.resolution in (256, 512, 1024)


def test_config_errors_name_the_field(tmp_path, capsys):
    good = {"source": {"kind": "folder", "root": str(tmp_path)}, "output": str(tmp_path / "out"),
            "vae": {"model": "org/vae"}, "t5": {"model": "org/t5", "captions": ["original"]}}
    cases = [
        ({"filters": {"min_sid": 3}}, "filters.min_sid"),
        ({"source": {"kind": "laion", "root": "x"}}, "source"),
        ({"source": {"kind": "sa1b"}}, "source.sa1b.root"),
        ({"t5": {"captions": ["Bad Name"]}}, "t5.captions"),
        ({"vae": {"model": str(tmp_path / "missing-vae")}}, "vae.model"),
        ({"buckets": {"resolution": 8}}, "buckets.resolution"),
        ({"caption": {"backend": "nope"}}, "caption.backend"),
    ]
    for change, field in cases:
        data = json.loads(json.dumps(good))
        for section, value in change.items():
            data[section] = value if section == "source" else {**data.get(section, {}), **value}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["--config", str(path)]) == 2
        assert field in capsys.readouterr().err, field
    path.write_text(yaml.safe_dump(good))
    assert main(["--config", str(path), "--set", "filters.max_aspect_ratio=0.5"]) == 2
    assert "filters.max_aspect_ratio" in capsys.readouterr().err


def test_resource_requests_are_fitted_to_the_cluster_or_refused_naming_the_fields():
    from pipelines.curate import fit_resources

    base = {"source": {"kind": "folder", "root": "."}, "output": "o", "vae": {"model": "org/vae"},
            "t5": {"model": "org/t5", "captions": ["original"]}}
    config = CurateConfig.model_validate(base)
    # auto on 2 CPUs: one reader (1 CPU) leaves 1 CPU for the two model stages' actors, half each.
    fitted = fit_resources(config, {"CPU": 2})
    assert fitted["ray.vae"]["num_cpus"] == fitted["ray.t5"]["num_cpus"] == 0.5
    assert fitted["ray.vae"]["num_gpus"] == 0 and fitted["ray.vae"]["compute"].min_size == 1
    roomy = fit_resources(config, {"CPU": 16, "GPU": 4})
    assert roomy["ray.vae"]["num_cpus"] == 1.0 and roomy["ray.vae"]["num_gpus"] == 1.0
    assert roomy["ray.vae"]["compute"].max_size == 4  # auto: up to one actor per GPU
    explicit = CurateConfig.model_validate({**base, "ray": {"vae": {"num_cpus": 1}, "t5": {"num_cpus": 1}}})
    with pytest.raises(ConfigError, match=r"ray.vae.num_cpus, ray.t5.num_cpus"):
        fit_resources(explicit, {"CPU": 2})  # two 1-CPU actors + a 1-CPU reader on 2 CPUs would never start
    fit_resources(explicit, {"CPU": 4})
    captioned = CurateConfig.model_validate({**base, "caption": {"backend": "transformers"}})
    assert fit_resources(captioned, {"CPU": 2})["caption"]["num_cpus"] == pytest.approx(1 / 3)
    gpu_caption = CurateConfig.model_validate({**base, "caption": {"backend": "transformers", "num_gpus": 1}})
    with pytest.raises(ConfigError, match="caption.num_gpus"):
        fit_resources(gpu_caption, {"CPU": 16})
    fit_resources(gpu_caption, {"CPU": 16, "GPU": 1})


def test_every_shipped_config_fits_a_two_core_machine():
    from pipelines.curate import fit_resources

    for path in sorted((ROOT / "configs" / "curation").glob("*.yaml")):
        config = load_config(path, CurateConfig)
        fitted = fit_resources(config, {"CPU": 2})
        read = max(config.ray.read_num_cpus, config.ray.write_num_cpus)
        assert sum(f["num_cpus"] for f in fitted.values()) + read <= 2 + 1e-9, path.name
        assert all(f["num_gpus"] == 0 for f in fitted.values()), path.name


def test_plan_applies_duplicates_across_units_and_handles_all_rejected_units(tmp_path):
    import pyarrow as pa

    from curation.sources import WorkUnit
    from curation.writer import SCREEN_SCHEMA, DatasetLayout, read_plan, write_parquet
    from pipelines.curate import plan_units

    layout = DatasetLayout(tmp_path)
    records = {  # unit -> (source_id, cheap-filter stage, pHash)
        "u0": [("a", "", 0b1111), ("b", "", 0xF0F0F0)],
        "u1": [("junk", "decode", None), ("small", "min_side", None)],  # nothing left to encode
        "u2": [("a", "", 0b1111), ("c", "", 0b1110), ("d", "", 0xFF000000)],  # a repeats u0; c is 1 bit from a
    }
    for unit, rows in records.items():
        table = [{"unit": unit, "ordinal": i, "key": make_key("t", sid), "source": "t", "source_id": sid,
                  "stage": stage, "reason": stage and "why", "phash": phash, "orig_h": 1, "orig_w": 1}
                 for i, (sid, stage, phash) in enumerate(rows)]
        write_parquet(layout.screen_part(unit), pa.Table.from_pylist(table, schema=SCREEN_SCHEMA))
    units = [WorkUnit(id=u, kind="files", root=".", paths=()) for u in records]
    config = CurateConfig.model_validate({"source": {"kind": "folder", "root": "."}, "output": str(tmp_path),
                                          "vae": {"model": "org/vae"}, "t5": None,
                                          "filters": {"near_duplicates": {"max_distance": 2}}})
    assert plan_units(layout, units, config) == {"u0": 2, "u1": 0, "u2": 1}
    verdicts = {(u, row["source_id"]): row["stage"] for u in records for row in read_plan(layout, u)}
    assert verdicts == {("u0", "a"): "", ("u0", "b"): "", ("u1", "junk"): "decode", ("u1", "small"): "min_side",
                        ("u2", "a"): "duplicate_id", ("u2", "c"): "near_duplicate", ("u2", "d"): ""}
