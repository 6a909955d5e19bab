"""`make demo-race`: the demo's stage 2 trained with four recipes side by side, measured by the held-out evaluator.

    python -m demo.race --out outputs/demo-race [--config demo/configs/race.yaml] [--quick] [--set field=value ...]

The demo's data, stage-1 model, stage-2 model, batch and seeds (demo/configs/demo.yaml and train_stage2.yaml); only
the sections a recipe names (`diffusion`, `routing`) replace the stage-2 YAML's. Each recipe trains the same number
of steps, writes its weights every `eval_every` steps, and every one of those is sampled and graded on the demo's
held-out prompts and seeds (demo.run.evaluate). Reported per recipe:

- training compute: process CPU-seconds of the training steps (time.process_time around each optimizer step, so
  neither checkpoint writing nor evaluation counts; the data loader's worker process is not counted either, and is
  the same work for every recipe). CPU time rather than wall time, so other jobs sharing the cores distort it less
  (they still do a little, through caches and threads waiting on each other); wall seconds are reported beside it;
- steps and CPU-seconds to first reach all of the demo's targets (colour, shape and position accuracy);
- the accuracies at equal compute: each recipe's last evaluation within the compute of the cheapest run;
- a plot of accuracy against compute (<out>/race.png) and everything in <out>/race.json.

Steps 1-2 of the demo (synthesize, curate the SA-1B and ImageNet layouts) and stage 1 run first, or are reused when
<out> already holds them; a recipe whose run already finished is read back, one cut short resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from common.config import ConfigError, StrictModel, load_config, parse_overrides, validate_config
from demo.run import (DEFAULT_CONFIG, _merge, _table, effective_config, load_demo_config, reroot, write_json)

DEFAULT_RACE = "demo/configs/race.yaml"
COMPUTE_LOG = "compute.jsonl"


class Recipe(StrictModel):
    label: str
    # Sections of the stage-2 trainer YAML replaced whole (e.g. diffusion, routing).
    sections: dict[str, dict[str, Any]] = Field(default_factory=dict)


class RaceConfig(StrictModel):
    demo: str = DEFAULT_CONFIG  # data, models, stage-1 and stage-2 YAMLs, evaluation settings and targets
    steps: int = Field(900, ge=1)
    eval_every: int = Field(100, ge=1)
    reference: str = "b_demo_v"  # the recipe the others' compute is compared with
    recipes: dict[str, Recipe]
    overrides: list[str] = Field(default_factory=list, description="section.field=value for every recipe's trainer")
    quick: dict[str, Any] = Field(default_factory=dict, description="laid over this config by --quick")


# ---- preparation: the demo's data and stage 1 ---------------------------------------------------------------------
def prepare(demo, out: Path) -> Path:
    """Synthesize, curate (the SA-1B and ImageNet layouts) and train stage 1, each skipped when its output exists.
    Returns the stage-1 weights."""
    from curation.shard_format import CARD_FILE
    from demo.run import synthesize, train_stage
    from pipelines.curate import CurateConfig, run

    if not (out / "models" / "codec").is_dir() or not (out / "sources").is_dir():
        synthesize(demo, out)
    for name in ("imagenet", "sa1b"):
        path = effective_config(demo.curation.jobs[name], out, f"curate_{name}.yaml")
        job = load_config(path, CurateConfig, demo.curation.overrides)
        if not (Path(job.output) / CARD_FILE).is_file():
            print(f"    {name}: python -m pipelines.curate --config {path}", flush=True)
            run(job)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    [stage1] = train_stage(1, demo.training.stage1, out, demo.training.overrides)
    return Path(stage1.weights)


# ---- one recipe ---------------------------------------------------------------------------------------------------
def recipe_config(demo, race: RaceConfig, name: str, out: Path):
    """The stage-2 trainer config of a recipe: the demo's stage-2 YAML with the recipe's sections replaced,
    evaluation checkpoints every `eval_every` steps, written to <out>/configs/race_<name>.yaml."""
    from common.durable import atomic_write_bytes
    from training.train_config import TrainConfig

    template = Path(demo.training.stage2)
    data = reroot(yaml.safe_load(template.read_text()), out)
    data.update(race.recipes[name].sections)
    run_dir = out / "race" / name
    data = _merge(data, {"run": {"output_dir": str(run_dir), "steps": race.steps, "checkpoint_every": race.eval_every,
                                 "keep_last": race.steps // race.eval_every + 1},
                         "sampling": {"every": 0}})
    data = _merge(data, parse_overrides(demo.training.overrides + race.overrides))
    path = out / "configs" / f"race_{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (f"# written by demo.race from {template} and recipe {name}\n"
                              + yaml.safe_dump(data, sort_keys=False)).encode())
    return path, validate_config(data, TrainConfig, str(path))


def timed_trainer(config):
    """The trainer, counting the process CPU-seconds and wall seconds of its optimizer steps; at every checkpoint
    it appends {step, cpu_s, wall_s} to <run>/compute.jsonl (so a resumed run continues the count)."""
    from common.durable import atomic_write_bytes
    from training.trainer import Trainer

    class TimedTrainer(Trainer):
        def __init__(self, config):
            super().__init__(config)
            log_file = self.out / COMPUTE_LOG
            rows = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
            rows = [r for r in rows if r["step"] <= self.state.step]  # a checkpoint later than the log's is lost
            self.compute_rows = rows
            self.cpu_s = rows[-1]["cpu_s"] if rows else 0.0
            self.wall_s = rows[-1]["wall_s"] if rows else 0.0

        def train_step(self, batch: dict) -> dict:
            cpu, wall = time.process_time(), time.perf_counter()
            out = super().train_step(batch)
            self.cpu_s += time.process_time() - cpu
            self.wall_s += time.perf_counter() - wall
            return out

        def save(self, final_weights: bool = False):
            path = super().save(final_weights)
            if self.is_main:
                self.compute_rows.append({"step": self.state.step, "cpu_s": round(self.cpu_s, 3),
                                          "wall_s": round(self.wall_s, 3)})
                atomic_write_bytes(self.out / COMPUTE_LOG,
                                   "".join(json.dumps(r) + "\n" for r in self.compute_rows).encode())
            return path

    return TimedTrainer(config)


def weights_at(run_dir: Path, step: int, last: int) -> Path:
    """The weights folder the trainer wrote at `step` (the final one at the last step)."""
    return run_dir / "final" if step == last else run_dir / "weights" / f"step_{step:08d}"


def run_recipe(demo, race: RaceConfig, name: str, out: Path) -> dict:
    """Train one recipe (or read back a finished run) and evaluate every checkpoint; returns its curve."""
    from demo.run import evaluate

    path, config = recipe_config(demo, race, name, out)
    run_dir = Path(config.run.output_dir)
    print(f"    {name} ({race.recipes[name].label}): {config.run.steps} steps, config {path}", flush=True)
    trainer = timed_trainer(config)
    trainer.fit()
    rows = trainer.compute_rows
    del trainer
    curve_file = run_dir / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.is_file() else []
    done = {point["step"] for point in curve}
    for row in rows:
        if row["step"] in done:
            continue
        weights = weights_at(run_dir, row["step"], config.run.steps)
        result = evaluate(demo, out, weights, run_dir / "samples" / f"step_{row['step']:08d}",
                          f"{name} at step {row['step']}")
        curve.append({**row, **{k: result["accuracy"][k] for k in ("colour", "shape", "position", "all")}})
        write_json(curve_file, curve)  # rewritten whole after each evaluation: an interrupted race keeps them
    return {"label": race.recipes[name].label, "config": str(path), "curve": sorted(curve, key=lambda p: p["step"])}


# ---- the comparison -----------------------------------------------------------------------------------------------
def reaches(point: dict, targets: dict[str, float]) -> bool:
    return all(point[k] >= v for k, v in targets.items())


def first_reaching(curve: list[dict], targets: dict[str, float]) -> dict | None:
    """The first evaluation (in step order) at which every target is met."""
    return next((p for p in sorted(curve, key=lambda p: p["step"]) if reaches(p, targets)), None)


def at_compute(curve: list[dict], cpu_s: float) -> dict | None:
    """The last evaluation whose training compute is within `cpu_s`."""
    within = [p for p in curve if p["cpu_s"] <= cpu_s + 1e-9]
    return max(within, key=lambda p: p["step"]) if within else None


def summarize(results: dict[str, dict], targets: dict[str, float], reference: str) -> dict:
    """Steps and compute to the targets, accuracies at equal compute, and the ratio of compute to the reference's."""
    equal = min(r["curve"][-1]["cpu_s"] for r in results.values())
    ref = first_reaching(results[reference]["curve"], targets) if reference in results else None
    rows = {}
    for name, r in results.items():
        hit = first_reaching(r["curve"], targets)
        same = at_compute(r["curve"], equal)
        rows[name] = {
            "label": r["label"], "steps_to_targets": hit and hit["step"], "cpu_s_to_targets": hit and hit["cpu_s"],
            "compute_vs_reference": (hit["cpu_s"] / ref["cpu_s"]) if hit and ref else None,
            "cpu_s_per_step": r["curve"][-1]["cpu_s"] / r["curve"][-1]["step"],
            "final": {k: r["curve"][-1][k] for k in ("step", "cpu_s", "wall_s", "colour", "shape", "position")},
            "at_equal_compute": same and {k: same[k] for k in ("step", "cpu_s", "colour", "shape", "position")},
        }
    return {"equal_compute_cpu_s": equal, "reference": reference, "targets": targets, "recipes": rows}


