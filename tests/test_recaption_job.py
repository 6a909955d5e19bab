"""The recaption job: Ray DAG over a curated dataset, killed with SIGKILL mid-run and resumed, every image captioned
exactly once; plus its stages, planning and config on their own (no Ray)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curation.captioners import register_captioner
from curation.captioners.base import CaptionResult, Captioner
from curation.shard_format import (FORMAT_VERSION, ShardSample, make_key, manifest_row, read_manifest,
                                   write_shard)
from curation.sources import FolderConfig
from common.config import ConfigError, load_config, validate_config
from pipelines.recaption import CaptionImages, ReadUnits, RecaptionConfig, UnitCommitter, run
from tests.conftest import ROOT
from tests.test_llava_transformers import CLEANED_CAPTION, save_taught_tiny_llava

UNITS = 7  # six units of the folder source (two images each) + one shard whose unit the source no longer has
MISSING_UNIT = "files-999999"


def _sample(key: str, source_id: str, caption: str | None) -> ShardSample:
    meta = {"key": key, "format_version": FORMAT_VERSION, "source": "folder", "source_id": source_id,
            "bucket": [256, 256], "latent_hw": [2, 2], "orig_size": [534, 800],
            "captions": {"original": caption} if caption else {}}
    zeros = np.zeros((4, 2, 2), np.float16)
    return ShardSample(key=key, meta=meta, latent_mean=zeros, latent_std=zeros + np.float16(1))


def build_dataset(tmp: Path, photos_dir: Path) -> tuple[Path, Path, dict[str, str]]:
    """A curated dataset as the curation job leaves it (shards named by the folder source's units, manifest parts,
    consolidated manifest) over copies of the real photos. Three rows cannot be captioned: a JPEG cut short, a
    sample its unit no longer holds, a shard whose unit the source no longer has.
    Returns (dataset, image folder, expected failure reason per key)."""
    photos = sorted(photos_dir.glob("*.jpg"))
    images, dataset = tmp / "images", tmp / "dataset"
    for k in range(11):
        (images / f"{k % 4}").mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[k % 4], images / f"{k % 4}/photo_{k:02d}.jpg")
    (images / "broken.jpg").write_bytes(photos[0].read_bytes()[:400])
    units = FolderConfig(root=str(images), unit_size=2).build().list_units(tmp / "index")
    members = {u.id: list(u.paths) for u in units}
    members[units[0].id].append("gone.jpg")
    members[MISSING_UNIT] = ["9/photo_99.jpg"]
    bad = {make_key("folder", "broken.jpg"): "decode_error", make_key("folder", "gone.jpg"): "image_missing",
           make_key("folder", "9/photo_99.jpg"): "source_unit_missing"}
    parts = []
    for unit, paths in members.items():
        samples = [_sample(make_key("folder", rel), rel, f"a photo named {rel}" if i % 2 else None)
                   for i, rel in enumerate(paths)]
        write_shard(dataset / "shards" / f"{unit}.tar", samples)
        part = pa.Table.from_pylist([manifest_row(s, f"shards/{unit}.tar") for s in samples])
        (dataset / "manifest").mkdir(parents=True, exist_ok=True)
        pq.write_table(part, dataset / "manifest" / f"{unit}.parquet")
        parts.append(part)
    pq.write_table(pa.concat_tables(parts, promote_options="default"), dataset / "manifest.parquet")
    return dataset, images, bad


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module; the job subprocesses join it (as `ray job submit` would make them)."""
    from pipelines.ray_cluster import init_ray

    ray = init_ray(num_cpus=2, object_store_memory=300 * 2**20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine
    try:
        yield save_taught_tiny_llava(tmp_path_factory.mktemp("taught_llava"))
    finally:
        torch.set_num_threads(threads)


def _job(cmd_config: Path, address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.recaption", "--config", str(cmd_config)], cwd=ROOT,
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, photos_dir, model_dir, ray_address):
    tmp = tmp_path_factory.mktemp("recaption")
    dataset, images, bad = build_dataset(tmp, photos_dir)
    before = _digest(dataset)
    config = tmp / "recaption.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"dataset": str(dataset), "source": {"kind": "folder", "root": str(images), "unit_size": 2}},
        "caption": {"model": str(model_dir), "num_gpus": 0, "num_cpus": 1, "batch_size": 1, "max_new_tokens": 24,
                    "retries": 1},
        "max_image_side": 128, "read_block_rows": 1,
    }))
    out = dataset / "recaption_llava"

    first = _job(config, ray_address, tmp / "first.log")
    deadline = time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline:
        if any(out.glob("parts/files-00000*.parquet")):  # a captioned unit (not the missing one, written first)
            os.killpg(first.pid, signal.SIGKILL)  # the job's whole process group, as a node loss would
            break
        time.sleep(0.01)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, (tmp / "first.log").read_text()[-3000:]
    committed = {p.name: p.read_bytes() for p in out.glob("parts/files-00000*.parquet")}

    # the same job again, in this process (it joins the same Ray): it must pick up where the kill left off
    run(validate_config(yaml.safe_load(config.read_text()), RecaptionConfig))
    return {"dataset": dataset, "out": out, "bad": bad, "committed": committed, "before": before,
            "config": config, "images": images, "model": str(model_dir)}


