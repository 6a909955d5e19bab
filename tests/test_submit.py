"""`ray job submit` on a real cluster, as the README shows it: `ray start --head` (here with its own temp dir, ports
and HOME, see tests/ray_head.py), token auth on because a token exists in that HOME, jobs submitted with
`--working-dir` and `RAY_AUTH_MODE=token`.

The curation job's inputs live where a cluster's shared storage would be (absolute paths), its models inside the
uploaded working dir (relative paths, resolved by the driver and by every actor against their copy of it). The
submitted driver is SIGKILLed once mid-run; the resubmitted job must end with the uninterrupted run's dataset.
"""
import json
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from curation.shard_format import iter_shard
from tests.fixtures_data import curate_config, sa1b_fixture
from tests.ray_head import RayHead

ROOT = Path(__file__).resolve().parents[1]
UNITS = 5  # the SA-1B fixture's tars
pytestmark = pytest.mark.slow


def project_copy(dest: Path) -> Path:
    """What a user's `--working-dir .` uploads, minus what the job does not need: the packages, the test captioner
    and the ignore files (the project's own, so the upload leaves out what it leaves out for a user)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("common", "curation", "pipelines"):
        shutil.copytree(ROOT / package, dest / package, ignore=ignore)
    (dest / "tests").mkdir()
    for name in ("__init__.py", "fixtures_data.py"):
        shutil.copy(ROOT / "tests" / name, dest / "tests" / name)
    for name in (".gitignore", ".rayignore"):
        shutil.copy(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    head = RayHead(home)
    # A token in HOME: `ray start` turns token auth on by itself, as it does for a user who ran Ray before.
    head.ray_cli("get-auth-token", "--generate", env=head.env)
    with head:
        yield head


@pytest.fixture(scope="module")
def project(tmp_path_factory, photos_dir, tiny_vae_dir) -> Path:
    """The working dir to upload: the project, a tiny VAE under models/ (uploaded) and a copy under outputs/
    (gitignored, so not uploaded), and a config naming the model by a relative path."""
    base = tmp_path_factory.mktemp("submit")
    work = project_copy(base / "project")
    shutil.copytree(tiny_vae_dir, work / "models" / "vae")
    shutil.copytree(tiny_vae_dir, work / "outputs" / "vae")
    sa1b_fixture(base / "shared" / "sa1b", photos_dir)
    config = curate_config(base / "shared" / "sa1b", base / "shared" / "unset", t5_dir=None,
                           vae_dir=Path("models/vae"), caption_delay_s=1.0)
    config["t5"] = None  # one model stage (the VAE) is enough here, and each costs every job an actor start
    (work / "configs").mkdir()
    (work / "configs" / "submit.yaml").write_text(yaml.safe_dump(config))
    return work


class Jobs:
    """The job server's REST API and CLI, as a user with the cluster's token."""

    def __init__(self, head: RayHead, work: Path):
        self.head, self.work = head, work
        self.env = {**head.env, "RAY_AUTH_MODE": "token"}
        self.token = (head.home / ".ray" / "auth_token").read_text().strip()
        self.count = 0

    def submit(self, *overrides: str) -> str:
        self.count += 1
        job = f"curate-{self.count}"
        sets = [arg for o in overrides for arg in ("--set", o)]
        self.head.ray_cli("job", "submit", "--no-wait", "--submission-id", job, "--working-dir", str(self.work),
                          "--", "python", "-m", "pipelines.curate", "--config", "configs/submit.yaml", *sets,
                          env=self.env)
        return job

    def info(self, job: str) -> dict:
        request = urllib.request.Request(f"{self.head.dashboard_url}/api/jobs/{job}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def logs(self, job: str) -> str:
        return self.head.ray_cli("job", "logs", job, env=self.env, check=False).stdout

    def wait(self, job: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.info(job)["status"]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() < deadline, f"job {job} still {status} after {timeout} s:\n{self.logs(job)[-3000:]}"
            time.sleep(1.0)
        return status

    def alive_stage_actors(self) -> list:
        request = urllib.request.Request(f"{self.head.dashboard_url}/api/v0/actors?limit=10000&detail=true",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            actors = json.loads(reply.read())["data"]["result"]["result"]
        # Ray Data's own helper actors are detached and outlive every job; the stages' actors are MapWorkers.
        return [a for a in actors if a["state"] == "ALIVE" and a.get("class_name", "").startswith("MapWorker")]


@pytest.fixture(scope="module")
def jobs(cluster, project) -> Jobs:
    return Jobs(cluster, project)


def committed(out: Path) -> set[str]:
    folder = out / "manifest"
    return {p.stem for p in folder.glob("*.parquet") if not p.name.startswith(".")} if folder.is_dir() else set()


def assert_same_dataset(out: Path, ref: Path) -> None:
    def table(path, sort):
        return pq.read_table(path).sort_by(sort).to_pylist()

    assert table(out / "manifest.parquet", "key") == table(ref / "manifest.parquet", "key")
    rejected_sort = [("unit", "ascending"), ("source_id", "ascending")]
    assert table(out / "rejected.parquet", rejected_sort) == table(ref / "rejected.parquet", rejected_sort)
    shards = sorted(p.name for p in (ref / "shards").glob("*.tar"))
    assert shards and shards == sorted(p.name for p in (out / "shards").glob("*.tar"))
    for name in shards:
        ours, theirs = list(iter_shard(out / "shards" / name)), list(iter_shard(ref / "shards" / name))
        assert [s.key for s in ours] == [s.key for s in theirs]
        for a, b in zip(ours, theirs):
            assert abs(a.latent_mean.astype(float) - b.latent_mean.astype(float)).max() < 1e-2
            assert a.meta["captions"] == b.meta["captions"]


def test_the_job_server_needs_the_token_setting(cluster):
    """With a token in ~/.ray/auth_token, `ray start` enables token auth; the CLI then needs RAY_AUTH_MODE=token
    (it reads the token from the same file), as the README says."""
    refused = cluster.ray_cli("job", "list", check=False)
    assert refused.returncode != 0 and "Authentication required" in refused.stderr + refused.stdout
    cluster.ray_cli("job", "list", env={**cluster.env, "RAY_AUTH_MODE": "token"})


def test_paths_the_upload_cannot_serve_are_refused_before_any_work(jobs, tmp_path):
    relative = jobs.submit("output=curated/out")
    ignored = jobs.submit(f"output={tmp_path / 'out'}", "vae.model=outputs/vae")
    assert jobs.wait(relative) == "FAILED"
    assert "error: output: 'curated/out' is relative" in jobs.logs(relative)
    assert jobs.wait(ignored) == "FAILED"
    log = jobs.logs(ignored)
    assert "error: vae.model: 'outputs/vae' is not in the job's working dir" in log, log[-3000:]
    assert "Traceback" not in log
    assert not (tmp_path / "out").exists()  # refused before the output folder was bound


def test_a_killed_submitted_job_resumes_to_the_uninterrupted_output(jobs, project, tmp_path):
    ref, out = tmp_path / "reference", tmp_path / "out"
    reference = jobs.submit(f"output={ref}", "caption.options.delay_s=0")
    assert jobs.wait(reference) == "SUCCEEDED", jobs.logs(reference)[-3000:]
    assert json.loads((ref / "dataset_card.json").read_text())["counts"]["seen"] == 28

    # The captioner's 1 s per batch spreads the commits out, so that the kill lands between them.
    first = jobs.submit(f"output={out}")
    deadline = time.monotonic() + 600
    while not committed(out):
        assert jobs.info(first)["status"] in ("PENDING", "RUNNING"), jobs.logs(first)[-3000:]
        assert time.monotonic() < deadline, jobs.logs(first)[-3000:]
        time.sleep(0.05)
    driver = jobs.info(first)["driver_info"]
    os.kill(int(driver["pid"]), signal.SIGKILL)  # the submitted driver, found by its job, and only it
    assert jobs.wait(first, timeout=120) == "FAILED"
    # Ray Data's scheduler died with the driver, so nothing new starts; Ray then ends the dead job's actors.
    deadline = time.monotonic() + 120
    while jobs.alive_stage_actors():
        assert time.monotonic() < deadline, jobs.alive_stage_actors()
        time.sleep(0.5)
    done = committed(out)
    assert 1 <= len(done) < UNITS and not (out / "dataset_card.json").exists(), "the kill did not land mid-run"

    second = jobs.submit(f"output={out}")
    assert jobs.wait(second) == "SUCCEEDED", jobs.logs(second)[-3000:]
    assert committed(out) == {p.stem for p in (ref / "manifest").glob("*.parquet")}
    assert_same_dataset(out, ref)