def print_table(summary: dict, steps: int) -> str:
    rows = []
    for name, r in summary["recipes"].items():
        same = r["at_equal_compute"] or {}
        rows.append([r["label"], r["steps_to_targets"] or f"> {steps}",
                     f"{r['cpu_s_to_targets']:.0f}" if r["cpu_s_to_targets"] else "-",
                     f"{r['compute_vs_reference']:.2f}" if r["compute_vs_reference"] else "-",
                     f"{r['cpu_s_per_step']:.2f}", same.get("colour", "-"), same.get("shape", "-"),
                     same.get("position", "-")])
    table = _table(rows, ["recipe", "steps to targets", "CPU-s to targets", "x reference", "CPU-s/step",
                          "colour @ equal", "shape @ equal", "position @ equal"])
    print(table)
    print(f"    equal compute: {summary['equal_compute_cpu_s']:.0f} CPU-s (the cheapest run's total); targets "
          + ", ".join(f"{k} >= {v}" for k, v in summary["targets"].items()))
    return table


def plot(results: dict[str, dict], targets: dict[str, float], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4), dpi=110)
    axes = fig.subplots(1, 3, sharey=True)
    for ax, attribute in zip(axes, ("colour", "shape", "position")):
        for name, r in results.items():
            ax.plot([p["cpu_s"] for p in r["curve"]], [p[attribute] for p in r["curve"]], marker="o", markersize=3,
                    label=r["label"])
        ax.axhline(targets[attribute], color="grey", linestyle=":")
        ax.set_title(f"held-out {attribute} (target {targets[attribute]:.2f})")
        ax.set_xlabel("training CPU-seconds")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


