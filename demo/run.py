"""`make demo`: the whole system end to end on an embedded synthetic dataset, on a CPU, and proof that it learns.

    python -m demo --out outputs/demo [--quick] [--ablation] [--config demo/configs/demo.yaml]
                             [--set section.field=value ...]

1. synthesize  procedural scenes (coloured shapes at named positions) written in the real source layouts: an
               SA-1B tar set, a JourneyDB archive + annotation JSONL, ImageNet-style class folders, a few bad files
               among them; plus the demo's weight-free latent codec and a small random T5 (curation.synthetic,
               demo.codec), saved with save_pretrained like real models.
2. curate      the real curation job (pipelines.curate) on a local Ray, once per source: filters, near-duplicate
               search, the synthetic-scene captioner (dense and sparse captions), codec latents, T5 features,
               shards. Every injected bad file must come out rejected for its reason.
3. density     the concept-density report (pipelines.density) of the sparse against the dense captions.
4. train       the real DeepSpeed trainer on CPU: stage 1 class-conditional (ImageNet layout) -> stage 2 text via
               the adaLN-single re-parameterization (SA-1B, dense captions) -> stage 3 sub-stages (JourneyDB,
               square then multi-aspect with micro-conditions).
5. evaluate    samples for held-out prompts (colour, shape and position combinations that no training picture
               shows), graded by the deterministic evaluator; a table, a grid, metrics.json.
6. ablation    (--ablation) the paper's two claims at toy scale, same compute: stage 2 on dense against sparse
               captions (attribute accuracy), and stage 2 from stage 1 against from scratch (steps to a loss).

Outputs under --out: report.html (density), samples.png (+ samples/*.png), metrics.json, checkpoint/ (the final
weights, loadable by `python -m training.sample --checkpoint <out>/checkpoint ...`); and along the way configs/
(the effective YAML of every job: rerun any of them with its own command), sources/, models/, datasets/, train/.

The YAMLs under demo/configs/ name their paths under outputs/demo, the default --out; any other --out moves them.
Everything is seeded: the same command writes the same data and trains the same model.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import Field

from common.config import ConfigError, StrictModel, load_config, validate_config
from common.durable import atomic_write_bytes, publish, publish_replacing, sweep_temp, temp_name

DEFAULT_OUT = "outputs/demo"
DEFAULT_CONFIG = "demo/configs/demo.yaml"
QUICK_CONFIG = "demo/configs/quick.yaml"


# ---- config -------------------------------------------------------------------------------------------------------
class DataSection(StrictModel):
    """The synthetic sources (demo.layouts)."""

    seed: int = 0
    image_size: int = Field(96, ge=32, description="side of the source pictures, before curation resizes them")
    sa1b: int = Field(1600, ge=3)
    sa1b_per_tar: int = Field(400, ge=1)
    journeydb: int = Field(800, ge=1)
    imagenet_per_class: int = Field(50, ge=1)
    journeydb_non_square: float = Field(0.5, ge=0, le=1, description="share of JourneyDB pictures at 4:3 or "
                                        "3:4, for the multi-aspect sub-stage")


class ModelsSection(StrictModel):
    """The stand-ins for the pretrained models a real run downloads."""

    text_encoder_width: int = Field(64, ge=8)
    text_encoder_layers: int = Field(2, ge=1)
    text_encoder_heads: int = Field(4, ge=1)
    text_encoder_output_scale: float = Field(8.0, gt=0, description="RMS of the T5 features (see "
                                             "demo.text_encoder)")
    codec_calibration_images: int = Field(256, ge=1, description="pictures the codec's gain is measured on")


class CurationSection(StrictModel):
    """Curation job YAMLs (pipelines.curate), by dataset name; each writes <out>/datasets/<name>."""

    jobs: dict[str, str] = Field(default_factory=lambda: {
        "imagenet": "demo/configs/curate_imagenet.yaml",
        "sa1b": "demo/configs/curate_sa1b.yaml",
        "sa1b_sparse": "demo/configs/curate_sa1b_sparse.yaml",
        "journeydb": "demo/configs/curate_journeydb.yaml",
    })
    overrides: list[str] = Field(default_factory=list, description="section.field=value for every job")


class TrainingSection(StrictModel):
    """Trainer YAMLs (training.trainer / training.launch), one per stage; stage 3 is a plan of sub-stages."""

    stage1: str = "demo/configs/train_stage1.yaml"
    stage2: str = "demo/configs/train_stage2.yaml"
    stage3: str = "demo/configs/train_stage3.yaml"
    overrides: list[str] = Field(default_factory=list, description="section.field=value for every sub-stage")


class EvaluationSection(StrictModel):
    samples_per_prompt: int = Field(8, ge=1)
    sampler: str = "dpm++"
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.5, ge=0)
    seed: int = 0
    use_ema: bool = True
    targets: dict[str, float] = Field(default_factory=lambda: {"colour": 0.9, "position": 0.8, "shape": 0.7})


class AblationSection(StrictModel):
    overrides: list[str] = Field(default_factory=list, description="section.field=value for the ablation's "
                                 "stage-2 runs (the main stage-2 run is their reference)")
    smoothing: int = Field(50, ge=1, description="moving-average window (steps) of the loss curves compared")


class DemoConfig(StrictModel):
    data: DataSection = Field(default_factory=DataSection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    curation: CurationSection = Field(default_factory=CurationSection)
    density: str = "demo/configs/density.yaml"
    training: TrainingSection = Field(default_factory=TrainingSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    ablation: AblationSection = Field(default_factory=AblationSection)
    resolution: int = Field(64, ge=16, description="training and sampling resolution (the curation bucket base)")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_demo_config(path: str | Path = DEFAULT_CONFIG, quick: bool = False,
                     overrides: list[str] | None = None) -> DemoConfig:
    """demo/configs/demo.yaml, with demo/configs/quick.yaml laid over it for --quick, then --set overrides."""
    if not quick:
        return load_config(path, DemoConfig, overrides)
    from common.config import parse_overrides

    data: dict = {}
    for file in (path, QUICK_CONFIG):
        if not Path(file).is_file():
            raise ConfigError(f"config file not found: {file}")
        data = _merge(data, yaml.safe_load(Path(file).read_text()) or {})
    return validate_config(_merge(data, parse_overrides(overrides)), DemoConfig, f"{path} + {QUICK_CONFIG}")


# ---- bookkeeping --------------------------------------------------------------------------------------------------
class Steps:
    """Announces each step of the demo and records its duration."""

    def __init__(self, total: int):
        self.total, self.done, self.timings = total, 0, {}

    @contextmanager
    def step(self, name: str, what: str) -> Iterator[None]:
        self.done += 1
        print(f"\n==> [{self.done}/{self.total}] {name}: {what}", flush=True)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 1)
        print(f"<== {name} done in {self.timings[name]:.1f} s", flush=True)


def reroot(tree: Any, out: Path) -> Any:
    """Every string naming a path under outputs/demo, moved under `out`."""
    if isinstance(tree, dict):
        return {key: reroot(value, out) for key, value in tree.items()}
    if isinstance(tree, list):
        return [reroot(value, out) for value in tree]
    if isinstance(tree, str) and (tree == DEFAULT_OUT or tree.startswith(DEFAULT_OUT + "/")):
        return str(out / tree[len(DEFAULT_OUT):].lstrip("/"))
    return tree


def effective_config(template: str | Path, out: Path, name: str | None = None) -> Path:
    """Write the template YAML with its paths moved under `out` to <out>/configs/, and return that file."""
    template = Path(template)
    if not template.is_file():
        raise ConfigError(f"config file not found: {template}")
    data = reroot(yaml.safe_load(template.read_text()) or {}, out)
    target = out / "configs" / (name or template.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = f"# written by demo.run from {template}\n" + yaml.safe_dump(data, sort_keys=False)
    from common.durable import atomic_write_bytes

    atomic_write_bytes(target, text.encode())
    return target


def write_json(path: Path, data: dict) -> None:
    from common.durable import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=False) + "\n").encode())


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# ---- 1. synthesize ------------------------------------------------------------------------------------------------
def synthesize(config: DemoConfig, out: Path) -> dict:
    """Sources in the real layouts, the codec and the text encoder; returns what was written."""
    import numpy as np
    import torch

    from demo.codec import PoolingCodec
    from demo.layouts import LayoutCounts, write_layouts
    from demo.scenes import SceneSampler, render
    from demo.text_encoder import save_scene_text_encoder

    d = config.data
    counts = LayoutCounts(sa1b=d.sa1b, sa1b_per_tar=d.sa1b_per_tar, journeydb=d.journeydb,
                          imagenet_per_class=d.imagenet_per_class, journeydb_non_square=d.journeydb_non_square)
    layouts = write_layouts(out / "sources", counts, size=d.image_size, seed=d.seed)
    print(f"    sources: {layouts.count('sa1b')} SA-1B, {layouts.count('journeydb')} JourneyDB, "
          f"{layouts.count('imagenet')} ImageNet pictures; bad on purpose: "
          + ", ".join(f"{r.fault} ({r.source} {r.source_id})" for r in layouts.faults()))

    m = config.models
    save_scene_text_encoder(out / "models" / "t5", width=m.text_encoder_width, layers=m.text_encoder_layers,
                            heads=m.text_encoder_heads, output_scale=m.text_encoder_output_scale, seed=d.seed)
    # The codec's gain is measured on pictures of the same kind, as an SD VAE's scaling factor was on photos.
    scenes = SceneSampler(seed=d.seed + 1).scenes(m.codec_calibration_images)
    pixels = torch.stack([torch.from_numpy(np.array(render(s, config.resolution))).permute(2, 0, 1) for s in scenes])
    codec = PoolingCodec.calibrated([pixels.float() / 127.5 - 1])
    codec.save_pretrained(out / "models" / "codec")
    print(f"    models: codec (gain {codec.config.channel_scales[0]:.3f}) -> {out / 'models' / 'codec'}, "
          f"T5 (width {m.text_encoder_width}) -> {out / 'models' / 't5'}")
    return {"layouts": layouts, "counts": {s: layouts.count(s) for s in ("sa1b", "journeydb", "imagenet")}}


# ---- 2. curate ----------------------------------------------------------------------------------------------------
def curate(config: DemoConfig, out: Path, layouts) -> dict:
    """Run every curation job; check the injected faults were rejected and the captions match the ground truth."""
    import pyarrow.parquet as pq

    from curation.shard_format import REJECTED_FILE, read_manifest
    from demo.scenes import Scene, dense_caption, sparse_caption
    from pipelines.curate import CurateConfig, run

    truth = {(r.source, r.source_id): r for r in layouts.records}
    results = {}
    for name, template in config.curation.jobs.items():
        path = effective_config(template, out, f"curate_{name}.yaml")
        job = load_config(path, CurateConfig, config.curation.overrides)
        print(f"    {name}: python -m pipelines.curate --config {path}", flush=True)
        card = run(job)
        root = Path(job.output)
        manifest = read_manifest(root).to_pylist()
        rejected = pq.read_table(root / REJECTED_FILE).to_pylist() if (root / REJECTED_FILE).is_file() else []
        counts = card["counts"]
        if counts["seen"] != counts["accepted"] + counts["rejected"]:
            raise RuntimeError(f"{name}: counts do not add up: {counts}")
        # Captions written by the synthetic captioner must say what the generator drew.
        checked = mismatched = 0
        for row in manifest:
            record = truth.get((row["source"], row["source_id"]))
            for column, describe in (("caption_dense", dense_caption), ("caption_sparse", sparse_caption)):
                if column in row and record is not None:
                    checked += 1
                    mismatched += row[column] != describe(Scene.from_dict(record.scene))
        results[name] = {"dataset": str(root), "counts": counts, "captions_checked": checked,
                         "captions_mismatched": mismatched, "rejected": rejected}
        print(f"    {name}: seen {counts['seen']} = accepted {counts['accepted']} + rejected {counts['rejected']} "
              f"{counts['rejected_by_reason']}; captions checked against ground truth: {checked}, "
              f"mismatched: {mismatched}")

    faults = []
    for record in layouts.faults():
        # A near-duplicate pair loses one member (the search keeps the smallest key): either one counts.
        ids = {record.source_id} | ({record.duplicate_of} if record.duplicate_of else set())
        hits = [(name, row) for name, result in results.items() for row in result["rejected"]
                if row["source"] == record.source and str(row["source_id"]) in ids]
        name, row = hits[0] if hits else (None, None)
        faults.append({"fault": record.fault, "source": record.source, "source_id": record.source_id,
                       "rejected": row is not None, "job": name, "stage": row and row["stage"],
                       "reason": row and row["reason"]})
    print(_table([[f["fault"], f"{f['source']} {f['source_id']}", f["job"] or "-", f["stage"] or "NOT REJECTED",
                   (f["reason"] or "")[:70]] for f in faults], ["injected fault", "file", "job", "stage", "reason"]))
    for result in results.values():
        result["rejected"] = len(result["rejected"])
    return {"jobs": results, "faults": faults}


# ---- 3. density ---------------------------------------------------------------------------------------------------
def density(config: DemoConfig, out: Path) -> dict:
    """The concept-density report; copied to <out>/report.html."""
    from pipelines.density import DensityConfig, run

    path = effective_config(config.density, out, "density.yaml")
    print(f"    python -m pipelines.density --config {path}", flush=True)
    written = run(load_config(path, DensityConfig))
    atomic_write_bytes(out / "report.html", Path(written["html"]).read_bytes())
    figures = json.loads(Path(written["json"]).read_text())
    return {"report": str(out / "report.html"), "json": str(written["json"]),
            "table1": {s["name"]: s.get("table1") for s in figures["sources"]}}


# ---- 4. train -----------------------------------------------------------------------------------------------------
def _loss_summary(result) -> dict:
    losses = result.losses
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {"steps": result.steps, "weights": str(result.weights), "first_loss": losses[0] if losses else None,
            "final_loss": sum(tail) / len(tail) if tail else None, "skipped_steps": result.skipped_steps,
            "samples_rejected": result.samples_rejected,
            "init": result.init_report and {k: result.init_report.get(k) for k in ("source", "transition")},
            "losses": [round(v, 5) for v in losses]}


def train_stage(stage: int, template: str, out: Path, overrides: list[str], name: str | None = None) -> list:
    """One stage (all its sub-stages) through the launcher's in-process path; returns the TrainResults."""
    from training.launch import plan_substages
    from training.train_config import is_stage_plan, load_stage_plan
    from training.trainer import train

    path = effective_config(template, out, name)
    if is_stage_plan(path):  # its sub-stage YAMLs go next to it, so the plan's relative names resolve
        _, files = load_stage_plan(template)
        for file in files:
            effective_config(file, out)
    print(f"    make train-stage{stage} CONFIG={path}" + "".join(f" --set {o}" for o in overrides), flush=True)
    results = []
    for sub in plan_substages(stage, path, overrides):
        print(f"    stage {stage} / {sub.config.name}: {sub.config.run.steps} steps, batch "
              f"{sub.config.data.batch_size}, data {sub.config.data.root}", flush=True)
        results.append(train(sub.config))
    return results


