"""The shard loader: bucketed batches planned from the manifest, read by key from webdataset tars, resumable.

The order of batches is a pure function of (manifest, batch size, world size, seed), so a resumed run continues it
exactly, without repeating or skipping a sample:

  plan     for epoch e, samples of each aspect bucket (sorted by shard and key) are shuffled with seed (seed, e),
           cut into batches of `batch_size` (a bucket's remainder waits for the next epoch's shuffle), and the
           batches of all buckets are shuffled together; the list is trimmed to a multiple of the world size.
  shard    batch i of an epoch goes to rank i % world. A rank sees one endless stream of batches over epochs;
           its k-th batch is (epoch k // n, batch rank + world * (k % n)), n = batches per rank per epoch.
  workers  DataLoader worker w of W loads the rank's batches start + w, start + w + W, ...; torch hands them to
           the trainer round-robin, i.e. in stream order. Every batch carries its stream position; the loader
           state a checkpoint stores is the next position. Workers start from a fresh `forkserver` process, not
           forked from the trainer: a fork copies a parent that runs threads (TensorBoard and wandb writers,
           intra-op pools, DeepSpeed) mid-operation, and a worker forked so can crash hours later (a segfault at
           step 863 of the demo's stage 2). A worker that dies anyway (a native decoder's segfault, the OOM killer)
           is restarted at the position of the batch it owed: the same batches follow, and the run goes on.
  read     samples are read by key from the tars (`docs/SHARD_FORMAT.md`) through an index of member offsets built
           per shard on first use, and decoded and validated by curation.shard_format.

Bad data never stops training: a sample whose shard is unreadable or truncated, or whose members do not decode, is
left out of its batch and reported in the batch's `rejected` list ({key, reason, detail}); a batch that loses every
sample comes back empty and the trainer moves on to the next. The manifest rows that cannot be used at all (no
features for the chosen caption, no class label, a missing tar) are left out of the plan and counted in
`BatchPlan.excluded`.

A batch is a dict of CPU tensors holding one bucket:
    latent_mean, latent_std  float32 [B, C, h, w]  the autoencoder's latent distribution (draw_latents)
    caption, caption_mask    float32 [B, L, D], bool [B, L]  T5 features zero-padded to L tokens (text data)
    class_labels             long [B]  (class-conditional data)
    resolution, aspect_ratio float32 [B, 2] original (h, w) in pixels, [B, 1] bucket h / w (micro-conditions)
    aspect_ratio_key         float32 [B, 1] the bucket's official ratio key (e.g. 0.57), the official MS input
    keys, position, epoch, rejected ([{key, reason, detail}])
"""
from __future__ import annotations

import logging
import multiprocessing
import tarfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.autoencoder import LatentSpace
from curation.shard_format import (
    MEAN_EXT, META_EXT, STD_EXT, SUPPORTED_VERSIONS, T5_PREFIX, ShardFormatError, aspect_ratio_key, decode_sample,
    read_manifest,
)

log = logging.getLogger(__name__)

PLAN_COLUMNS = ("key", "shard", "bucket_h", "bucket_w", "latent_h", "latent_w", "orig_h", "orig_w", "class_label")


class DataError(ValueError):
    """A dataset that cannot be trained on as configured; the message says why and which setting to change."""


