"""Training throughput: the shard loader in the loop versus batches already in memory (CPU, default), and
PixArt-XL/2 under ZeRO-2 in bf16 on one GPU with and without gradient checkpointing (--gpu).

    python benchmarks/bench_trainer.py                   # CPU: a small model on a 256 px shard set written here
    python benchmarks/bench_trainer.py --gpu             # GPU: images/s, MFU and peak memory at 256, 512, 1024 px

CPU mode writes a shard dataset with realistic per-sample sizes (4x32x32 latents, 8 to 112 tokens of 4096-wide
T5 features, ~0.5 MB a sample), then times the same Trainer.train_step on (a) batches from the DataLoader over the
tars, (b) batches held in memory, step by step in alternation, and (c) the loader alone. (a)/(b) close to 1, and
a small wait for the next batch, mean the loader keeps up.
GPU mode feeds synthetic in-memory batches; MFU counts 3 x the forward FLOPs of training.model.forward_flops per
image (recomputation under gradient checkpointing is not counted as useful work) against --peak-tflops.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def _config(data_root: str, out: str, preset: str, overrides: dict, batch_size: int, workers: int,
            threads: int | None, zero_stage: int = 2, precision: str = "auto"):
    from training.train_config import TrainConfig

    return TrainConfig.model_validate({
        "stage": 3, "name": "bench",
        "model": {"preset": preset, "overrides": overrides},
        "data": {"root": data_root, "caption": "llava", "batch_size": batch_size, "num_workers": workers},
        "optimizer": {"warmup_steps": 0},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision},
        "run": {"output_dir": out, "steps": 10**6, "progress": False, "cpu_threads": threads},
    })


def _timed_steps(trainer, batches, steps: int) -> float:
    """Images per second of `steps` train_step calls over the iterator `batches`, timed after it is primed."""
    images = 0
    sync = torch.cuda.synchronize if trainer.dist.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        images += trainer.train_step(next(batches))["images"]
    sync()
    return images / (time.perf_counter() - start)


def cpu_benchmark(args) -> None:
    from tests.shard_fixtures import FixtureSpec, write_dataset
    from training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        spec = FixtureSpec({(256, 256): args.samples}, units=4, t5_width=4096, tokens=(8, 112))
        write_dataset(f"{tmp}/data", spec)
        size = sum(p.stat().st_size for p in Path(tmp, "data", "shards").iterdir())
        print(f"shard set: {args.samples} samples at 256 px, {size / 2**20:.1f} MiB in 4 tars "
              f"({time.perf_counter() - start:.1f} s to write)")
        overrides = {"hidden_size": args.hidden, "depth": args.depth, "num_heads": 4, "input_size": 32,
                     "caption_channels": 4096, "caption_length": 120}
        trainer = Trainer(_config(f"{tmp}/data", f"{tmp}/out", "tiny", overrides, args.batch_size, args.workers,
                                  args.threads))
        print(f"model: {trainer.engine.module.num_parameters():,} parameters (hidden {args.hidden}, depth "
              f"{args.depth}), batch {args.batch_size}, {args.workers} loader workers, {torch.get_num_threads()} "
              f"torch thread(s), ZeRO-2 fp32, 1 process")

        loader = trainer.loader
        for _ in range(args.warmup):
            trainer.train_step(loader.next_batch())
        cached = [loader.next_batch() for _ in range(4)]
        # The two modes alternate step by step, so that load from other jobs on a shared machine hits both alike.
        times = {"loop": 0.0, "wait": 0.0, "memory": 0.0}
        images = {"loop": 0, "memory": 0}
        for i in range(args.steps):
            start = time.perf_counter()
            batch = loader.next_batch()
            got = time.perf_counter()
            images["loop"] += trainer.train_step(batch)["images"]
            done = time.perf_counter()
            times["loop"] += done - start
            times["wait"] += got - start
            images["memory"] += trainer.train_step(cached[i % len(cached)])["images"]
            times["memory"] += time.perf_counter() - done
        in_loop, in_memory = images["loop"] / times["loop"], images["memory"] / times["memory"]

        start = time.perf_counter()
        n = sum(len(loader.next_batch()["keys"]) for _ in range(2 * args.steps))
        loader_alone = n / (time.perf_counter() - start)
        trainer.close()

    print(f"\n{'mode (' + str(args.steps) + ' steps each, alternating)':38s} {'images/s per process':>22s}")
    print(f"{'(a) loader in the loop':38s} {in_loop:22.2f}")
    print(f"{'(b) batches already in memory':38s} {in_memory:22.2f}")
    print(f"{'(c) loader alone (no training)':38s} {loader_alone:22.2f}")
    print(f"\nratio (a)/(b) = {in_loop / in_memory:.3f}  (1.0: the loader is not the bottleneck)")
    print(f"time the training loop waited for a batch: {times['wait'] / args.steps * 1e3:.1f} ms per step, "
          f"{times['wait'] / times['loop']:.1%} of the step")
    print(f"loader headroom (c)/(b) = {loader_alone / in_memory:.1f}x")


def gpu_benchmark(args) -> None:
    from training.model import forward_flops
    from training.trainer import Trainer

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("--gpu needs a CUDA device (or --allow-cpu for a smoke run of this code path)")
    batch_sizes = dict(zip(args.resolutions, args.batch_sizes))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in args.resolutions:
            for checkpointing in (False, True):
                latent = resolution // 8
                overrides = {"input_size": latent, "gradient_checkpointing": checkpointing,
                             "micro_conditions": resolution >= 512, "pe_interpolation": resolution / 512 if resolution > 512 else 1.0}
                config = _config(f"{tmp}/none", f"{tmp}/out", args.model_preset, overrides, batch_sizes[resolution],
                                 0, None, precision="bf16" if torch.cuda.is_available() else "fp32")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    trainer = Trainer(config, with_data=False)
                except torch.cuda.OutOfMemoryError:
                    rows.append((resolution, checkpointing, batch_sizes[resolution], None, None, None))
                    continue
                cfg = trainer.model_config
                B = batch_sizes[resolution]
                batch = {
                    "latent_mean": torch.randn(B, cfg.in_channels, latent, latent), "latent_std": torch.full((B, cfg.in_channels, latent, latent), 0.05),
                    "caption": torch.randn(B, cfg.caption_length, cfg.caption_channels), "caption_mask": torch.ones(B, cfg.caption_length, dtype=torch.bool),
                    "resolution": torch.full((B, 2), float(resolution)), "aspect_ratio": torch.ones(B, 1),
                }
                try:
                    for _ in range(args.warmup):
                        trainer.train_step(batch)
                    images_per_s = _timed_steps(trainer, iter([batch] * args.steps), args.steps)
                    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
                    flops = 3 * forward_flops(cfg, (latent, latent))
                    mfu = images_per_s * flops / (args.peak_tflops * 1e12)
                    rows.append((resolution, checkpointing, B, images_per_s, mfu, peak))
                except torch.cuda.OutOfMemoryError:
                    rows.append((resolution, checkpointing, B, None, None, None))
                trainer.close()
                del trainer
                gc.collect()

    print(f"\n{args.model_preset}, ZeRO-2, {'bf16' if torch.cuda.is_available() else 'fp32'}, one process; "
          f"MFU against {args.peak_tflops:g} TFLOP/s")
    print(f"{'px':>5s} {'grad ckpt':>9s} {'batch':>6s} {'images/s':>10s} {'MFU':>7s} {'peak GiB':>9s}")
    for resolution, checkpointing, B, ips, mfu, peak in rows:
        if ips is None:
            print(f"{resolution:5d} {str(checkpointing):>9s} {B:6d} {'OOM':>10s}")
        else:
            print(f"{resolution:5d} {str(checkpointing):>9s} {B:6d} {ips:10.2f} {mfu:7.1%} {peak:9.1f}")
    for resolution in args.resolutions:
        pair = [r for r in rows if r[0] == resolution and r[3] is not None]
        if len(pair) == 2 and torch.cuda.is_available():
            print(f"{resolution} px: gradient checkpointing costs {1 - pair[1][3] / pair[0][3]:.0%} of the throughput, "
                  f"saves {1 - pair[1][5] / pair[0][5]:.0%} of the peak memory")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark instead of the CPU one")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (CPU 16, GPU 10)")
    parser.add_argument("--warmup", type=int, default=2)
    # CPU mode
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    # GPU mode
    parser.add_argument("--model-preset", default="PixArt-XL/2")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 16, 4], help="one per resolution")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpu and len(args.batch_sizes) != len(args.resolutions):
        parser.error("--batch-sizes: give one per resolution")
    args.steps = args.steps or (10 if args.gpu else 16)
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {os.cpu_count()} CPU cores, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}")
    (gpu_benchmark if args.gpu else cpu_benchmark)(args)


if __name__ == "__main__":
    main()
