"""Recaption throughput: images/s and generated tokens/s of a captioner backend at several batch sizes, side by side.

Every image generates exactly --max-new-tokens tokens (min_new_tokens = max_new_tokens, no retries), so the figures
compare batching, not how long a model happens to talk. Batch sizes are timed in alternating rounds over the same
real photos (a noisy neighbour on a shared machine slows all of them alike); each figure is the median over rounds,
and the ratios are against the first batch size.

    python benchmarks/bench_recaption.py                                  # tiny random-init LLaVA, CPU, batch 1 2 4 8
    python benchmarks/bench_recaption.py --preset small --batch-sizes 1 4
    python benchmarks/bench_recaption.py --gpu                            # llava-1.5-7b shapes, random init, bf16, CUDA
    python benchmarks/bench_recaption.py --model llava-hf/llava-1.5-7b-hf --device cuda --batch-sizes 1 8 32
    python benchmarks/bench_recaption.py --backend vllm --preset tiny     # needs pip install '.[vllm]' and a GPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.captioners import build_captioner  # noqa: E402
from curation.captioners.config import CaptionerSettings  # noqa: E402
from curation.captioners.llava_transformers import (LlavaTransformersCaptioner, resolve_device,  # noqa: E402
                                                    resolve_dtype)
from tests.llava_fixtures import PRESETS, random_llava, save_random_llava  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "photos"


def load_images(count: int, max_side: int) -> list[Image.Image]:
    """`count` RGB pictures cycled from the real photo fixtures (a gradient when they are absent), shrunk as the
    recaption job ships them to its workers."""
    paths = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    pictures = []
    for i in range(count):
        if paths:
            picture = Image.open(paths[i % len(paths)]).convert("RGB")
        else:
            picture = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
        picture.thumbnail((max_side, max_side))
        pictures.append(picture)
    return pictures


def build(args, workdir: Path):
    """The captioner under test, with a fixed-length workload."""
    options = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, retries=0,
                   device=args.device, dtype=args.dtype, sampling={"temperature": 0.2, "seed": 0})
    if args.backend == "vllm":
        model = args.model or str(save_random_llava(workdir / args.preset, args.preset))
        vllm_options = {k: v for k, v in options.items() if k not in ("device", "dtype")}
        return build_captioner("vllm", model=model, engine={"max_num_seqs": max(args.batch_sizes)}, **vllm_options)
    if args.model:
        return build_captioner("transformers", model=args.model, **options)
    # A random-init model of the preset's shapes, built in place on its device: no 14 GB detour through the disk.
    settings = CaptionerSettings(model=f"random-init:{args.preset}", **options)
    device = resolve_device(args.device)
    model, processor = random_llava(args.preset, dtype=resolve_dtype(args.dtype, device), device=device)
    return LlavaTransformersCaptioner(settings, model=model, processor=processor)


def time_batches(captioner, images: list[Image.Image], batch_size: int) -> tuple[float, int]:
    """(seconds, tokens generated) to caption `images` in batches of `batch_size`."""
    tokens_before = captioner.tokens_generated
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        captioner(chunk, [None] * len(chunk), [{}] * len(chunk))
    return time.perf_counter() - start, captioner.tokens_generated - tokens_before


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--model", help="hub id or local folder; default: a random-init model of --preset")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="shapes of the random-init model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per image (exactly)")
    parser.add_argument("--images", type=int, default=None, help="images per round (default: 2 x largest batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-side", type=int, default=1024, help="images shrunk to this, as the job does")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (a tiny model on a shared machine is fastest with 1)")
    parser.add_argument("--gpu", action="store_true",
                        help="GPU mode: llava-1.5-7b shapes (random init), bfloat16, CUDA, batch 1 4 16 32, 128 tokens")
    args = parser.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device")
        args.preset, args.dtype, args.device = "llava-1.5-7b", "bfloat16", "cuda"
        if args.batch_sizes == parser.get_default("batch_sizes"):
            args.batch_sizes = [1, 4, 16, 32]
        if args.max_new_tokens == parser.get_default("max_new_tokens"):
            args.max_new_tokens = 128
    torch.set_num_threads(args.threads)
    count = args.images or 2 * max(args.batch_sizes)
    images = load_images(count, args.max_side)

    with tempfile.TemporaryDirectory() as workdir:
        captioner = build(args, Path(workdir))
        time_batches(captioner, images[: min(args.batch_sizes)], min(args.batch_sizes))  # warm-up (allocations, kernels)
        seconds: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
        tokens: dict[int, list[int]] = {b: [] for b in args.batch_sizes}
        for _ in range(args.rounds):
            for batch_size in args.batch_sizes:
                took, generated = time_batches(captioner, images, batch_size)
                seconds[batch_size].append(took)
                tokens[batch_size].append(generated)

    what = args.model or f"random-init {args.preset}"
    device = getattr(captioner, "device", "vllm")
    dtype = getattr(captioner, "dtype", "")
    print(f"recaption throughput: {args.backend} backend, {what}, {device} {str(dtype).removeprefix('torch.')}, "
          f"{count} images x {args.max_new_tokens} tokens per batch size, median of {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'batch':>6} {'images/s':>10} {'tokens/s':>10} {'vs batch ' + str(args.batch_sizes[0]):>12}")
    results = {}
    for batch_size in args.batch_sizes:
        median = statistics.median(seconds[batch_size])
        assert all(t == count * args.max_new_tokens for t in tokens[batch_size]), "a fixed token count per image"
        results[batch_size] = {"images_per_s": count / median, "tokens_per_s": count * args.max_new_tokens / median}
    base = results[args.batch_sizes[0]]["images_per_s"]
    for batch_size, r in results.items():
        print(f"{batch_size:>6} {r['images_per_s']:>10.2f} {r['tokens_per_s']:>10.1f} {r['images_per_s'] / base:>11.2f}x")
    return results


if __name__ == "__main__":
    main()