# ---------------------------------------------------------------------------------------------------------------
# The plan: which samples form which batch, for any epoch, from the manifest alone
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BatchPlan:
    """Deterministic bucketed batches. `rows` holds the usable manifest rows, sorted by (shard, key)."""

    rows: dict[str, np.ndarray]  # column -> values, one entry per usable sample
    batch_size: int
    world_size: int
    seed: int
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> manifest rows left out of the plan

    def __post_init__(self) -> None:
        heights, widths = self.rows["bucket_h"], self.rows["bucket_w"]
        codes = heights * (int(widths.max(initial=0)) + 1) + widths
        self.bucket_members: dict[tuple[int, int], np.ndarray] = {}
        for code in np.unique(codes):  # sorted, so buckets are visited in a fixed order
            members = np.flatnonzero(codes == code)
            self.bucket_members[(int(heights[members[0]]), int(widths[members[0]]))] = members
        full = sum(len(m) // self.batch_size for m in self.bucket_members.values())
        self.batches_per_rank = full // self.world_size
        if self.batches_per_rank == 0:
            sizes = {f"{h}x{w}": len(m) for (h, w), m in self.bucket_members.items()}
            raise DataError(
                f"the dataset cannot fill one batch per process: usable samples per bucket {sizes}, "
                f"data.batch_size={self.batch_size} per process, {self.world_size} process(es); "
                f"lower data.batch_size or add data (left out of the plan: {self.excluded or 'none'})")
        self._cache: OrderedDict[int, list[np.ndarray]] = OrderedDict()

    @classmethod
    def from_dataset(cls, root: str | Path, caption: str | None, batch_size: int, world_size: int, seed: int,
                     num_classes: int | None = None) -> "BatchPlan":
        """The plan over `root`'s manifest. Text data (`caption` set) needs t5_tokens_<caption>; class data
        (`caption` None) needs a class_label in [0, num_classes)."""
        root = Path(root)
        try:
            table = read_manifest(root)
        except FileNotFoundError as err:
            raise DataError(f"data.root: {err}; expected a shard dataset folder (docs/SHARD_FORMAT.md)") from None
        missing = [c for c in PLAN_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"{root}: manifest lacks columns {missing}; is it a shard dataset (docs/SHARD_FORMAT.md)?")
        df = table.to_pandas()
        usable = np.ones(len(df), dtype=bool)
        excluded: Counter[str] = Counter()

        def exclude(mask: np.ndarray, reason: str) -> None:
            newly = usable & mask
            if newly.any():
                excluded[reason] += int(newly.sum())
                usable[newly] = False

        exclude(~df["format_version"].isin(SUPPORTED_VERSIONS).to_numpy(), "unsupported format_version")
        if caption is not None:
            column = f"t5_tokens_{caption}"
            if column not in df.columns:
                known = sorted(c.removeprefix("t5_tokens_") for c in df.columns if c.startswith("t5_tokens_"))
                raise DataError(f"data.caption: {root} has no T5 features of caption {caption!r}; "
                                f"encoded captions: {known}")
            exclude(df[column].isna().to_numpy(), f"no T5 features of caption {caption!r}")
        else:
            labels = df["class_label"]
            exclude(labels.isna().to_numpy(), "no class_label (class-conditional training)")
            if num_classes is not None:
                values = labels.fillna(-1).to_numpy()
                exclude((values < 0) | (values >= num_classes), f"class_label outside [0, {num_classes})")
        shard_exists = {s: (root / s).is_file() for s in df["shard"].unique()}
        exclude(~df["shard"].map(shard_exists).to_numpy(dtype=bool), "shard file missing")

        df = df[usable].sort_values(["shard", "key"], kind="stable")
        rows = {c: df[c].to_numpy() for c in PLAN_COLUMNS}
        rows["class_label"] = df["class_label"].fillna(-1).to_numpy().astype(np.int64)
        for c in ("bucket_h", "bucket_w", "latent_h", "latent_w", "orig_h", "orig_w"):
            rows[c] = rows[c].astype(np.int64)
        if excluded:
            log.warning("%s: %d manifest rows left out of the plan: %s", root, sum(excluded.values()), dict(excluded))
        return cls(rows=rows, batch_size=batch_size, world_size=world_size, seed=seed, excluded=dict(excluded))

    @property
    def num_samples(self) -> int:
        return len(self.rows["key"])

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """All batches of an epoch (row indices), trimmed to batches_per_rank * world_size."""
        if epoch in self._cache:
            return self._cache[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for members in self.bucket_members.values():
            shuffled = rng.permutation(members)
            usable = len(shuffled) - len(shuffled) % self.batch_size
            batches.extend(shuffled[i:i + self.batch_size] for i in range(0, usable, self.batch_size))
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order[: self.batches_per_rank * self.world_size]]
        self._cache[epoch] = batches
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return batches

    def rank_batch(self, rank: int, position: int) -> tuple[int, np.ndarray]:
        """(epoch, row indices) of the `position`-th batch of rank's stream."""
        epoch, j = divmod(position, self.batches_per_rank)
        return epoch, self.epoch_batches(epoch)[rank + self.world_size * j]


# ---------------------------------------------------------------------------------------------------------------
# Reading samples by key from the tars
# ---------------------------------------------------------------------------------------------------------------


class SampleError(Exception):
    """One sample that cannot be read: `reason` is the kind of failure (what rejection counts group by), str() the
    details."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class _ShardIndex:
    members: dict[str, dict[str, tuple[int, int]]]  # key -> suffix -> (data offset, size)
    error: str | None  # why indexing stopped early, if it did


def _check_end_of_archive(path: Path, end: int, size: int) -> str | None:
    """None when only the end-of-archive zero blocks follow the last member, else what is wrong."""
    if size - end < 2 * tarfile.BLOCKSIZE:
        return f"no end-of-archive marker after byte {end} (truncated)"
    with open(path, "rb") as fh:
        fh.seek(end)
        while chunk := fh.read(1 << 16):
            if chunk.strip(b"\0"):
                return f"unparseable data after byte {end} (damaged or truncated)"
    return None


class ShardReader:
    """Reads samples by key from a dataset's tars through per-shard indexes of member offsets (built on first use).

    Only regular files named `<key>.<suffix>` at the tar's top level count; members in folders, dot files and
    links are ignored, and nothing is ever extracted to disk.
    """

    def __init__(self, root: str | Path, max_open_indexes: int = 64):
        self.root = Path(root)
        self.max_open_indexes = max_open_indexes
        self._indexes: OrderedDict[str, _ShardIndex] = OrderedDict()

    def _index(self, shard: str) -> _ShardIndex:
        index = self._indexes.get(shard)
        if index is None:
            index = self._build_index(self.root / shard)
            self._indexes[shard] = index
            while len(self._indexes) > self.max_open_indexes:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(shard)
        return index

    @staticmethod
    def _build_index(path: Path) -> _ShardIndex:
        members: dict[str, dict[str, tuple[int, int]]] = {}
        error = None
        try:
            size = path.stat().st_size
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    if not info.isfile() or "/" in info.name or info.name.startswith("."):
                        continue
                    key, _, suffix = info.name.partition(".")
                    if info.offset_data + info.size > size:
                        error = f"member {info.name} is truncated"
                        break
                    members.setdefault(key, {})[suffix] = (info.offset_data, info.size)
                if error is None:
                    # tarfile stops quietly at a header it cannot parse; a whole tar ends in >= 2 zero blocks.
                    error = _check_end_of_archive(path, tar.offset, size)
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            error = f"{err.__class__.__name__}: {err}"
        return _ShardIndex(members, error)

    def read(self, shard: str, key: str, caption: str | None):
        """The decoded, validated ShardSample (with only the needed caption's features); SampleError otherwise."""
        index = self._index(shard)
        found = index.members.get(key)
        if found is None:
            if index.error:
                raise SampleError("unreadable shard", f"{shard}: {key} not found before the shard's damage ({index.error})")
            raise SampleError("not in its shard", f"{shard}: {key} is in the manifest but not in the tar")
        wanted = [META_EXT, MEAN_EXT, STD_EXT] + ([f"{T5_PREFIX}{caption}.npy"] if caption else [])
        absent = [s for s in wanted if s not in found]
        if absent and index.error:
            raise SampleError("unreadable shard", f"{shard}: {key} lacks members {absent} before the shard's damage "
                                                  f"({index.error})")
        if absent:
            raise SampleError("missing members", f"{shard}: {key} lacks members {absent}")
        raw: dict[str, bytes] = {}
        try:
            with open(self.root / shard, "rb") as fh:
                for suffix in wanted:
                    offset, size = found[suffix]
                    fh.seek(offset)
                    raw[suffix] = fh.read(size)
                    if len(raw[suffix]) != size:
                        raise SampleError("truncated member", f"{shard}: {key}.{suffix} is truncated")
        except OSError as err:
            raise SampleError("read error", f"{shard}: {key} could not be read ({err})") from None
        try:
            return decode_sample(raw, key)
        except ShardFormatError as err:
            raise SampleError("invalid sample", f"{shard}: {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------


def pad_caption(features: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, D] valid-token features -> ([length, D] zero-padded, [length] bool mask); longer captions are cut."""
    n = min(len(features), length)
    padded = np.zeros((length, features.shape[1]), dtype=np.float32)
    padded[:n] = features[:n]
    mask = np.zeros(length, dtype=bool)
    mask[:n] = True
    return padded, mask


class ShardBatches(torch.utils.data.IterableDataset):
    """One rank's endless stream of batches from position `start` on, split over DataLoader workers."""

    def __init__(self, plan: BatchPlan, root: str | Path, rank: int, start: int, caption: str | None,
                 caption_length: int, caption_channels: int | None):
        super().__init__()
        self.plan, self.root, self.rank, self.start = plan, Path(root), rank, start
        self.caption, self.caption_length, self.caption_channels = caption, caption_length, caption_channels
        self._reader: ShardReader | None = None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        position = self.start + worker
        while True:
            yield self.load(position)
            position += workers

    def load(self, position: int) -> dict:
        """The batch at `position` of this rank's stream."""
        if self._reader is None:
            self._reader = ShardReader(self.root)
        epoch, rows = self.plan.rank_batch(self.rank, position)
        plan = self.plan.rows
        samples, kept, rejected = [], [], []
        for i in rows.tolist():
            key, shard = str(plan["key"][i]), str(plan["shard"][i])
            try:
                sample = self._reader.read(shard, key, self.caption)
                self._check(sample, i)
            except SampleError as err:
                rejected.append({"key": key, "reason": err.reason, "detail": str(err)})
                continue
            samples.append(sample)
            kept.append(i)
        batch = {"keys": [s.key for s in samples], "position": position, "epoch": epoch, "rejected": rejected}
        if samples:
            batch.update(self._collate(samples, np.asarray(kept)))
        return batch

    def _check(self, sample, i: int) -> None:
        """What decode_sample cannot know: the sample must match its manifest row and the model."""
        plan = self.plan.rows
        expected = (int(plan["latent_h"][i]), int(plan["latent_w"][i]))
        if tuple(sample.latent_mean.shape[1:]) != expected:
            raise SampleError("latent size differs from the manifest",
                              f"{sample.key}: latent {tuple(sample.latent_mean.shape)} does not match its manifest "
                              f"bucket latent size {expected}")
        if self.caption is not None and self.caption_channels is not None:
            width = sample.t5[self.caption].shape[1]
            if width != self.caption_channels:
                raise SampleError("caption feature width differs from the model",
                                  f"{sample.key}: t5_{self.caption} is {width} wide, the model's caption_channels "
                                  f"is {self.caption_channels}")

    def _collate(self, samples: list, rows: np.ndarray) -> dict:
        plan = self.plan.rows
        batch = {
            "latent_mean": torch.from_numpy(np.stack([s.latent_mean for s in samples]).astype(np.float32)),
            "latent_std": torch.from_numpy(np.stack([s.latent_std for s in samples]).astype(np.float32)),
            "resolution": torch.from_numpy(np.stack([plan["orig_h"][rows], plan["orig_w"][rows]], 1).astype(np.float32)),
            "aspect_ratio": torch.from_numpy((plan["bucket_h"][rows] / plan["bucket_w"][rows]).astype(np.float32)[:, None]),
            "aspect_ratio_key": torch.tensor([[aspect_ratio_key(h, w)] for h, w in
                                              zip(plan["orig_h"][rows].tolist(), plan["orig_w"][rows].tolist())]),
        }
        if self.caption is not None:
            padded = [pad_caption(s.t5[self.caption], self.caption_length) for s in samples]
            batch["caption"] = torch.from_numpy(np.stack([p[0] for p in padded]))
            batch["caption_mask"] = torch.from_numpy(np.stack([p[1] for p in padded]))
        else:
            batch["class_labels"] = torch.from_numpy(plan["class_label"][rows].astype(np.int64))
        return batch


def _worker_init(_: int) -> None:
    # Workers only decode .npy members; one thread each keeps them from competing with the training process.
    torch.set_num_threads(1)


def worker_context(name: str | None):
    """The multiprocessing context DataLoader workers start from: a forkserver preloaded with this module (each
    worker is then a cheap fork of a clean process that already imported torch), or None for torch's default."""
    if name is None:
        return None
    context = multiprocessing.get_context(name)
    if name == "forkserver":
        context.set_forkserver_preload([__name__])  # not '__main__': a notebook's or a job's script may not import
    return context


def make_loader(plan: BatchPlan, root: str | Path, rank: int, start: int, caption: str | None, caption_length: int,
                caption_channels: int | None, num_workers: int = 2, prefetch_factor: int = 2,
                pin_memory: bool = False, multiprocessing_context: str | None = "forkserver",
                dataset_class: type[ShardBatches] = ShardBatches) -> torch.utils.data.DataLoader:
    """A DataLoader over rank's stream from position `start`; it yields ready batches (batch_size=None)."""
    dataset = dataset_class(plan, root, rank, start, caption, caption_length, caption_channels)
    # Its own generator: creating an iterator would otherwise draw from the global RNG, and a resumed run, which
    # creates one more, would no longer reproduce the uninterrupted run's caption dropout.
    kwargs = dict(num_workers=num_workers, worker_init_fn=_worker_init, pin_memory=pin_memory, batch_size=None,
                  generator=torch.Generator().manual_seed(0))
    if num_workers:
        kwargs["prefetch_factor"] = prefetch_factor
        kwargs["multiprocessing_context"] = worker_context(multiprocessing_context)
    return torch.utils.data.DataLoader(dataset, **kwargs)


# torch's words for a worker process that died (DataLoader's liveness check and its SIGCHLD handler).
_WORKER_DIED = ("exited unexpectedly", "killed by signal")


def _lost_a_worker(iterator, err: Exception, grace: float = 10.0) -> bool:
    """Whether `err` came from a dead worker. Besides torch's own report, a worker that dies right after queueing
    a batch leaves the batch's shared-memory handle unreachable (EOFError, ConnectionResetError), possibly while it
    is still dying (a segfault handler runs first): a worker is given `grace` seconds to be seen dead."""
    workers = getattr(iterator, "_workers", [])
    deadline = time.monotonic() + (grace if isinstance(err, (EOFError, OSError)) else 0.0)
    while True:
        if any(not w.is_alive() for w in workers):
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    message = str(err)
    return (isinstance(err, RuntimeError) and message.startswith("DataLoader worker")
            and any(words in message for words in _WORKER_DIED))


class ShardLoader:
    """One rank's resumable stream of non-empty batches; it owns its position and its sample accounting.

    `next_batch()` returns the next batch holding at least one sample; samples rejected on the way are counted by
    reason and passed to `on_rejected` (the trainer logs them). `state_dict()` / `load_state_dict()` carry the
    position of the next batch and the counts through a checkpoint, together with what defines the stream (world
    size, batch size, seed): a checkpoint of another stream is refused, since resuming it would repeat or skip data.

    Workers that die are restarted at the position of the batch they owed, which gives the same batch (the stream
    is a function of position), with a warning. A batch that kills a worker reading it alone `attempts` times is
    given up: its samples are rejected with reason "loader worker died reading the batch" and the stream goes on.
    """

    def __init__(self, plan: BatchPlan, root: str | Path, rank: int, caption: str | None, caption_length: int,
                 caption_channels: int | None, num_workers: int = 2, prefetch_factor: int = 2,
                 pin_memory: bool = False, on_rejected=None, multiprocessing_context: str | None = "forkserver",
                 attempts: int = 3, dataset_class: type[ShardBatches] = ShardBatches):
        self.plan, self.root, self.rank = plan, Path(root), rank
        self._make = dict(caption=caption, caption_length=caption_length, caption_channels=caption_channels,
                          num_workers=num_workers, prefetch_factor=prefetch_factor, pin_memory=pin_memory,
                          multiprocessing_context=multiprocessing_context, dataset_class=dataset_class)
        self.on_rejected = on_rejected
        self.attempts = attempts
        self.position = 0  # the next batch of this rank's stream
        self.samples_accepted = 0
        self.samples_rejected = 0
        self.rejected_by_reason: Counter[str] = Counter()
        self.worker_restarts = 0  # this process's, not carried through checkpoints
        self._iterator = None

    def next_batch(self) -> dict:
        for _ in range(self.plan.batches_per_rank + 1):
            batch = self._batch_at_position()
            self.position = batch["position"] + 1
            if batch["rejected"]:
                self.samples_rejected += len(batch["rejected"])
                self.rejected_by_reason.update(r["reason"] for r in batch["rejected"])
                if self.on_rejected is not None:
                    self.on_rejected(batch["rejected"])
            if batch["keys"]:
                self.samples_accepted += len(batch["keys"])
                return batch
        raise DataError(f"{self.root}: a whole epoch of batches held no readable sample")

    def _batch_at_position(self) -> dict:
        """The batch at self.position. A worker death loses the batches its loader had queued, so the first
        restart reads the due batch with one worker and nothing ahead: only a death there is the batch's doing."""
        careful, deaths = False, 0
        while True:
            if self._iterator is None:
                make = {**self._make, "num_workers": 1, "prefetch_factor": 1} if careful else self._make
                self._iterator = iter(make_loader(self.plan, self.root, self.rank, self.position, **make))
            try:
                batch = next(self._iterator)
            except Exception as err:
                if not _lost_a_worker(self._iterator, err):
                    raise
                self.close()
                self.worker_restarts += 1
                deaths += careful
                if deaths >= self.attempts:
                    return self._give_up()
                log.warning("rank %d: %s while batch %d was due; it is read again by one restarted worker%s",
                            self.rank, err, self.position, f" (attempt {deaths + 1} of {self.attempts})" if careful
                            else "")
                careful = True
                continue
            if careful:
                self.close()  # the configured workers take over from the next batch
            return batch

    def _give_up(self) -> dict:
        epoch, rows = self.plan.rank_batch(self.rank, self.position)
        detail = (f"the data loader's worker died {self.attempts} times reading batch {self.position} (epoch "
                  f"{epoch}) alone")
        log.error("rank %d: %s; its %d samples are rejected", self.rank, detail, len(rows))
        return {"keys": [], "position": self.position, "epoch": epoch, "rejected": [
            {"key": str(self.plan.rows["key"][i]), "reason": "loader worker died reading the batch", "detail": detail}
            for i in rows.tolist()]}

    @property
    def worker_pids(self) -> list[int]:
        """The live iterator's worker processes (none before the first batch or with num_workers 0)."""
        return [w.pid for w in getattr(self._iterator, "_workers", [])]

    def state_dict(self) -> dict:
        return {"position": self.position, "samples_accepted": self.samples_accepted,
                "samples_rejected": self.samples_rejected, "rejected_by_reason": dict(self.rejected_by_reason),
                "world_size": self.plan.world_size, "batch_size": self.plan.batch_size, "seed": self.plan.seed}

    def load_state_dict(self, state: dict) -> None:
        for name, setting, now in (("world_size", "the number of processes", self.plan.world_size),
                                   ("batch_size", "data.batch_size", self.plan.batch_size),
                                   ("seed", "data.seed", self.plan.seed)):
            if state[name] != now:
                from common.config import ConfigError

                raise ConfigError(f"{setting}: the checkpoint was written with {name}={state[name]}, this run has "
                                  f"{now}; the data position would not continue the same stream (use a new "
                                  f"run.output_dir or run.resume=false)")
        self.close()
        self.position = int(state["position"])
        self.samples_accepted, self.samples_rejected = int(state["samples_accepted"]), int(state["samples_rejected"])
        self.rejected_by_reason = Counter(state["rejected_by_reason"])

    def close(self) -> None:
        """Stop the worker processes now (not whenever the garbage collector gets to them)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def draw_latents(batch: dict, generator: torch.Generator | None, space: LatentSpace,
                 device: torch.device | str = "cpu"):
    """A fresh diffusion latent from the stored distribution: space.normalize(mean + std * eps), eps ~ N(0, I) from
    `generator` (a deterministic encoder's std is 0: its latent, normalized)."""
    mean, std = batch["latent_mean"], batch["latent_std"]
    eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator is not None else "cpu")
    return space.normalize(mean.to(eps.device) + std.to(eps.device) * eps).to(device)
