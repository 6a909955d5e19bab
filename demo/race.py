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
from common.durable import publish, temp_name
from demo.run import (DEFAULT_CONFIG, _merge, _table, effective_config, load_demo_config, reroot, write_json)

DEFAULT_RACE = "demo/configs/race.yaml"
CURVE = "curve.json"


class Recipe(StrictModel):
    label: str
    # Sections of the stage-2 trainer YAML replaced whole (e.g. diffusion, routing).
    sections: dict[str, dict[str, Any]] = Field(default_factory=dict)


class RaceConfig(StrictModel):
    demo: str = DEFAULT_CONFIG  # data, models, stage-1 and stage-2 YAMLs, evaluation settings and targets
    steps: int = Field(900, ge=1)
    eval_every: int = Field(100, ge=1)
    reference: str = "b_demo_v"  # the recipe the others' compute is compared with
    parallel: int = Field(2, ge=1, description="recipes trained at once, each in its own process")
    threads: int = Field(1, ge=1, description="torch threads per recipe process (run.cpu_threads)")
    recipes: dict[str, Recipe]
    overrides: list[str] = Field(default_factory=list, description="section.field=value for every recipe's trainer")
    stage1_overrides: list[str] = Field(default_factory=list,
                                        description="section.field=value for the demo's stage 1, the recipes' init")
    quick: dict[str, Any] = Field(default_factory=dict, description="laid over this config by --quick")


# ---- preparation: the demo's data and stage 1 ---------------------------------------------------------------------
def prepare(demo, out: Path, stage1_overrides: list[str] = ()) -> Path:
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
    [stage1] = train_stage(1, demo.training.stage1, out, [*stage1_overrides, *demo.training.overrides])
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
    # The demo's overrides (e.g. --quick's batch size) first; the race's own run settings win over them.
    data = _merge(data, parse_overrides(demo.training.overrides))
    data = _merge(data, {"run": {"output_dir": str(run_dir), "steps": race.steps, "checkpoint_every": race.eval_every,
                                 "keep_last": race.steps // race.eval_every + 1, "cpu_threads": race.threads,
                                 "progress": False},
                         "sampling": {"every": 0}})
    data = _merge(data, parse_overrides(race.overrides))
    path = out / "configs" / f"race_{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (f"# written by demo.race from {template} and recipe {name}\n"
                              + yaml.safe_dump(data, sort_keys=False)).encode())
    return path, validate_config(data, TrainConfig, str(path))


def timed_trainer(config, evaluate_weights):
    """The trainer, counting the process CPU-seconds and wall seconds of its optimizer steps. At every checkpoint it
    calls evaluate_weights(weights folder, step) -> accuracies (outside the count, with the training RNG put back
    after) and appends {step, cpu_s, wall_s, accuracies} to <run>/curve.json, so a resumed run continues the count
    and an interrupted one keeps its points."""
    from training.trainer import Trainer

    class TimedTrainer(Trainer):
        def __init__(self, config):
            super().__init__(config)
            curve_file = self.out / CURVE
            curve = json.loads(curve_file.read_text()) if curve_file.is_file() else []
            self.curve = [p for p in curve if p["step"] <= self.counters.step]  # points past the checkpoint are redone
            self.cpu_s = self.curve[-1]["cpu_s"] if self.curve else 0.0
            self.wall_s = self.curve[-1]["wall_s"] if self.curve else 0.0

        def train_step(self, batch: dict) -> dict:
            cpu, wall = time.process_time(), time.perf_counter()
            out = super().train_step(batch)
            self.cpu_s += time.process_time() - cpu
            self.wall_s += time.perf_counter() - wall
            return out

        def save(self):
            path = super().save()
            step = self.counters.step
            if self.is_main and step not in {p["step"] for p in self.curve}:
                weights = self._weights_target()  # final/ at the last step, else weights/step_N
                with self._rng_untouched():
                    accuracy = evaluate_weights(weights, step)
                self.curve.append({"step": step, "cpu_s": round(self.cpu_s, 3), "wall_s": round(self.wall_s, 3),
                                   **{k: accuracy[k] for k in ("colour", "shape", "position", "all")}})
                write_json(self.out / CURVE, self.curve)
            return path

    return TimedTrainer(config)