@pytest.mark.slow
def test_killed_job_resumes_and_captions_every_image_exactly_once(killed_and_resumed):
    job = killed_and_resumed
    out, committed = job["out"], job["committed"]
    assert 0 < len(committed) < UNITS - 1, "the kill should land between the first and the last unit"
    # committed units were skipped by the resumed run: their parts are byte for byte what the killed run wrote
    assert {name: (out / "parts" / name).read_bytes() for name in committed} == committed
    shards = read_manifest(job["dataset"]).column("shard").to_pylist()
    assert sorted(p.name for p in (out / "parts").iterdir()) == sorted({f"{Path(s).stem}.parquet" for s in shards})

    manifest = read_manifest(job["dataset"])
    captions = pq.read_table(out / "captions.parquet")
    keys = captions.column("key").to_pylist()
    assert sorted(keys) == sorted(manifest.column("key").to_pylist()) and len(set(keys)) == len(keys)
    rows = {r["key"]: r for r in captions.to_pylist()}
    for key, row in rows.items():
        if key in job["bad"]:
            assert (row["ok"], row["caption_llava"], row["attempts"]) == (False, None, 0)
            assert row["reason"].split(":")[0] == job["bad"][key]
        else:
            assert (row["ok"], row["caption_llava"], row["reason"], row["attempts"]) == (True, CLEANED_CAPTION, None, 1)
            provenance = json.loads(row["provenance"])
            assert provenance["model"] == job["model"] and provenance["backend"] == "transformers"

    card = json.loads((out / "recaption_card.json").read_text())
    assert card["counts"]["seen"] == manifest.num_rows == card["counts"]["captioned"] + card["counts"]["failed"]
    assert card["counts"]["failed_by_reason"] == {"decode_error": 1, "image_missing": 1, "source_unit_missing": 1}
    assert card["t5_reencoded"] is False


@pytest.mark.slow
def test_updated_manifest_is_a_new_file_and_the_dataset_is_untouched(killed_and_resumed):
    job = killed_and_resumed
    original = read_manifest(job["dataset"])
    updated = pq.read_table(job["out"] / "manifest.parquet")
    assert updated.column_names == original.column_names + ["caption_llava"]
    assert updated.drop_columns(["caption_llava"]).equals(original)  # same rows, same order
    by_key = dict(zip(updated.column("key").to_pylist(), updated.column("caption_llava").to_pylist()))
    assert {k: v for k, v in by_key.items() if v is None}.keys() == job["bad"].keys()
    # nothing of the dataset changed; the job only added its own folder
    after = {k: v for k, v in _digest(job["dataset"]).items() if not k.startswith("recaption_llava/")}
    assert after == job["before"]


