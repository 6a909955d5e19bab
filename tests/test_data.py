"""The shard loader: bucketed, deterministic, sharded by rank and worker, resumable, and tolerant of bad data."""
from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from common.autoencoder import SD_VAE_SPACE, LatentSpace
from curation.shard_format import SHARDS_DIR
from tests.shard_fixtures import FixtureSpec, write_dataset
from training.data import BatchPlan, DataError, ShardBatches, ShardReader, draw_latents, make_loader

BUCKETS = {(64, 64): 13, (64, 96): 9, (96, 64): 6}  # 28 samples, uneven buckets


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_shards")
    samples = write_dataset(root, FixtureSpec(BUCKETS, units=3, caption_names=("llava", "original")))
    return root, {s.key: s for s in samples}


def stream(plan, root, rank, start, count, caption="llava", workers=0, length=16):
    loader = make_loader(plan, root, rank, start, caption, length, 32, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            break
    return out


def test_every_batch_is_one_bucket_and_an_epoch_uses_each_sample_at_most_once(text_data):
    root, samples = text_data
    world, batch_size = 2, 4
    plan = BatchPlan.from_dataset(root, "llava", batch_size, world, seed=3)
    # Hand count: full batches per bucket 13//4 + 9//4 + 6//4 = 3 + 2 + 1 = 6, i.e. 3 per rank.
    assert plan.batches_per_rank == 3
    for epoch in range(3):
        seen = Counter()
        for rank in range(world):
            for batch in stream(plan, root, rank, epoch * 3, 3):
                assert batch["epoch"] == epoch and len(batch["keys"]) == batch_size and not batch["rejected"]
                buckets = {tuple(samples[k].meta["bucket"]) for k in batch["keys"]}
                assert len(buckets) == 1
                h, w = next(iter(buckets))
                assert batch["latent_mean"].shape == (batch_size, 4, h // 8, w // 8)
                seen.update(batch["keys"])
        assert max(seen.values()) == 1 and sum(seen.values()) == 6 * batch_size
    # Each epoch reshuffles, the same seed gives the same order, another seed another one.
    first = [b.tolist() for b in plan.epoch_batches(0)]
    assert first != [b.tolist() for b in plan.epoch_batches(1)]
    assert first == [b.tolist() for b in BatchPlan.from_dataset(root, "llava", batch_size, world, 3).epoch_batches(0)]
    assert first != [b.tolist() for b in BatchPlan.from_dataset(root, "llava", batch_size, world, 4).epoch_batches(0)]


def test_workers_and_resume_continue_the_same_stream(text_data):
    root, _ = text_data
    plan = BatchPlan.from_dataset(root, "llava", 3, world_size=2, seed=0)
    reference = [b["keys"] for b in stream(plan, root, rank=1, start=0, count=10)]
    assert [b["keys"] for b in stream(plan, root, rank=1, start=0, count=10, workers=2)] == reference
    # Stopped after 4 batches and restarted from the stored position: nothing repeated, nothing skipped.
    head = stream(plan, root, rank=1, start=0, count=4, workers=2)
    tail = stream(plan, root, rank=1, start=head[-1]["position"] + 1, count=6, workers=2)
    assert [b["keys"] for b in head + tail] == reference
    assert [b["position"] for b in head + tail] == list(range(10))
    # The two ranks never share a batch.
    other = [b["keys"] for b in stream(plan, root, rank=0, start=0, count=plan.batches_per_rank)]
    mine = reference[: plan.batches_per_rank]
    assert not set(sum(other, [])) & set(sum(mine, []))


def test_batch_contents_match_the_stored_samples(text_data):
    root, samples = text_data
    plan = BatchPlan.from_dataset(root, "original", 5, world_size=1, seed=0)
    batch = stream(plan, root, 0, 0, 1, caption="original", length=16)[0]
    for i, key in enumerate(batch["keys"]):
        s = samples[key]
        assert torch.equal(batch["latent_mean"][i], torch.from_numpy(s.latent_mean.astype(np.float32)))
        assert torch.equal(batch["latent_std"][i], torch.from_numpy(s.latent_std.astype(np.float32)))
        n = s.meta["t5_tokens"]["original"]
        assert batch["caption_mask"][i].tolist() == [True] * n + [False] * (16 - n)
        assert torch.equal(batch["caption"][i, :n], torch.from_numpy(s.t5["original"].astype(np.float32)))
        assert not batch["caption"][i, n:].any()
        assert batch["resolution"][i].tolist() == s.meta["orig_size"]
        assert batch["aspect_ratio"][i].item() == pytest.approx(s.meta["bucket"][0] / s.meta["bucket"][1])


def test_fresh_latent_is_drawn_from_mean_and_std(text_data):
    root, _ = text_data
    plan = BatchPlan.from_dataset(root, "llava", 4, world_size=1, seed=0)
    batch = stream(plan, root, 0, 0, 1)[0]
    z1 = draw_latents(batch, torch.Generator().manual_seed(7), SD_VAE_SPACE)
    eps = torch.randn(batch["latent_mean"].shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, (batch["latent_mean"] + batch["latent_std"] * eps) * 0.18215)
    z2 = draw_latents(batch, torch.Generator().manual_seed(8), SD_VAE_SPACE)
    assert not torch.equal(z1, z2)  # a fresh draw every step
    # SD3's VAE: shifted, then scaled, as diffusers' SD3 pipeline does; a deterministic encoder (std 0) is its mean.
    sd3 = LatentSpace(channels=4, downsample_factor=8, scaling_factor=1.5305, shift_factor=0.0609)
    z3 = draw_latents(batch, torch.Generator().manual_seed(7), sd3)
    torch.testing.assert_close(z3, (batch["latent_mean"] + batch["latent_std"] * eps - 0.0609) * 1.5305)
    point = {**batch, "latent_std": torch.zeros_like(batch["latent_std"])}
    torch.testing.assert_close(draw_latents(point, torch.Generator().manual_seed(9), sd3),
                               (batch["latent_mean"] - 0.0609) * 1.5305)


def test_class_labels(tmp_path):
    samples = write_dataset(tmp_path, FixtureSpec({(64, 64): 8}, units=1, num_classes=3, caption_names=()))
    labels = {s.key: s.meta["class_label"] for s in samples}
    plan = BatchPlan.from_dataset(tmp_path, None, 4, world_size=1, seed=0, num_classes=3)
    batch = stream(plan, tmp_path, 0, 0, 1, caption=None)[0]
    assert batch["class_labels"].tolist() == [labels[k] for k in batch["keys"]] and "caption" not in batch
    # Labels are pattern % 3 = 0,1,2,0,0,1,2,0: with num_classes=2 the two 2s are out of range.
    assert BatchPlan.from_dataset(tmp_path, None, 2, 1, 0, num_classes=2).excluded == {"class_label outside [0, 2)": 2}
    with pytest.raises(DataError, match="data.batch_size"):
        BatchPlan.from_dataset(tmp_path, None, 7, world_size=1, seed=0, num_classes=2)


def test_plan_errors_and_exclusions_are_reported(text_data, tmp_path):
    root, _ = text_data
    with pytest.raises(DataError, match=r"data.caption.*'llava', 'original'"):
        BatchPlan.from_dataset(root, "prompt", 4, 1, 0)
    with pytest.raises(DataError, match="data.batch_size"):
        BatchPlan.from_dataset(root, "llava", 14, 1, 0)
    # One unit's tar vanished: its rows are left out of the plan and counted.
    write_dataset(tmp_path, FixtureSpec({(64, 64): 12}, units=3))
    (tmp_path / SHARDS_DIR / "unit-0001.tar").unlink()
    plan = BatchPlan.from_dataset(tmp_path, "llava", 2, 1, 0)
    assert plan.num_samples == 8 and plan.excluded == {"shard file missing": 4}


def _rewrite_tar(path, mutate):
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in mutate(members):
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_shards_and_samples_are_skipped_and_counted(tmp_path):
    write_dataset(tmp_path, FixtureSpec({(64, 64): 12}, units=3))
    # unit-0000: truncated in the middle (a crashed copy); unit-0001: one sample's latent is not an array.
    path0 = tmp_path / SHARDS_DIR / "unit-0000.tar"
    path0.write_bytes(path0.read_bytes()[: path0.stat().st_size // 3])
    broken_key = []

    def garble_one(members):
        for info, data in members:
            if info.name.endswith(".latent_std.npy") and not broken_key:
                broken_key.append(info.name.split(".")[0])
                data = b"not an npy file"
            yield info, data

    _rewrite_tar(tmp_path / SHARDS_DIR / "unit-0001.tar", garble_one)
    plan = BatchPlan.from_dataset(tmp_path, "llava", 3, world_size=1, seed=0)
    accepted, rejected = [], []
    for batch in stream(plan, tmp_path, 0, 0, plan.batches_per_rank):
        accepted += batch["keys"]
        rejected += batch["rejected"]
        if batch["keys"]:
            assert batch["latent_mean"].shape[0] == len(batch["keys"])
    assert len(accepted) + len(rejected) == 12  # seen = accepted + rejected
    by_key = {r["key"]: r for r in rejected}
    assert by_key[broken_key[0]]["reason"] == "invalid sample"
    assert "not a readable .npy" in by_key[broken_key[0]]["detail"]
    from_unit0 = [r for r in rejected if r["detail"].startswith("shards/unit-0000.tar")]
    assert 1 <= len(from_unit0) <= 4 and len(rejected) == len(from_unit0) + 1
    assert {r["reason"] for r in from_unit0} == {"unreadable shard"}
    assert not set(by_key) & set(accepted)


def test_tar_members_outside_the_top_level_are_ignored(tmp_path):
    write_dataset(tmp_path, FixtureSpec({(64, 64): 2}, units=1))
    path = tmp_path / SHARDS_DIR / "unit-0000.tar"

    def add_escapes(members):
        members = list(members)
        yield from members
        for info, data in members[:3]:
            for name in (f"../{info.name}", f"sub/{info.name}", f".{info.name}"):
                yield tarfile.TarInfo(name), b"x" + data

    _rewrite_tar(path, add_escapes)
    reader = ShardReader(tmp_path)
    index = reader._index(f"{SHARDS_DIR}/unit-0000.tar")
    assert index.error is None and len(index.members) == 2
    assert all("/" not in k and not k.startswith(".") for k in index.members)
    key = next(iter(index.members))
    assert reader.read(f"{SHARDS_DIR}/unit-0000.tar", key, "llava").key == key


def test_dataset_object_is_usable_without_a_dataloader(text_data):
    root, _ = text_data
    plan = BatchPlan.from_dataset(root, "llava", 4, world_size=1, seed=0)
    dataset = ShardBatches(plan, root, rank=0, start=5, caption="llava", caption_length=16, caption_channels=32)
    assert dataset.load(5)["position"] == 5 and next(iter(dataset))["keys"] == dataset.load(5)["keys"]
