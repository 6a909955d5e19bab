"""Damage drills: a run whose checkpoints were truncated, emptied, deleted or half-written resumes from the newest
intact checkpoint, says what it skipped, and continues bit for bit as the run that never stopped; with no intact
checkpoint it stops with an error instead of starting again from step 0."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.shard_fixtures import FixtureSpec, write_dataset
from tests.test_trainer import base_config, write_yaml
from training.checkpointing import CheckpointError
from training.train_config import load_train_config
from training.trainer import train

STEP = "step_{:08d}".format


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(straight: the losses of 8 uninterrupted steps, base: a run folder stopped after step 6 with checkpoints at
    2, 4 and 6, the data, a scratch folder)."""
    tmp = tmp_path_factory.mktemp("damage")
    data = tmp / "data"
    write_dataset(data, FixtureSpec({(64, 64): 10, (64, 96): 6}, units=2))
    straight = train(_config(data, tmp, tmp / "straight", 8))
    base = train(_config(data, tmp, tmp / "base", 6))
    assert base.losses == straight.losses[:6]
    assert sorted(p.name for p in (tmp / "base" / "checkpoints").glob("step_*")) == [STEP(2), STEP(4), STEP(6)]
    return straight.losses, tmp / "base", data, tmp


def _config(data, tmp, out, steps):
    cfg = base_config(data, out, data={"batch_size": 3, "num_workers": 0},
                      run={"steps": steps, "checkpoint_every": 2, "keep_last": 3})
    return load_train_config(write_yaml(tmp / f"{out.name}-{steps}.yaml", cfg))


def _copy(runs, name):
    _, base, data, tmp = runs
    run = tmp / name
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run)
    return run


def _resume(runs, run, caplog, steps=8):
    _, _, data, tmp = runs
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = train(_config(data, tmp, run, steps))
    return result, "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_unreadable_latest_pointer_scans_for_the_newest_checkpoint(runs, tmp_path, caplog, damage):
    straight = runs[0]
    run = _copy(runs, f"latest-{damage}")
    latest = run / "checkpoints" / "latest"
    latest.write_bytes({"truncated": b"step_000", "empty": b"", "garbage": b"\xff\xfe\x00junk"}[damage])
    result, warnings = _resume(runs, run, caplog)
    assert result.resumed_from.endswith(STEP(6)) and result.losses == straight[6:8]
    assert "checkpoints/latest" in warnings and "newest complete checkpoint" in warnings


# Each kind of file of the newest checkpoint, damaged three ways: the resume must fall back to step 4.
FILES = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "ema.safetensors",
         "rng_rank0.pt", "state_rank0.json", "loader_rank0.json", "manifest.json"]


@pytest.mark.slow
@pytest.mark.parametrize("name,how", [(f, "truncated") for f in FILES]
                         + [("rng_rank0.pt", "zero bytes"), ("state_rank0.json", "zero bytes"),
                            ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "missing"), ("ema.safetensors", "missing"),
                            ("mp_rank_00_model_states.pt", "flipped byte")])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(runs, caplog, name, how):
    straight = runs[0]
    run = _copy(runs, f"{name}-{how}".replace(" ", "_"))
    path = run / "checkpoints" / STEP(6) / name
    if how == "truncated":
        _truncate(path)
    elif how == "zero bytes":
        path.write_bytes(b"")
    elif how == "missing":
        path.unlink()
    else:  # same size, one byte changed: only the checksum can tell
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    result, warnings = _resume(runs, run, caplog)
    assert result.resumed_from.endswith(STEP(4))
    assert result.losses == straight[4:8]  # the uninterrupted run's trajectory from step 4 on, exactly
    # The warning names the skipped checkpoint, the bad file and the checkpoint used.
    assert STEP(6) in warnings and name in warnings and f"resumed from {run / 'checkpoints' / STEP(4)}" in warnings
    assert list((run / "checkpoints").glob(f"{STEP(6)}.damaged-*"))  # kept aside, not deleted
    final = load_file(str(run / "final" / "model.safetensors"))
    expected = load_file(str(runs[3] / "straight" / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_two_damaged_checkpoints_fall_back_two_steps(runs, caplog):
    straight = runs[0]
    run = _copy(runs, "two-damaged")
    (run / "checkpoints" / STEP(6) / "rng_rank0.pt").write_bytes(b"")
    _truncate(run / "checkpoints" / STEP(4) / "ema.safetensors")
    result, warnings = _resume(runs, run, caplog)
    assert result.resumed_from.endswith(STEP(2)) and result.losses == straight[2:8]
    assert STEP(6) in warnings and STEP(4) in warnings and "rng_rank0.pt" in warnings and "ema.safetensors" in warnings


@pytest.mark.slow
def test_no_usable_checkpoint_stops_instead_of_starting_over(runs, caplog):
    run = _copy(runs, "all-damaged")
    for step in (2, 4, 6):
        (run / "checkpoints" / STEP(step) / "state_rank0.json").write_bytes(b"")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="no usable checkpoint") as err:
        _resume(runs, run, caplog)
    for step in (2, 4, 6):
        assert STEP(step) in str(err.value) and "state_rank0.json" in str(err.value)
    assert "step 0" in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing moved, nothing overwritten

    # Checkpoints gone but exported weights still there: also not a fresh start.
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(CheckpointError, match="final"):
        _resume(runs, run, caplog)


@pytest.mark.slow
def test_interrupted_writes_are_swept_and_an_interrupted_export_is_redone(runs, caplog):
    run = _copy(runs, "interrupted")
    exported = load_file(str(run / "final" / "model.safetensors"))
    # kill -9 during the last export: the temp folder is there, final/ is not; and a checkpoint was half-written.
    (run / "final").rename(run / ".final.tmp-deadbeef")
    (run / "checkpoints" / f".{STEP(8)}.tmp-ckpt").mkdir()
    (run / "checkpoints" / f".{STEP(8)}.tmp-ckpt" / "state_rank0.json").write_text("{")
    result, warnings = _resume(runs, run, caplog, steps=6)
    assert result.steps == 6 and result.losses == []
    assert "exporting them again" in warnings and ".final.tmp-deadbeef" in warnings
    redone = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(redone[k], exported[k]) for k in exported)
    assert not [p.name for p in run.rglob(".*tmp*")]


