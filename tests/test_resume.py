"""A run stopped and resumed gives, bit for bit on CPU, the losses and weights of one that never stopped."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from common.config import ConfigError
from tests.shard_fixtures import FixtureSpec, write_dataset
from tests.test_trainer import base_config, write_yaml
from training.train_config import load_train_config
from training.trainer import train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_shards")
    write_dataset(root, FixtureSpec({(64, 64): 10, (64, 96): 6}, units=2))
    return root


def config(data_root, tmp_path, out, steps, **run):
    # 16 samples in batches of 3: 4 batches per epoch, so 10 steps cross two epoch boundaries; one data worker.
    cfg = base_config(data_root, tmp_path / out, data={"batch_size": 3, "num_workers": 1},
                      run={"steps": steps, "checkpoint_every": 4, **run})
    return load_train_config(write_yaml(tmp_path / f"{out}.yaml", cfg))


@pytest.mark.slow
def test_stop_and_resume_is_bit_exact(data_root, tmp_path):
    straight = train(config(data_root, tmp_path, "straight", 10))

    first = train(config(data_root, tmp_path, "stopped", 6))  # checkpoints at 4 and 6 (the end)
    # A crash in the middle of the next checkpoint left a temp folder: it must be ignored.
    (tmp_path / "stopped" / "checkpoints" / ".step_00000008.tmp-ckpt").mkdir()
    resumed = train(config(data_root, tmp_path, "stopped", 10))

    assert resumed.resumed_from.endswith("step_00000006")
    assert first.losses + resumed.losses == straight.losses  # exact float equality, all 10 steps
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "straight" / "final" / name))
        b = load_file(str(tmp_path / "stopped" / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # Counters are totals of the run, carried through the checkpoint.
    assert first.samples_accepted == 18 and resumed.samples_accepted == straight.samples_accepted == 30

    # Rerunning a finished run does nothing and reports the same end state.
    again = train(config(data_root, tmp_path, "stopped", 10))
    assert again.steps == 10 and again.losses == []


@pytest.mark.slow
def test_resume_refuses_a_different_data_stream(data_root, tmp_path):
    train(config(data_root, tmp_path, "run", 2))
    changed = base_config(data_root, tmp_path / "run", data={"batch_size": 2, "num_workers": 1}, run={"steps": 4})
    with pytest.raises(ConfigError, match="data.batch_size: the checkpoint was written with batch_size=3, this run has 2"):
        train(load_train_config(write_yaml(tmp_path / "changed.yaml", changed)))
