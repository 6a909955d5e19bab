"""One sample never stops the curation job, one unit never stops the others, and a rerun retries only what failed.

A FolderSource that can be told to fail a unit on a given read (1: the screen pass, 2: the encode pass) stands in
for an archive that cannot be read; a caption that breaks the T5 model's forward (a token id beyond its vocabulary)
stands in for a sample no stage foresaw.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from curation.failures import IsolatedStage, map_isolated
from curation.sources.folder import FolderSource
from tests.fixtures_data import gradient, jpeg_bytes

FAIL_PLAN = ".fail.json"  # unit id -> the read numbers on which reading it raises


class FlakySource(FolderSource):
    """Counts the reads of each unit (in files beside the data, so Ray workers share them) and raises mid-unit
    on the reads FAIL_PLAN names. A caption file holding `int:<n>` becomes the integer n, not a string."""

    def read_unit(self, unit):
        root = Path(self.config.root)
        counter = root / f".reads-{unit.id}"
        reads = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(reads))
        plan = json.loads((root / FAIL_PLAN).read_text()) if (root / FAIL_PLAN).exists() else {}
        for i, sample in enumerate(super().read_unit(unit)):
            if i == 1 and reads in plan.get(unit.id, ()):
                raise OSError(f"simulated: unit {unit.id} unreadable on read {reads}")
            text = sample.captions.get("original", "")
            if text.startswith("int:"):
                sample.captions["original"] = int(text[4:])
            yield sample


def make_folder(root: Path) -> None:
    root.mkdir()
    for i in range(9):  # three units of three pictures
        (root / f"p{i}.jpg").write_bytes(jpeg_bytes(gradient(96 + 8 * i, 128, seed=i)))
        (root / f"p{i}.txt").write_text(f"picture number {i}")
    (root / "p4.txt").write_text("int:99999")  # encodes to token ids the tiny T5 has no embedding for


def job_config(tmp_path: Path, root: Path, out: Path, t5_dir: Path, vae_dir: Path) -> Path:
    config = {"source": {"kind": "folder", "root": str(root), "unit_size": 3}, "output": str(out),
              "buckets": {"resolution": 64}, "filters": {"min_side": 64, "near_duplicates": None},
              "vae": {"model": str(vae_dir)}, "t5": {"model": str(t5_dir), "captions": ["original"]},
              "ray": {"progress": False, "read_num_cpus": 0.5, "write_num_cpus": 0.5,
                      "vae": {"batch_size": 4}, "t5": {"batch_size": 4}}}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def flaky(monkeypatch):
    import pipelines.curate

    monkeypatch.setattr(pipelines.curate, "build_source", lambda config: FlakySource(config))


def test_map_isolated_rejects_only_the_item_that_raises():
    calls = []

    def square(items):
        calls.append(list(items))
        if 3 in items:
            raise ValueError("three is bad")
        return [x * x for x in items]

    out = map_isolated(square, [1, 2, 3, 4], "square", ["a", "b", "c", "d"])
    assert out[:2] == [1, 4] and out[3] == 16
    assert (out[2].stage, out[2].reason) == ("square", "ValueError: three is bad")
    assert calls[0] == [1, 2, 3, 4] and [1] in calls  # the whole batch first, then one by one


def test_isolated_stage_passes_a_breaking_sample_through_as_rejected():
    import numpy as np

    from curation.writer import RowBatch, object_array, sample_row

    class Doubling:  # a stage in the pipeline's row protocol that breaks on one input
        def __call__(self, batch):
            rows = RowBatch(batch)
            out = [np.zeros(0)] * len(rows)
            for i in rows.alive():
                if rows.metas[i]["key"] == "bad":
                    raise ZeroDivisionError("division by zero")
                out[i] = np.ones(2) * 2
            batch = rows.to_batch()
            batch["doubled"] = object_array(out)
            return batch

    rows = [sample_row(k, "u", {"key": k}) for k in ("a", "bad", "c")]
    batch = {name: object_array([r[name] for r in rows]) for name in rows[0]}
    out = IsolatedStage(Doubling, "double")(batch)
    assert list(out["key"]) == ["a", "bad", "c"]
    assert list(out["reject_stage"]) == ["", "double", ""]
    assert out["reject_reason"][1] == "ZeroDivisionError: division by zero"
    assert out["doubled"][0].tolist() == [2, 2] and out["doubled"][1].size == 0


@pytest.mark.slow
def test_failed_units_are_listed_the_others_finish_and_a_rerun_retries_only_them(
        ray_cluster, tmp_path, monkeypatch, capsys, tiny_t5_dir, tiny_vae_dir):
    from pipelines.curate import main

    flaky(monkeypatch)
    # Encode pass: unit files-000001 fails on its second read; the other units commit, the job exits 1.
    root = tmp_path / "data"
    make_folder(root)
    (root / FAIL_PLAN).write_text(json.dumps({"files-000001": [2]}))
    config = job_config(tmp_path, root, tmp_path / "out", tiny_t5_dir, tiny_vae_dir)
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "1 unit(s) failed" in err and "files-000001: OSError: simulated" in err
    out = tmp_path / "out"
    assert sorted(p.stem for p in (out / "manifest").glob("*.parquet")) == ["files-000000", "files-000002"]
    assert not (out / "manifest.parquet").exists()
    # The rerun is not refused, reads only the failed unit again, and ends with every sample accounted for.
    assert main(["--config", str(config)]) == 0
    reads = {unit: int((root / f".reads-{unit}").read_text()) for unit in ("files-000000", "files-000001",
                                                                          "files-000002")}
    assert reads == {"files-000000": 2, "files-000001": 3, "files-000002": 2}
    reference = pq.read_table(out / "manifest.parquet").to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert sorted(r["source_id"] for r in reference) == [f"p{i}.jpg" for i in range(9) if i != 4]
    # The sample that broke the T5 forward is rejected at stage t5 naming the exception; its batch-mates are kept.
    assert [(r["source_id"], r["stage"]) for r in rejected] == [("p4.jpg", "t5")]
    assert rejected[0]["reason"].startswith("IndexError")

    # What a power loss can leave: a zero-byte commit marker and a dead attempt's temp shard. The marker counts as
    # not committed (the unit is redone, with a warning); the temp file is swept.
    (out / "manifest" / "files-000001.parquet").write_bytes(b"")
    dead = out / "shards" / ".files-000001.tar.tmp-0badf00d"
    dead.write_bytes(b"half a tar")
    capsys.readouterr()
    assert main(["--config", str(config)]) == 0
    assert "files-000001.parquet is damaged" in capsys.readouterr().err
    assert not dead.exists() and int((root / ".reads-files-000001").read_text()) == 4
    assert pq.read_table(out / "manifest.parquet").to_pylist() == reference
    assert not [p for p in out.rglob(".*") if p.is_file()]

    # Screen pass: a unit that cannot be screened stops the job before any encoding (the duplicate search spans
    # every unit); the rerun screens only that unit, and the output is the one of the run above.
    root2 = tmp_path / "data2"
    make_folder(root2)
    (root2 / FAIL_PLAN).write_text(json.dumps({"files-000002": [1]}))
    config2 = job_config(tmp_path, root2, tmp_path / "out2", tiny_t5_dir, tiny_vae_dir)
    assert main(["--config", str(config2)]) == 1
    assert "files-000002: OSError: simulated" in capsys.readouterr().err
    assert main(["--config", str(config2)]) == 0
    assert int((root2 / ".reads-files-000000").read_text()) == 2  # screened once, encoded once
    assert pq.read_table(tmp_path / "out2" / "manifest.parquet").to_pylist() == reference