def train_all(config: DemoConfig, out: Path) -> dict:
    t = config.training
    runs = {}
    for stage, template in ((1, t.stage1), (2, t.stage2), (3, t.stage3)):
        for result in train_stage(stage, template, out, t.overrides):
            runs[Path(result.output_dir).name] = _loss_summary(result)
    final = Path(list(runs.values())[-1]["weights"])
    print(_table([[name, r["steps"], r["first_loss"] or float("nan"), r["final_loss"] or float("nan"),
                   (r["init"] or {}).get("transition") or "random init"] for name, r in runs.items()],
                 ["run", "steps", "first loss", "final loss (last 10%)", "initialized by"]))
    return {"runs": runs, "final_weights": str(final)}


# ---- 5. evaluate --------------------------------------------------------------------------------------------------
def evaluate(config: DemoConfig, out: Path, weights: Path, folder: Path, title: str) -> dict:
    """Held-out prompts -> samples -> grades. Writes folder/*.png and returns per-sample grades and accuracy."""
    import torch

    from common.pretrained import load_text_encoder
    from demo import evaluator
    from demo.scenes import dense_caption, held_out_scenes
    from training.flow import flow_from_config
    from training.grid import image_grid, save_png
    from training.sample import load_autoencoder
    from training.sampling import generate_images
    from training.weights import has_ema, load_model, read_pipeline_info

    e = config.evaluation
    model, used_ema = load_model(weights, ema=e.use_ema and has_ema(weights))
    # The codec, T5 and prediction type the trainer recorded, read as training.sample reads them.
    info = read_pipeline_info(weights)
    codec = load_autoencoder(info, in_channels=model.config.in_channels)
    text_encoder = load_text_encoder(info.text_encoder)
    scenes = [scene for scene in held_out_scenes() for _ in range(e.samples_per_prompt)]
    prompts = [dense_caption(scene) for scene in scenes]
    with torch.inference_mode():
        images = generate_images(model, codec, text_encoder, prompts, height=config.resolution,
                                 width=config.resolution, sampler=e.sampler, steps=e.steps,
                                 guidance_scale=e.guidance_scale, seed=e.seed, batch_size=len(prompts), progress=True,
                                 prediction_type=info.prediction_type,
                                 flow=flow_from_config(info, model.config.patch_size))
    samples, grades = [], []
    for i, (image, scene, prompt) in enumerate(zip(images, scenes, prompts)):
        file = folder / f"{i // e.samples_per_prompt:02d}_{i % e.samples_per_prompt}.png"
        save_png(image, file)
        [grade] = evaluator.score(image, scene)
        grades.append(grade)
        samples.append({"file": str(file.relative_to(out)), "prompt": prompt, "colour": grade.colour,
                        "shape": grade.shape, "position": grade.position, "size": grade.size, "found": grade.found})
    accuracy = evaluator.accuracy(grades)
    per_prompt = []
    for k in range(0, len(samples), e.samples_per_prompt):
        group = samples[k:k + e.samples_per_prompt]
        per_prompt.append([group[0]["prompt"].split(",")[0]] + [sum(s[a] for s in group) / len(group)
                                                                 for a in ("colour", "shape", "position")])
    print(f"    {title}: {len(samples)} samples of {len(per_prompt)} held-out prompts "
          f"({'EMA' if used_ema else 'model'} weights, {e.sampler} {e.steps} steps, guidance {e.guidance_scale})")
    print(_table(per_prompt + [["all held-out prompts", accuracy["colour"], accuracy["shape"], accuracy["position"]]],
                 ["prompt", "colour", "shape", "position"]))
    short = [s["prompt"].split(",")[0].removeprefix("a large ") for s in samples]
    grid = image_grid(images, cols=e.samples_per_prompt, captions=short, caption_lines=2)
    return {"weights": str(weights), "ema": used_ema, "accuracy": accuracy, "samples": samples, "grid": grid}