@pytest.mark.slow
def test_rerunning_a_finished_job_changes_nothing_and_other_settings_are_refused(killed_and_resumed, monkeypatch):
    job = killed_and_resumed
    cfg = validate_config(yaml.safe_load(job["config"].read_text()), RecaptionConfig)
    parts_before = _digest(job["out"] / "parts")
    monkeypatch.setattr("pipelines.recaption.caption_units", lambda *a: pytest.fail("nothing is left to caption"))
    card = run(cfg)
    assert card["counts"]["seen"] == 14 and _digest(job["out"] / "parts") == parts_before
    changed = cfg.model_copy(update={"caption": cfg.caption.model_copy(update={"prompt": "Describe it briefly."})})
    with pytest.raises(ConfigError, match="prompt"):
        run(changed)


# --- stages and planning, without Ray ---------------------------------------------------------------------------


class EchoCaptioner(Captioner):
    """Captions each image with its size and source caption, so the plumbing can be checked exactly."""

    name = "echo"

    def __init__(self, name: str = "echo"):
        self.name = name

    def __call__(self, images, source_captions, metas):
        return [CaptionResult(f"{im.size[0]}x{im.size[1]} {sc} {m['key']}.", True) for im, sc, m in
                zip(images, source_captions, metas)]


register_captioner("test_echo", "tests.test_recaption_job:EchoCaptioner")


def test_caption_stage_passes_images_source_captions_errors_and_unit_ends():
    stage = CaptionImages({"backend": "test_echo", "name": "echo"})
    image = np.zeros((20, 30, 3), np.uint8)
    empty = np.zeros((0, 0, 3), np.uint8)
    batch = {
        "key": np.array(["a", "b", "c", ""], dtype=object), "unit": np.array(["u"] * 4, dtype=object),
        "source": np.array(["folder"] * 3 + [""], dtype=object), "source_id": np.array(["a", "b", "c", ""], dtype=object),
        "source_caption": np.array(["a dog", None, None, None], dtype=object),
        "image": np.array([image, empty, image, empty], dtype=object),
        "error": np.array(["", "image_missing", "", ""], dtype=object),
        "unit_rows": np.array([-1, -1, -1, 3]),
    }
    out = stage(batch)
    assert out["caption"].tolist() == ["30x20 a dog a.", None, "30x20 None c.", None]
    assert out["ok"].tolist() == [True, False, True, False]
    assert out["reason"].tolist() == [None, "image_missing", None, None]
    assert out["attempts"].tolist() == [1, 0, 1, 0] and out["unit_rows"].tolist() == [-1, -1, -1, 3]
    assert json.loads(out["provenance"][0]) == {"backend": "EchoCaptioner"}


def _read(reader, units, wanted=None):
    batch = {"unit": np.array([json.dumps(u.to_row()) for u in units], dtype=object),
             "wanted": np.array([json.dumps(wanted[u.id]) if wanted else "" for u in units], dtype=object)}
    return [row for out in reader(batch) for row in
            (dict(zip(out, values)) for values in zip(*out.values()))], list(reader(batch))


