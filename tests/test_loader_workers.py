"""Data loader workers that die (a segfault, the OOM killer) do not stop training or change what it sees.

The stream of batches is a function of position, so workers restarted at the position of the batch they owed give
the very batches the dead ones would have: a run whose worker is killed mid-way has the uninterrupted run's keys
and, through the trainer, its losses bit for bit. Workers start from a forkserver, never forked from the trainer.
"""
from __future__ import annotations

import os
import signal

import pytest

from tests.crashing_batches import CrashingBatches
from tests.shard_fixtures import FixtureSpec, write_dataset
from tests.test_trainer import base_config, write_yaml
from training.data import BatchPlan, ShardLoader
from training.train_config import load_train_config
from training.trainer import Trainer, train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker_shards")
    write_dataset(root, FixtureSpec({(64, 64): 10, (64, 96): 6}, units=2))
    return root


def keys_of(loader: ShardLoader, count: int, kill_after: int | None = None, sig=signal.SIGSEGV) -> list[list[str]]:
    out = []
    for i in range(count):
        if i == kill_after:
            pids = loader.worker_pids
            assert pids and os.getpid() not in pids
            os.kill(pids[0], sig)
        out.append(loader.next_batch()["keys"])
    return out


def new_loader(root, workers: int, **kwargs) -> ShardLoader:
    # 16 samples in batches of 3: 4 batches per epoch; 10 batches cross two epoch boundaries.
    plan = BatchPlan.from_dataset(root, "llava", 3, 1, seed=0)
    return ShardLoader(plan, root, 0, "llava", 16, 32, num_workers=workers, **kwargs)


@pytest.mark.parametrize("workers, sig", [(1, signal.SIGSEGV), (2, signal.SIGKILL)])
def test_a_killed_worker_is_restarted_where_it_stood(data_root, workers, sig, caplog):
    expected = keys_of(new_loader(data_root, 0), 10)

    loader = new_loader(data_root, workers)
    try:
        got = keys_of(loader, 10, kill_after=3, sig=sig)
        assert loader.worker_restarts == 1
        assert loader.samples_accepted == 30 and loader.samples_rejected == 0
    finally:
        loader.close()
    assert got == expected
    [warning] = [r.getMessage() for r in caplog.records if "restarted worker" in r.getMessage()]
    assert "was due; it is read again by one restarted worker" in warning


def test_a_batch_that_kills_its_workers_every_time_is_rejected_and_counted(data_root, caplog):
    plan = BatchPlan.from_dataset(data_root, "llava", 3, 1, seed=0)
    doomed = [str(plan.rows["key"][i]) for i in plan.rank_batch(0, 2)[1]]
    expected = keys_of(new_loader(data_root, 0), 10)
    rejected = []
    loader = new_loader(data_root, 1, on_rejected=rejected.extend, dataset_class=CrashingBatches, attempts=2)
    try:
        got = keys_of(loader, 9)
        # The configured worker's death (at batch 1 or 2: it reads ahead), then two lone ones at batch 2; each
        # death takes torch's 5 s liveness poll to notice, hence attempts=2 here (3 in the trainer).
        assert loader.worker_restarts in (3, 4)
    finally:
        loader.close()
    assert got == expected[:2] + expected[3:]  # batch 2 is given up, the stream goes on from batch 3
    reason = "loader worker died reading the batch"
    assert loader.rejected_by_reason == {reason: 3}
    assert loader.samples_accepted + loader.samples_rejected == 30  # seen = accepted + rejected
    assert any("died 2 times reading batch 2 (epoch 0) alone" in r.getMessage() and "3 samples are rejected" in r.getMessage()
               for r in caplog.records)
    assert sorted(r["key"] for r in rejected) == sorted(doomed)


@pytest.mark.slow
def test_training_goes_on_bit_exact_when_its_worker_dies(data_root, tmp_path):
    def config(out: str, steps: int = 8):
        cfg = base_config(data_root, tmp_path / out, data={"batch_size": 3, "num_workers": 1},
                          run={"steps": steps, "checkpoint_every": 4, "log_every": 1})
        return load_train_config(write_yaml(tmp_path / f"{out}.yaml", cfg))

    straight = train(config("straight"))

    trainer = Trainer(config("killed"))
    killed = []

    def kill_the_worker():
        if trainer.counters.step == 3:
            killed.extend(trainer.loader.worker_pids)
            os.kill(killed[0], signal.SIGSEGV)

    trainer.periodic.append((1, kill_the_worker))
    try:
        result = trainer.fit()
        restarts = trainer.loader.worker_restarts
    finally:
        trainer.close()
    assert killed and restarts == 1
    assert result.losses == straight.losses  # exact float equality, all 8 steps
    assert result.samples_accepted == straight.samples_accepted == 24
    log = (tmp_path / "killed" / "logs" / "train.log").read_text()
    assert "read again by one restarted worker" in log
