"""`make bench`: run every benchmarks/bench_*.py (or those named with --only) and print their side-by-side ratios.

Each benchmark module exposes `main(argv=None)`; it prints its own table. Figures, machine and command are
recorded in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="benchmark names, e.g. model curation (default: all)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    chosen = args.only or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
    import os

    print(f"machine: {platform.machine()} {platform.processor() or ''} cores={os.cpu_count()} python={platform.python_version()}")
    failed = []
    for name in chosen:
        print(f"\n=== bench_{name} ===", flush=True)
        spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"bench_{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        start = time.perf_counter()
        try:
            module.main([])
        except Exception as err:  # one broken benchmark must not hide the others' figures
            failed.append(name)
            print(f"bench_{name} failed: {err.__class__.__name__}: {err}")
        print(f"(bench_{name} took {time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
