"""Training-step time of one model in variants, side by side: eager against torch.compile, foreach against fused
AdamW, and with TREAD token routing (training.compute, training.model.TokenRouting).

One step = forward at rectified-flow times, velocity MSE, backward, AdamW (training.flow's loss, as the trainer
runs it). Variants are timed in alternating rounds (load from other jobs hits each alike); the figure is the median
of per-round ratios to the first variant (eager, foreach, no routing), in wall time and in this process's CPU time.

    python benchmarks/bench_compile.py                      # the demo's model and batch on CPU (fp32)
    python benchmarks/bench_compile.py --device cuda --dtype bf16 --preset PixArt-XL/2 --resolution 512 --batch 32

On a GPU it reports images/s and MFU for every variant:

    MFU = images/s x 3 x F / peak FLOP/s,   F = training.model.forward_flops(config, latent, caption tokens)

the analytic matmul FLOPs of one forward per image (backward = 2x forward), with TREAD's routed blocks counted at
the tokens they actually see (routed_forward_flops below); --peak-tflops is the device's dense bf16 peak (989 for
an H100/H200 SXM).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.flow import RectifiedFlow  # noqa: E402
from training.model import PRESETS, PixArt, PixArtConfig, TokenRouting, forward_flops  # noqa: E402

DEMO = dict(input_size=16, patch_size=2, hidden_size=144, depth=4, num_heads=4, caption_channels=64,
            caption_length=32)


def routed_forward_flops(cfg: PixArtConfig, latent_hw: tuple[int, int], caption_tokens: int,
                         routing: TokenRouting | None) -> float:
    """forward_flops with the routed blocks (start..end-1) counted at the tokens that stay in them."""
    full = forward_flops(cfg, latent_hw, caption_tokens)
    if routing is None:
        return full
    n = (latent_hw[0] // cfg.patch_size) * (latent_hw[1] // cfg.patch_size)
    stay = n - int(n * routing.rate)

    def block(tokens: int) -> float:
        """One block at `tokens` tokens: a depth-2 model less a depth-1 one (the one-off parts cancel)."""
        hw = (cfg.patch_size, tokens * cfg.patch_size)  # 1 x tokens patches
        return (forward_flops(dataclasses.replace(cfg, depth=2), hw, caption_tokens)
                - forward_flops(dataclasses.replace(cfg, depth=1), hw, caption_tokens))

    return full - (routing.end - routing.start) * (block(n) - block(stay))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="a training.model preset (default: the demo's model)")
    parser.add_argument("--resolution", type=int, default=64, help="pixels (latent = resolution / 8, or / 4 for "
                        "the demo's codec)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="steps per variant before timing (compilation)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--variants", default="eager,compiled,fused,tread,compiled+fused+tread",
                        help="comma-separated: eager, compiled, fused, tread and '+' combinations")
    parser.add_argument("--routing", default="0.5,1,3", help="TREAD rate,start,end for the tread variants")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (GPU only)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.dtype == "bf16" else None

    if args.preset:
        cfg = dataclasses.replace(PRESETS[args.preset], input_size=args.resolution // 8, caption_dropout=0.0)
    else:
        cfg = PixArtConfig(**DEMO, caption_dropout=0.0)
        cfg = dataclasses.replace(cfg, input_size=args.resolution // 4)
    rate, start, end = args.routing.split(",")
    routing = TokenRouting(float(rate), int(start), min(int(end), cfg.depth))
    latent = cfg.input_size
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, cfg.in_channels, latent, latent, generator=g).to(device)
    caption = torch.randn(args.batch, cfg.caption_length, cfg.caption_channels, generator=g).to(device)
    mask = torch.ones(args.batch, cfg.caption_length, dtype=torch.bool, device=device)
    flow = RectifiedFlow(shift=1.0, patch_size=cfg.patch_size)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    steps, flops = {}, {}
    for name in variants:
        parts = set(name.split("+"))
        unknown = parts - {"eager", "compiled", "fused", "tread"}
        if unknown:
            parser.error(f"--variants: unknown part(s) {sorted(unknown)}")
        torch.manual_seed(0)
        model = PixArt(cfg).to(device).train()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.routing = routing if "tread" in parts else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused="fused" in parts,
                                      foreach=None if "fused" in parts else True)
        if "compiled" in parts:
            model.compile()
        flops[name] = 3 * routed_forward_flops(cfg, (latent, latent), cfg.caption_length, model.routing)

        def step(model=model, optimizer=optimizer) -> float:
            t = flow.sample_timesteps(args.batch, device, generator=torch.Generator(device).manual_seed(1))
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = flow.training_losses(lambda x, ts: model(x, ts, caption, mask), x0, t)["loss"].mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()  # a host sync: the timing covers the whole step on GPU

        compile_start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        steps[name] = step
        print(f"{name}: warm-up ({args.warmup} steps, compilation included) {time.perf_counter() - compile_start:.1f} s",
              flush=True)

    wall = {n: [] for n in steps}
    cpu = {n: [] for n in steps}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for r in range(args.rounds):
        for name in (variants if r % 2 == 0 else variants[::-1]):
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    base = variants[0]
    print(f"config: {args.preset or 'demo model'} {latent}x{latent} latents, {cfg.hidden_size} wide, depth "
          f"{cfg.depth}, batch {args.batch}, {args.device} {args.dtype}, threads {torch.get_num_threads()}, "
          f"rounds {args.rounds}; TREAD {routing}")
    header = f"{'variant':<24} {'wall s/step':>11} {'CPU s/step':>11} {'wall x ' + base:>14} {'CPU x ' + base:>13}"
    if device.type == "cuda":
        header += f" {'images/s':>9} {'MFU':>6}"
    print(header)
    results = {}
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        rw = statistics.median(a / b for a, b in zip(wall[name], wall[base]))
        rc = statistics.median(a / b for a, b in zip(cpu[name], cpu[base]))
        line = f"{name:<24} {w:>11.3f} {c:>11.3f} {rw:>14.3f} {rc:>13.3f}"
        results[name] = {"wall_s": w, "cpu_s": c, "wall_ratio": rw, "cpu_ratio": rc}
        if device.type == "cuda":
            images = args.batch / w
            mfu = images * flops[name] / (args.peak_tflops * 1e12)
            line += f" {images:>9.1f} {mfu:>6.1%}"
            results[name].update(images_per_s=images, mfu=mfu)
        print(line)
    return results


if __name__ == "__main__":
    main()