def run_recipe(demo, race: RaceConfig, name: str, out: Path) -> dict:
    """Train one recipe, evaluating every checkpoint as it is written (a finished run is read back)."""
    from demo.run import evaluate

    path, config = recipe_config(demo, race, name, out)
    run_dir = Path(config.run.output_dir)
    print(f"    {name} ({race.recipes[name].label}): {config.run.steps} steps, config {path}", flush=True)

    def evaluate_weights(weights: Path, step: int) -> dict:
        return evaluate(demo, out, weights, run_dir / "samples" / f"step_{step:08d}",
                        f"{name} at step {step}")["accuracy"]

    timed_trainer(config, evaluate_weights).fit()
    return read_recipe(race, name, out)


def read_recipe(race: RaceConfig, name: str, out: Path) -> dict:
    """A finished recipe's curve, from <out>/race/<name>/curve.json."""
    curve = json.loads((out / "race" / name / CURVE).read_text())
    return {"label": race.recipes[name].label, "config": str(out / "configs" / f"race_{name}.yaml"),
            "curve": sorted(curve, key=lambda p: p["step"])}


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
            # The reference never reached the targets: its whole run is a lower bound of its compute to them.
            "compute_vs_reference_at_most": (hit["cpu_s"] / results[reference]["curve"][-1]["cpu_s"])
            if hit and reference in results and not ref else None,
            "cpu_s_per_step": r["curve"][-1]["cpu_s"] / r["curve"][-1]["step"],
            "final": {k: r["curve"][-1][k] for k in ("step", "cpu_s", "wall_s", "colour", "shape", "position")},
            "at_equal_compute": same and {k: same[k] for k in ("step", "cpu_s", "colour", "shape", "position")},
        }
    return {"equal_compute_cpu_s": equal, "reference": reference, "targets": targets, "recipes": rows}


