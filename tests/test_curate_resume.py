"""Exactly-once under SIGKILL: the job runs as a subprocess (a second driver on the test's Ray cluster, as under
`ray job submit`), is killed after N units are committed, is submitted again with the same output folder, and must
end with the uninterrupted run's output: every accepted sample once, committed units never redone."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from curation.shard_format import iter_shard
from tests.fixtures_data import curate_config, reference_run

ROOT = Path(__file__).resolve().parents[1]
UNITS = 5  # the SA-1B fixture's tars


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory, photos_dir, tiny_t5_dir, tiny_vae_dir) -> Path:
    return reference_run(tmp_path_factory.getbasetemp() / "curate-reference", photos_dir, tiny_t5_dir, tiny_vae_dir)


def committed(out: Path) -> dict[str, int]:
    """unit -> mtime of its manifest part (the commit marker)."""
    folder = out / "manifest"
    return {p.stem: p.stat().st_mtime_ns for p in folder.glob("*.parquet") if not p.name.startswith(".")} \
        if folder.is_dir() else {}


def start_job(config: Path, log: Path) -> subprocess.Popen:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "pipelines.curate", "--config", str(config)], cwd=ROOT,
                                env=env, stdout=handle, stderr=subprocess.STDOUT)


def kill_after_commits(proc: subprocess.Popen, out: Path, count: int, log: Path, timeout: float = 300) -> dict:
    """SIGKILL the driver as soon as `count` units are committed; return the commits once its workers are gone
    (Ray ends a dead driver's actors and tasks, which may commit a unit or two meanwhile, as on a real cluster)."""
    import ray
    import ray._private.state

    deadline = time.monotonic() + timeout
    while len(committed(out)) < count:
        assert proc.poll() is None, f"job exited (rc {proc.returncode}) before {count} commits:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {count} commits within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # A crash takes the job's workers with it. Ray reaps them on its own, but on an idle machine they could first
    # finish every remaining unit, and the kill would then test nothing: SIGKILL them too, as a lost node would.
    def stage_actors() -> list:  # Ray Data's own helper actors are detached and outlive every job
        return [a for a in ray._private.state.actors().values()
                if a["State"] == "ALIVE" and a.get("ActorClassName", "").startswith("MapWorker")]

    for actor in stage_actors():
        try:
            os.kill(actor["Pid"], signal.SIGKILL)
        except (KeyError, ProcessLookupError):
            pass

    deadline = time.monotonic() + 120
    while stage_actors():
        assert time.monotonic() < deadline, f"the killed job's actors did not go away: {stage_actors()}"
        time.sleep(0.2)
    time.sleep(1.0)  # its last tasks
    return committed(out)


def assert_visible_state_is_whole(out: Path) -> None:
    """What a reader can see after a kill: every committed unit complete; no partial file under a final name."""
    for unit in committed(out):
        keys = pq.read_table(out / "manifest" / f"{unit}.parquet").column("key").to_pylist()
        shard = out / "shards" / f"{unit}.tar"
        assert [s.key for s in iter_shard(shard)] == keys if keys else not shard.exists()
        pq.read_table(out / "rejected" / f"{unit}.parquet")
    for shard in (out / "shards").glob("*.tar") if (out / "shards").is_dir() else []:
        if not shard.name.startswith("."):
            list(iter_shard(shard))  # a tar under its final name is always complete, committed or not


@pytest.mark.slow
def test_killed_jobs_resume_to_the_uninterrupted_output(reference, tmp_path, tiny_t5_dir, tiny_vae_dir):
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    # A slow captioner spreads the commits out so that the kills land between them.
    config.write_text(yaml.safe_dump(curate_config(reference / "sa1b", out, tiny_t5_dir, tiny_vae_dir,
                                                   caption_delay_s=1.0)))
    log = tmp_path / "job.log"

    first = kill_after_commits(start_job(config, log), out, 1, log)
    assert 1 <= len(first) < UNITS - 1, "the first run was not interrupted early enough"
    assert_visible_state_is_whole(out)

    second = kill_after_commits(start_job(config, log), out, len(first) + 1, log)
    # Units often commit within milliseconds of each other, so the second kill lands either between two commits
    # or after the last one and before the job consolidates its manifest: both are kill points worth resuming from.
    assert len(first) < len(second) <= UNITS, "the second run committed nothing before it was killed"
    assert {u: second[u] for u in first} == first, "a committed unit was processed again"
    assert_visible_state_is_whole(out)

    final = start_job(config, log)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    done = committed(out)
    assert len(done) == UNITS and {u: done[u] for u in second} == second

    def table(path, sort):
        return pq.read_table(path).sort_by(sort).to_pylist()

    ref = reference / "out"
    assert table(out / "manifest.parquet", "key") == table(ref / "manifest.parquet", "key")
    rejected_sort = [("unit", "ascending"), ("source_id", "ascending")]
    assert table(out / "rejected.parquet", rejected_sort) == table(ref / "rejected.parquet", rejected_sort)
    for shard in sorted((ref / "shards").glob("*.tar")):
        ours = list(iter_shard(out / "shards" / shard.name))
        theirs = list(iter_shard(shard))
        assert [s.key for s in ours] == [s.key for s in theirs]
        for a, b in zip(ours, theirs):
            assert abs(a.latent_mean.astype(float) - b.latent_mean.astype(float)).max() < 1e-2
            assert a.t5.keys() == b.t5.keys() and a.meta["captions"] == b.meta["captions"]
    assert not list((out / "work" / "staging").glob("*/*"))  # staging is cleaned up