# ---- 6. ablation --------------------------------------------------------------------------------------------------
def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def steps_to_reach(losses: list[float], target: float, window: int) -> int | None:
    """First step (1-based) at which the moving-average loss is at or below `target`."""
    for step, value in enumerate(_smooth(losses, window), start=1):
        if step >= window and value <= target:
            return step
    return None


def ablation(config: DemoConfig, out: Path, reference: dict, dense_eval: dict) -> dict:
    """Stage 2 twice more with the main stage 2's settings and seeds: on sparse captions, and from scratch."""
    t, a = config.training, config.ablation
    sparse_root = out / "datasets" / "sa1b_sparse"
    variants = {
        "sparse": [f"data.root={sparse_root}", "data.caption=sparse", f"run.output_dir={out / 'ablation' / 'stage2_sparse'}"],
        "scratch": ["init.weights=null", "init.transition=auto", f"run.output_dir={out / 'ablation' / 'stage2_scratch'}"],
    }
    runs = {}
    for name, extra in variants.items():
        [result] = train_stage(2, t.stage2, out, t.overrides + a.overrides + extra, name=f"ablation_{name}.yaml")
        runs[name] = _loss_summary(result)

    sparse_eval = evaluate(config, out, Path(runs["sparse"]["weights"]), out / "ablation" / "samples_sparse",
                           "stage 2 on sparse captions")
    dense = dense_eval["accuracy"]
    sparse = sparse_eval["accuracy"]
    print(_table([["dense (main stage 2)", dense["colour"], dense["shape"], dense["position"], dense["all"]],
                  ["sparse", sparse["colour"], sparse["shape"], sparse["position"], sparse["all"]]],
                 ["stage 2 trained on", "colour", "shape", "position", "all three"]))

    window = min(a.smoothing, max(1, len(reference["losses"]) // 4))
    from_stage1, scratch = reference["losses"], runs["scratch"]["losses"]
    target = _smooth(scratch, window)[-1]
    reached = steps_to_reach(from_stage1, target, window)
    print(f"    loss {target:.4f} (from scratch after {len(scratch)} steps, {window}-step average) is reached from "
          f"stage 1 after {reached if reached is not None else 'more than ' + str(len(from_stage1))} steps")
    plot = out / "ablation" / "stage2_loss.png"
    _plot_losses({"stage 2 from stage 1": from_stage1, "stage 2 from scratch": scratch}, window, target, plot)
    return {
        "dense_vs_sparse": {"dense": dense, "sparse": sparse, "samples_sparse": sparse_eval["samples"],
                            "dense_wins_all": dense["all"] > sparse["all"]},
        "init_from_stage1_vs_scratch": {"target_loss": target, "window": window, "scratch_steps": len(scratch),
                                        "from_stage1_steps": reached, "plot": str(plot),
                                        "fewer_steps": reached is not None and reached < len(scratch)},
        "runs": runs,
    }


def _plot_losses(curves: dict[str, list[float]], window: int, target: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=110)
    ax = fig.subplots()
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), _smooth(losses, window), label=label)
    ax.axhline(target, color="grey", linestyle=":", label="final loss from scratch")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({window}-step average)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fig.savefig(tmp, format="png")
    publish(tmp, path)