def print_table(summary: dict) -> str:
    rows = []
    for name, r in summary["recipes"].items():
        same = r["at_equal_compute"] or {}
        rows.append([r["label"], r["final"]["step"], r["steps_to_targets"] or f"> {r['final']['step']}",
                     f"{r['cpu_s_to_targets']:.0f}" if r["cpu_s_to_targets"] else "-",
                     f"{r['compute_vs_reference']:.2f}" if r["compute_vs_reference"] else
                     f"< {r['compute_vs_reference_at_most']:.2f}" if r["compute_vs_reference_at_most"] else "-",
                     f"{r['cpu_s_per_step']:.2f}", same.get("colour", "-"), same.get("shape", "-"),
                     same.get("position", "-")])
    table = _table(rows, ["recipe", "steps run", "steps to targets", "CPU-s to targets", "x reference", "CPU-s/step",
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
    tmp = temp_name(path)
    fig.savefig(tmp, format="png")
    publish(tmp, path)


# ---- the whole race -----------------------------------------------------------------------------------------------
def load_race_config(path: str | Path = DEFAULT_RACE, quick: bool = False,
                     overrides: list[str] | None = None) -> RaceConfig:
    race = load_config(path, RaceConfig, overrides)
    if quick:
        race = validate_config(_merge(race.model_dump(), race.quick), RaceConfig, f"{path} (quick)")
    return race


def run_recipes(race: RaceConfig, out: Path, argv: list[str]) -> None:
    """Each recipe in a process of its own (`python -m demo.race ... --recipe NAME`), `race.parallel` at a time in
    the config's order, each with `race.threads` torch threads; its log goes to <out>/race/<name>.log."""
    import subprocess

    # Each child starts a one-process group of its own: the parent's rendezvous variables (stage 1 set them) would
    # make them all meet on one port.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(race.threads)
    pending, running, failed = list(race.recipes), {}, []
    while pending or running:
        while pending and len(running) < race.parallel:
            name = pending.pop(0)
            log_file = out / "race" / f"{name}.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            print(f"    {name} ({race.recipes[name].label}): started, log {log_file}", flush=True)
            with open(log_file, "w") as fh:
                running[name] = subprocess.Popen([sys.executable, "-m", "demo.race", *argv, "--recipe", name],
                                                 stdout=fh, stderr=subprocess.STDOUT, env=env)
        time.sleep(2)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                print(f"    {name}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}",
                      flush=True)
                if proc.returncode:
                    failed.append(name)
    if failed:
        raise RuntimeError(f"recipe(s) {', '.join(failed)} failed; see their logs under {out / 'race'}")


def run_race(race: RaceConfig, out: str | Path, quick: bool = False, argv: list[str] | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = load_demo_config(race.demo, quick)
    started_cpu, started = time.process_time(), time.perf_counter()
    print(f"==> preparing the demo's data and stage 1 under {out}", flush=True)
    prepare(demo, out, race.stage1_overrides)
    print(f"\n==> {len(race.recipes)} recipes, {race.parallel} at a time, {race.threads} thread(s) each", flush=True)
    run_recipes(race, out, argv or [])
    return report(race, out, demo.evaluation.targets, wall_s=round(time.perf_counter() - started, 1),
                  process_cpu_s=round(time.process_time() - started_cpu, 1))


def report(race: RaceConfig, out: Path, targets: dict[str, float], **extra) -> dict:
    """The table, race.png and race.json from the recipes' curves as they stand (`--report` runs only this, e.g.
    on a race still running or cut short: its curves end where the runs are)."""
    results = {name: read_recipe(race, name, out) for name in race.recipes if (out / "race" / name / CURVE).is_file()}
    if not results:
        raise ConfigError(f"--out: {out} holds no recipe curves yet ({out / 'race' / '<recipe>' / CURVE})")
    summary = summarize(results, targets, race.reference)
    print()
    summary["table"] = print_table(summary)
    plot(results, targets, out / "race.png")
    load = os.getloadavg()
    summary.update(curves={n: r["curve"] for n, r in results.items()}, configs={n: r["config"] for n, r in results.items()},
                   plot=str(out / "race.png"), steps_planned=race.steps,
                   load_average_at_end=[round(v, 2) for v in load], cores=os.cpu_count(), **extra)
    write_json(out / "race.json", summary)
    print(f"outputs: {out / 'race.json'}, {out / 'race.png'}; load average now {load[0]:.1f} on {os.cpu_count()} "
          f"cores" + (f"; wall {extra['wall_s']:.0f} s" if "wall_s" in extra else ""))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.race", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo-race")
    parser.add_argument("--config", default=DEFAULT_RACE)
    parser.add_argument("--quick", action="store_true", help="the demo's quick data and the race's quick settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--report", action="store_true", help="only summarize the curves already in --out")
    parser.add_argument("--recipe", help=argparse.SUPPRESS)  # one recipe's process (run_recipes starts them)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    child_argv = ["--out", args.out, "--config", args.config] + (["--quick"] if args.quick else []) + [
        a for o in args.overrides for a in ("--set", o)]
    try:
        race = load_race_config(args.config, args.quick, args.overrides)
        if args.report:
            report(race, Path(args.out), load_demo_config(race.demo, args.quick).evaluation.targets)
        elif args.recipe:
            if args.recipe not in race.recipes:
                raise ConfigError(f"--recipe: no recipe {args.recipe!r} in {args.config}")
            run_recipe(load_demo_config(race.demo, args.quick), race, args.recipe, Path(args.out))
        else:
            run_race(race, args.out, args.quick, child_argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
