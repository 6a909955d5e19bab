"""Sampling: one batched guided forward against two separate passes, and DPM-Solver++ 20 steps against IDDPM 100.

Measured side by side in alternating rounds (a noisy neighbour on a shared machine slows both alike); figures are
medians. The accuracy columns use a model whose exact eps is known (data ~ N(0.7, 0.5^2) per element): DPM-Solver++
is compared per sample with the exact probability-flow ODE solution, IDDPM (with the exact reverse variance as its
learned-range output) by the standard deviation of what it draws.

    python benchmarks/bench_sampling.py                      # small PixArt, CPU fp32
    python benchmarks/bench_sampling.py --device cuda --depth 28 --hidden 1152 --heads 16 --latent 64
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.diffusion import GaussianDiffusion  # noqa: E402
from training.model import PixArt, PixArtConfig  # noqa: E402
from training.sampling import GuidedDenoiser, sample  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(fns: dict, rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def analytic_accuracy(mu: float = 0.7, s: float = 0.5) -> dict[str, float]:
    abar_all = GaussianDiffusion().alphas_cumprod

    def eps(x, t, a):
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    def dpm_model(x, t, **_):
        return eps(x, t, abar_all[t.long()].float().reshape(-1, 1, 1, 1))

    noise = torch.randn(32, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a_T = abar_all[-1].item()
    exact = mu + s * (noise - math.sqrt(a_T) * mu) / math.sqrt(a_T * s * s + 1 - a_T)
    dpm = sample(dpm_model, (16, 16), noise=noise, latent_channels=4, sampler="dpm++", steps=20, guidance_scale=1.0)

    respaced = GaussianDiffusion.respaced(100)
    index = {int(t): i for i, t in enumerate(respaced.timestep_map)}
    abar, post = respaced.alphas_cumprod, respaced.posterior_variance
    lo, hi = respaced.posterior_log_variance_clipped, respaced.log_betas
    c1 = respaced.posterior_mean_coef1

    def iddpm_model(x, t, **_):
        k = torch.tensor([index[int(v)] for v in t])
        a = abar[k].float().reshape(-1, 1, 1, 1)
        variance = post[k] + c1[k] ** 2 * s * s * (1 - abar[k]) / (abar[k] * s * s + 1 - abar[k])
        v = (2 * (variance.log() - lo[k]) / (hi[k] - lo[k]) - 1).float().reshape(-1, 1, 1, 1)
        return torch.cat([eps(x, t, a), v.expand_as(x)], dim=1)

    iddpm = sample(iddpm_model, (16, 16), batch_size=32, latent_channels=4, sampler="iddpm", guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(1))
    return {"dpm_max_err": (dpm - exact).abs().max().item(), "dpm_std": dpm.std().item(),
            "iddpm_std": iddpm.std().item(), "iddpm_mean": iddpm.mean().item(), "target_std": s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--latent", type=int, default=16, help="latent side (16 = 128 px, 32 = 256 px)")
    parser.add_argument("--batch", type=int, default=2, help="images per sampling call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU may be shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = PixArtConfig(input_size=args.latent, hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
                       caption_channels=4096, caption_length=120)
    torch.manual_seed(0)
    model = PixArt(cfg).eval().to(args.device)
    g = torch.Generator().manual_seed(0)
    B = args.batch
    caption = torch.randn(B, 120, 4096, generator=g).to(args.device)
    mask = (torch.arange(120)[None] < torch.tensor([[20], [60]]).repeat(B // 2 + 1, 1)[:B]).to(args.device)
    x = torch.randn(B, 4, args.latent, args.latent, generator=g).to(args.device)
    t = torch.full((B,), 500, device=args.device)
    cond = {"caption": caption, "caption_mask": mask}
    batched = GuidedDenoiser(model, cond, 4.5)
    drop = torch.ones(B, dtype=torch.bool, device=args.device)

    @torch.no_grad()
    def two_passes():
        c = model(x, t, **cond)
        u = model(x, t, force_drop_ids=drop, **cond)
        return torch.cat([u[:, :4] + 4.5 * (c[:, :4] - u[:, :4]), c[:, 4:]], 1)

    step = alternate({"batched": torch.no_grad()(lambda: batched(x, t)), "two_passes": two_passes},
                     args.rounds * 4, args.device)

    def run(sampler: str, steps: int):
        return lambda: sample(model, (args.latent, args.latent), caption=caption, caption_mask=mask, sampler=sampler,
                              steps=steps, guidance_scale=4.5, generator=torch.Generator().manual_seed(0))

    full = alternate({"dpm++20": run("dpm++", 20), "iddpm100": run("iddpm", 100)}, max(1, args.rounds // 2),
                     args.device)
    acc = analytic_accuracy()

    print(f"model: depth={args.depth} hidden={args.hidden} latent={args.latent}x{args.latent} batch={B} "
          f"device={args.device} threads={torch.get_num_threads()}")
    print(f"guided step, one batched forward : {step['batched'] * 1e3:8.1f} ms")
    print(f"guided step, two separate passes : {step['two_passes'] * 1e3:8.1f} ms   "
          f"ratio two/batched = {step['two_passes'] / step['batched']:.2f}x")
    print(f"sample, DPM-Solver++ 20 steps    : {full['dpm++20']:8.2f} s")
    print(f"sample, IDDPM 100 steps          : {full['iddpm100']:8.2f} s   "
          f"ratio iddpm/dpm++ = {full['iddpm100'] / full['dpm++20']:.2f}x")
    print(f"analytic N(0.7, 0.5^2): DPM-Solver++ 20 max |x - ODE solution| = {acc['dpm_max_err']:.3f}, "
          f"std {acc['dpm_std']:.3f}; IDDPM 100 std {acc['iddpm_std']:.3f}, mean {acc['iddpm_mean']:.3f} "
          f"(target std {acc['target_std']})")
    return {"step": step, "sample": full, "accuracy": acc}


if __name__ == "__main__":
    main()