# ---- the whole demo -----------------------------------------------------------------------------------------------
def run_demo(config: DemoConfig, out: str | Path, ablation_runs: bool = False) -> dict:
    """Run every step; returns the metrics also written to <out>/metrics.json."""
    from training.grid import save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(6 if ablation_runs else 5)
    metrics: dict[str, Any] = {"config": config.model_dump(mode="json"), "out": str(out)}
    started = time.perf_counter()

    with steps.step("synthesize", "scenes in the SA-1B, JourneyDB and ImageNet layouts; codec and T5"):
        synthetic = synthesize(config, out)
        metrics["sources"] = synthetic["counts"]
    with steps.step("curate", "filters, captions, codec latents, T5 features, shards (Ray)"):
        metrics["curation"] = curate(config, out, synthetic["layouts"])
    with steps.step("density", "concept density of sparse versus dense captions (Ray)"):
        metrics["density"] = density(config, out)
    import ray

    if ray.is_initialized():
        ray.shutdown()  # training needs the cores more than an idle Ray does
    with steps.step("train", "stage 1 (classes) -> stage 2 (text) -> stage 3 (aesthetic, multi-aspect), DeepSpeed"):
        metrics["training"] = train_all(config, out)
    with steps.step("evaluate", "held-out prompts, sampled and graded by the evaluator"):
        final = Path(metrics["training"]["final_weights"])
        result = evaluate(config, out, final, out / "samples", "final model")
        save_png(result.pop("grid"), out / "samples.png")
        sweep_temp(out, "checkpoint")  # a killed run's half copy
        copy = temp_name(out / "checkpoint")
        shutil.copytree(final, copy)
        publish_replacing(copy, out / "checkpoint")  # the previous run's stays whole until this one is synced
        targets = config.evaluation.targets
        result["targets"] = targets
        result["meets_targets"] = {k: result["accuracy"][k] >= v for k, v in targets.items()}
        metrics["evaluation"] = result
    if ablation_runs:
        with steps.step("ablation", "dense vs sparse captions; stage 2 from stage 1 vs from scratch"):
            stage2 = metrics["training"]["runs"]["stage2"]
            stage2_eval = evaluate(config, out, Path(stage2["weights"]), out / "ablation" / "samples_dense",
                                   "stage 2 on dense captions")
            stage2_eval.pop("grid")
            metrics["ablation"] = ablation(config, out, stage2, stage2_eval)

    metrics["timings_s"] = {**steps.timings, "total": round(time.perf_counter() - started, 1)}
    write_json(out / "metrics.json", metrics)
    acc = metrics["evaluation"]["accuracy"]
    print(f"\nheld-out accuracy: colour {acc['colour']:.0%}, shape {acc['shape']:.0%}, position {acc['position']:.0%} "
          f"(targets {', '.join(f'{k} {v:.0%}' for k, v in config.evaluation.targets.items())})")
    print(f"outputs: {out / 'report.html'}, {out / 'samples.png'}, {out / 'metrics.json'}, {out / 'checkpoint'}")
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in metrics["timings_s"].items()))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="demo config (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"a shortened run (lays {QUICK_CONFIG} over the config)")
    parser.add_argument("--ablation", action="store_true", help="also run the dense/sparse and init ablations")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a demo config field (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        config = load_demo_config(args.config, args.quick, args.overrides)
        run_demo(config, args.out, args.ablation)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