@pytest.mark.slow
def test_weights_are_found_from_run_and_checkpoint_folders(runs):
    """What training.sample / training.export accept: a run folder, a checkpoint, a weights folder; a checkpoint
    whose export is gone is reassembled from its ZeRO files and equals what was exported."""
    from training.weights import load_model, locate

    run = _copy(runs, "locate")
    assert locate(run).folder == run / "final" and "final" in locate(run).how
    assert locate(run / "checkpoints" / STEP(4)).folder == run / "weights" / STEP(4)
    assert locate(run / "checkpoints" / STEP(6)).folder == run / "final"  # the last step's export
    assert locate(run / "weights" / STEP(2)).folder == run / "weights" / STEP(2)

    exported = {ema: load_model(run / "weights" / STEP(4), ema=ema)[0].state_dict() for ema in (False, True)}
    shutil.rmtree(run / "weights" / STEP(4))
    located = locate(run / "checkpoints" / STEP(4))
    assert "reassembled from the DeepSpeed checkpoint" in located.how
    assert located.describe(True).startswith(f"using {located.folder / 'ema.safetensors'}")
    for ema, expected in exported.items():
        rebuilt = load_model(located.folder, ema=ema)[0].state_dict()
        assert rebuilt.keys() == expected.keys() and all(torch.equal(rebuilt[k], expected[k]) for k in expected)

    shutil.rmtree(run / "final")
    assert locate(run).folder == run / "weights" / STEP(2)  # the newest complete export left


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_continues_the_same_trajectory(runs):
    """A real SIGKILL while training (wherever it lands: a step, a checkpoint, an export), then the same command."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_trainer import ROOT

    straight, _, data, tmp = runs
    run = tmp / "killed"
    shutil.rmtree(run, ignore_errors=True)
    config_file = tmp / "killed-8.yaml"
    _config(data, tmp, run, 8)  # writes config_file
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "-m", "training.trainer", "--config", str(config_file)], cwd=ROOT,
                            env={**env, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / STEP(4)).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = train(load_train_config(config_file))
    step = int(resumed.resumed_from.rsplit("_", 1)[1])
    assert step >= 2 and resumed.losses == straight[step:8]
    final = load_file(str(run / "final" / "model.safetensors"))
    expected = load_file(str(tmp / "straight" / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_a_config_error_not_damage(runs, caplog):
    _, _, data, tmp = runs
    run = _copy(runs, "other-model")
    cfg = base_config(data, run, model={"preset": "tiny", "overrides": {"depth": 3}},
                      data={"batch_size": 3, "num_workers": 0}, run={"steps": 8, "checkpoint_every": 2, "keep_last": 3})
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.overrides: checkpoint .*step_00000006 was written for another "
                                          r"model \(depth: 2 -> 3\)"):
        train(load_train_config(write_yaml(tmp / "other-model.yaml", cfg)))
    assert not list((run / "checkpoints").glob("*.damaged-*"))  # nothing was treated as damage
