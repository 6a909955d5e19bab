"""Training-step time of our PixArt against diffusers' PixArtTransformer2DModel: same config, same weights, same batch.

One step = forward, MSE loss against a fixed target, backward, AdamW update. The two models are timed in alternating
rounds (so a noisy neighbour on a shared machine slows both alike); the figure is the median of the
per-round ratios.

    python benchmarks/bench_model.py                    # the realistic small config (CPU fp32)
    python benchmarks/bench_model.py --device cuda --dtype bf16 --depth 28 --hidden 1152 --heads 16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.checkpoint import to_diffusers  # noqa: E402
from training.model import PixArt, PixArtConfig, forward_flops  # noqa: E402


def make_batch(cfg: PixArtConfig, batch: int, latent: int, tokens: int, device: str, seed: int = 0,
               full_captions: bool = False) -> dict:
    """Latents, timesteps and T5-like caption features, right-padded: caption lengths drawn from [8, 3/4 of the
    tokens) (or every token valid with full_captions)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, max(9, tokens * 3 // 4), (batch,), generator=g)
    if full_captions:
        lengths[:] = tokens
    return dict(
        x=torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device),
        t=torch.randint(0, 1000, (batch,), generator=g).to(device),
        caption=torch.randn(batch, tokens, cfg.caption_channels, generator=g).to(device),
        mask=(torch.arange(tokens)[None] < lengths[:, None]).to(device),
        target=torch.randn(batch, cfg.out_channels, latent, latent, generator=g).to(device),
    )


def step_fn(model, optimizer, batch: dict, kind: str, amp_dtype: torch.dtype | None):
    def step() -> float:
        with torch.autocast(batch["x"].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if kind == "ours":
                out = model(batch["x"], batch["t"], batch["caption"], batch["mask"])
            else:
                out = model(batch["x"], encoder_hidden_states=batch["caption"], timestep=batch["t"],
                            encoder_attention_mask=batch["mask"],
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            loss = torch.nn.functional.mse_loss(out.float(), batch["target"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a host sync, so the timing covers the whole step on GPU too

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--caption-channels", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12, help="paired rounds: one step of each model per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--full-captions", action="store_true",
                        help="every caption token valid (no padding for our model to skip)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    torch.manual_seed(0)
    cfg = PixArtConfig(input_size=args.latent, hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
                       caption_channels=args.caption_channels, caption_length=args.tokens,
                       caption_dropout=0.0)  # diffusers has no caption dropout: keep the batches identical
    ours = PixArt(cfg)
    with torch.no_grad():  # a trained-looking model: no zero-initialised layers to make work vanish
        for p in ours.parameters():
            p.normal_(0, 0.02)
    theirs = to_diffusers(ours)
    models = {"ours": ours.to(args.device).train(), "diffusers": theirs.to(args.device).train()}
    batch = make_batch(cfg, args.batch, args.latent, args.tokens, args.device, full_captions=args.full_captions)
    steps = {name: step_fn(m, torch.optim.AdamW(m.parameters(), lr=1e-4), batch, name, amp) for name, m in models.items()}

    losses = {name: [s() for _ in range(args.warmup)][0] for name, s in steps.items()}
    # Paired timing: each round times one step of each model back to back (order alternating), so load from other
    # jobs on a shared machine hits both alike; the median of the per-round ratios is the figure we report. Besides
    # wall time we record this process's CPU time, which other jobs' load disturbs far less.
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    def paired(times: dict[str, list[float]]) -> float:
        return statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"]))

    flops = 3 * forward_flops(cfg, (args.latent, args.latent), args.tokens) * args.batch
    print(f"config: depth={args.depth} hidden={args.hidden} heads={args.heads} latent={args.latent}x{args.latent} "
          f"tokens={args.tokens} caption_channels={args.caption_channels} batch={args.batch} device={args.device} "
          f"dtype={args.dtype} threads={torch.get_num_threads()} rounds={args.rounds}")
    lengths = batch["mask"].sum(1).tolist()
    print(f"caption lengths (valid of {args.tokens}): {lengths}")
    print(f"first-step loss (same weights, same batch): ours {losses['ours']:.6f}  diffusers {losses['diffusers']:.6f}")
    print(f"{'model':<10} {'wall s/step (median)':>21} {'min':>7} {'max':>7} {'CPU s/step':>11} {'GFLOP/s wall':>13}")
    for name in steps:
        med = statistics.median(wall[name])
        print(f"{name:<10} {med:>21.3f} {min(wall[name]):>7.3f} {max(wall[name]):>7.3f} "
              f"{statistics.median(cpu[name]):>11.3f} {flops / med / 1e9:>13.1f}")
    ratio, cpu_ratio = paired(wall), paired(cpu)
    print(f"ratio ours/diffusers, median of paired rounds: wall {ratio:.3f}, CPU time {cpu_ratio:.3f} "
          f"(analytic {flops / 1e9:.1f} GFLOP per step)")
    return {"ratio": ratio, "cpu_ratio": cpu_ratio, "gflop_per_step": flops / 1e9}


if __name__ == "__main__":
    main()