def test_read_units_decodes_joins_by_key_and_ends_each_unit(tmp_path, photos_dir):
    root = tmp_path / "imgs"
    root.mkdir()
    photo = Image.open(sorted(photos_dir.glob("*.jpg"))[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    photo.save(root / "a_rotated.jpg", exif=exif)
    (root / "a_rotated.txt").write_text("a sidecar caption")
    (root / "b_broken.jpg").write_bytes(b"not a jpeg")
    shutil.copy(sorted(photos_dir.glob("*.jpg"))[1], root / "c_plain.jpg")
    source = {"kind": "folder", "root": str(root), "unit_size": 2}
    units = FolderConfig(**source).build().list_units(tmp_path / "index")
    reader = ReadUnits(source, max_side=200, block_rows=2, source_caption="original")

    rows, blocks = _read(reader, units)
    assert [len(b["key"]) for b in blocks] == [2, 1, 2]  # blocks of 2; each unit closes with its end row
    assert [(r["source_id"], r["unit_rows"]) for r in rows] == [
        ("a_rotated.jpg", -1), ("b_broken.jpg", -1), ("", 2), ("c_plain.jpg", -1), ("", 1)]
    rotated, broken, plain = rows[0], rows[1], rows[3]
    w, h = photo.size
    assert rotated["image"].shape[0] == 200 and abs(rotated["image"].shape[1] - 200 * h / w) <= 1  # portrait now
    assert rotated["key"] == make_key("folder", "a_rotated.jpg") and rotated["source_caption"] == "a sidecar caption"
    assert broken["error"].startswith("decode_error: ") and broken["image"].size == 0
    assert plain["error"] == "" and max(plain["image"].shape) == 200 and plain["source_caption"] is None

    # dataset mode: only the manifest's keys, its captions, and a row for a key the unit does not hold
    wanted = {units[0].id: {make_key("folder", "a_rotated.jpg"): ["folder", "a_rotated.jpg", "from the manifest"],
                            make_key("folder", "zz.jpg"): ["folder", "zz.jpg", None]}}
    rows, _ = _read(reader, units[:1], wanted)
    assert [(r["source_id"], r["source_caption"], r["error"], r["unit_rows"]) for r in rows] == [
        ("a_rotated.jpg", "from the manifest", "", -1), ("zz.jpg", None, "image_missing", -1), ("", None, "", 2)]


def test_unit_committer_commits_a_unit_when_its_rows_and_its_end_are_in(tmp_path):
    committer = UnitCommitter(tmp_path, "llava")

    def batch(rows):
        cols = ["key", "unit", "source", "source_id", "caption", "ok", "reason", "attempts", "provenance", "unit_rows"]
        return {c: np.array([r[i] for r in rows], dtype=object) for i, c in enumerate(cols)}

    row = lambda key, unit, caption, ok, reason: (key, unit, "s", key, caption, ok, reason, 1, "{}", -1)  # noqa: E731
    end = lambda unit, n: ("", unit, "", "", None, False, None, 0, "{}", n)  # noqa: E731
    assert committer.add(batch([row("k1", "u1", "A cat.", True, None), end("u1", 2)])) == []
    assert committer.add(batch([end("u3", 0)])) == ["u3"]  # a unit without samples still gets its (empty) part
    assert not (tmp_path / "parts" / "u1.parquet").exists()
    done = committer.add(batch([row("k3", "u2", float("nan"), False, "truncated"), end("u2", 1),
                                row("k2", "u1", "A dog.", True, None)]))
    assert done == ["u2", "u1"] and committer.unfinished() == {}
    # A unit whose read failed (its end row carries the reason) is not committed, and is reported with the reason.
    failed = ("", "u4", "", "", None, False, "read: OSError: gone", 0, "{}", 0)
    assert committer.add(batch([row("k4", "u4", "A hat.", True, None), failed])) == []
    assert committer.unfinished() == {"u4": "read: OSError: gone"} and not (tmp_path / "parts" / "u4.parquet").exists()
    u1 = pq.read_table(tmp_path / "parts" / "u1.parquet").to_pylist()
    assert [(r["key"], r["caption_llava"], r["ok"]) for r in u1] == [("k1", "A cat.", True), ("k2", "A dog.", True)]
    assert pq.read_table(tmp_path / "parts" / "u2.parquet").to_pylist()[0]["caption_llava"] is None
    assert pq.read_table(tmp_path / "parts" / "u3.parquet").num_rows == 0
    assert not [p for p in (tmp_path / "parts").iterdir() if p.name.startswith(".")]  # no temp files left


def test_configs_in_the_repo_validate():
    configs = sorted((ROOT / "configs" / "recaption").glob("*.yaml"))
    assert configs, "configs/recaption/*.yaml"
    for path in configs:
        load_config(path, RecaptionConfig)


FOLDER = {"kind": "folder", "root": "/images"}


@pytest.mark.parametrize("data, message", [
    ({"input": {}}, "input.source"),
    ({"input": {"source": {"kind": "flickr", "root": "/x"}}, "output": "/o"}, "input.source"),
    ({"input": {"source": FOLDER}}, "output must be set"),
    ({"input": {"source": FOLDER}, "output": "/o", "caption": {"backend": "ollama"}}, "caption.backend"),
    ({"input": {"source": FOLDER}, "output": "/o", "max_image_side": 10}, "max_image_side"),
    ({"input": {"source": FOLDER, "datasets": "/d"}, "output": "/o"}, "input.datasets"),
])
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(data, RecaptionConfig, "recaption.yaml")