# ---- the whole race -----------------------------------------------------------------------------------------------
def load_race_config(path: str | Path = DEFAULT_RACE, quick: bool = False,
                     overrides: list[str] | None = None) -> RaceConfig:
    race = load_config(path, RaceConfig, overrides)
    if quick:
        race = validate_config(_merge(race.model_dump(), race.quick), RaceConfig, f"{path} (quick)")
    return race


def run_race(race: RaceConfig, out: str | Path, quick: bool = False) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = load_demo_config(race.demo, quick)
    started_cpu, started = time.process_time(), time.perf_counter()
    print(f"==> preparing the demo's data and stage 1 under {out}", flush=True)
    prepare(demo, out)
    results = {}
    for name in race.recipes:
        print(f"\n==> recipe {name}: {race.recipes[name].label}", flush=True)
        results[name] = run_recipe(demo, race, name, out)
    targets = demo.evaluation.targets
    summary = summarize(results, targets, race.reference)
    print()
    summary["table"] = print_table(summary, race.steps)
    plot(results, targets, out / "race.png")
    load = os.getloadavg()
    summary.update(curves={n: r["curve"] for n, r in results.items()}, configs={n: r["config"] for n, r in results.items()},
                   plot=str(out / "race.png"), wall_s=round(time.perf_counter() - started, 1),
                   process_cpu_s=round(time.process_time() - started_cpu, 1),
                   load_average_at_end=[round(v, 2) for v in load], cores=os.cpu_count())
    write_json(out / "race.json", summary)
    print(f"outputs: {out / 'race.json'}, {out / 'race.png'}; wall {summary['wall_s']:.0f} s, load average at the "
          f"end {load[0]:.1f} on {os.cpu_count()} cores")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.race", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo-race")
    parser.add_argument("--config", default=DEFAULT_RACE)
    parser.add_argument("--quick", action="store_true", help="the demo's quick data and the race's quick settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_race(load_race_config(args.config, args.quick, args.overrides), args.out, args.quick)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
