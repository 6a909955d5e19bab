"""`make demo`, shortened: the whole chain runs from the command line, and its figures are computed, not copied.

The quick demo (demo/configs/quick.yaml) trains for a couple of steps, so its accuracies are near chance; what is
checked is that every output exists and that each reported figure equals a recomputation from the files on disk
or from the generator's ground truth.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.shard_format import read_manifest
from demo import evaluator
from demo.layouts import read_ground_truth
from demo.scenes import Scene, held_out_scenes
from common.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    # Without the rendezvous variables an in-process training test of this session may have set (training.trainer
    # sets them for its one-process group): the demo must start a process group of its own, as from a shell.
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    proc = subprocess.run([sys.executable, "-m", "demo.run", "--quick", "--ablation", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.mark.slow
def test_quick_demo_writes_every_output(quick_demo):
    out = quick_demo
    for name in ("report.html", "samples.png", "metrics.json", "checkpoint/config.json",
                 "checkpoint/model.safetensors", "checkpoint/ema.safetensors", "checkpoint/pipeline.json"):
        assert (out / name).is_file(), name
    stdout = (out / "stdout.txt").read_text()
    for step in ("synthesize", "curate", "density", "train", "evaluate", "ablation"):
        assert f"] {step}:" in stdout and f"<== {step} done in" in stdout
    # The checkpoint names the models it needs, so training.sample runs it without flags.
    pipeline = json.loads((out / "checkpoint" / "pipeline.json").read_text())
    assert pipeline["vae_class"] == "demo.codec:PoolingCodec" and Path(pipeline["vae"]).is_dir()
    assert pipeline["objective"] == "rectified_flow"  # the race's winner, demo/configs/train_stage2.yaml, 3a, 3b
    # Every stage ran, each initialized as the stage plan says.
    runs = json.loads((out / "metrics.json").read_text())["training"]["runs"]
    assert list(runs) == ["stage1", "stage2", "stage3a", "stage3b"]
    assert runs["stage1"]["init"] is None
    assert [runs[r]["init"]["transition"] for r in ("stage2", "stage3a", "stage3b")] == [
        "class_to_text", "continue", "continue"]


@pytest.mark.slow
def test_accuracies_are_a_rescoring_of_the_saved_samples(quick_demo):
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    evaluation = metrics["evaluation"]
    scenes = held_out_scenes()
    per = metrics["config"]["evaluation"]["samples_per_prompt"]
    assert len(evaluation["samples"]) == len(scenes) * per
    grades = []
    for i, sample in enumerate(evaluation["samples"]):
        with Image.open(quick_demo / sample["file"]) as image:
            [grade] = evaluator.score(image.convert("RGB"), scenes[i // per])
        grades.append(grade)
        assert (grade.colour, grade.shape, grade.position) == (sample["colour"], sample["shape"], sample["position"])
    assert evaluation["accuracy"] == evaluator.accuracy(grades)
    with Image.open(quick_demo / "samples.png") as grid:
        assert grid.width > per * metrics["config"]["resolution"]


@pytest.mark.slow
def test_ablation_figures_are_recomputed_from_its_runs(quick_demo):
    """The sparse run's accuracy re-scored from its saved samples; steps-to-loss recomputed from the two loss curves
    the metrics store; the verdicts follow from those figures."""
    from demo.run import _smooth, steps_to_reach

    metrics = json.loads((quick_demo / "metrics.json").read_text())
    ablation = metrics["ablation"]
    scenes, per = held_out_scenes(), metrics["config"]["evaluation"]["samples_per_prompt"]
    grades = []
    for i, sample in enumerate(ablation["dense_vs_sparse"]["samples_sparse"]):
        with Image.open(quick_demo / sample["file"]) as image:
            [grade] = evaluator.score(image.convert("RGB"), scenes[i // per])
        grades.append(grade)
    sparse, dense = ablation["dense_vs_sparse"]["sparse"], ablation["dense_vs_sparse"]["dense"]
    assert sparse == evaluator.accuracy(grades)
    assert ablation["dense_vs_sparse"]["dense_wins_all"] == (dense["all"] > sparse["all"])
    assert ablation["runs"]["sparse"]["init"]["transition"] == "class_to_text"
    assert ablation["runs"]["scratch"]["init"] is None

    init = ablation["init_from_stage1_vs_scratch"]
    reference, scratch = metrics["training"]["runs"]["stage2"]["losses"], ablation["runs"]["scratch"]["losses"]
    assert len(scratch) == len(reference) == init["scratch_steps"]
    assert init["target_loss"] == pytest.approx(_smooth(scratch, init["window"])[-1], rel=1e-6)
    assert init["from_stage1_steps"] == steps_to_reach(reference, init["target_loss"], init["window"])
    assert (quick_demo / "ablation" / "stage2_loss.png").is_file()


@pytest.mark.slow
def test_filters_rejected_every_injected_fault_and_counts_add_up(quick_demo):
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    expected = {"truncated": "decode", "too_small": "min_side", "extreme_aspect": "aspect_ratio",
                "near_duplicate": "near_duplicate"}
    faults = {f["fault"]: f for f in metrics["curation"]["faults"]}
    assert {name: faults[name]["stage"] for name in expected} == expected
    sidecar = read_ground_truth(quick_demo / "sources" / "ground_truth.jsonl")
    for name, job in metrics["curation"]["jobs"].items():
        root = Path(job["dataset"])
        accepted, rejected = read_manifest(root).num_rows, pq.read_table(root / "rejected.parquet").num_rows
        assert job["counts"]["accepted"] == accepted and job["counts"]["rejected"] == rejected
        source = {"imagenet": "imagenet", "journeydb": "journeydb"}.get(name, "sa1b")
        assert accepted + rejected == sum(r.source == source for r in sidecar), name
        assert job["captions_mismatched"] == 0


@pytest.mark.slow
def test_density_report_counts_match_a_recount_from_ground_truth(quick_demo):
    """Sparse captions name each object's shape once: their noun total is the number of objects drawn."""
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    figures = json.loads(Path(metrics["density"]["json"]).read_text())
    sources = {s["name"]: s for s in figures["sources"]}
    truth = {r.source_id: Scene.from_dict(r.scene) for r in read_ground_truth(quick_demo / "sources" / "ground_truth.jsonl")
             if r.source == "sa1b"}
    rows = read_manifest(quick_demo / "datasets" / "sa1b_sparse").to_pylist()
    objects = sum(len(truth[row["source_id"]].objects) for row in rows)
    shapes = {obj.shape for row in rows for obj in truth[row["source_id"]].objects}
    sparse = sources["sparse"]["table1"]
    assert sources["sparse"]["counts"]["seen"] == len(rows)
    assert sparse["total_nouns"] == objects
    assert sparse["distinct_nouns"] == len(shapes)
    dense = sources["dense"]["table1"]
    assert dense["total_nouns"] >= objects + len(rows)  # every dense caption also ends "... background"
    assert metrics["density"]["table1"]["sparse"] == sparse


def test_demo_config_errors_name_the_field(tmp_path):
    from demo.run import load_demo_config

    with pytest.raises(ConfigError, match="evaluation.samples_per_prompt"):
        load_demo_config(ROOT / "demo/configs/demo.yaml", overrides=["evaluation.samples_per_prompt=0"])
    with pytest.raises(ConfigError, match="data.colours"):
        load_demo_config(ROOT / "demo/configs/demo.yaml", overrides=["data.colours=5"])
    quick = load_demo_config(ROOT / "demo/configs/demo.yaml", quick=True)
    assert quick.data.sa1b < 100 and "run.steps=2" in quick.training.overrides


def test_reroot_moves_only_paths_under_the_default_out(tmp_path):
    from demo.run import reroot

    tree = {"output": "outputs/demo/datasets/sa1b", "keep": "outputs/other", "list": ["outputs/demo/x", 3],
            "prompt": "a red circle"}
    assert reroot(tree, tmp_path) == {"output": str(tmp_path / "datasets/sa1b"), "keep": "outputs/other",
                                      "list": [str(tmp_path / "x"), 3], "prompt": "a red circle"}


@pytest.mark.slow
def test_quick_race_on_the_quick_demo_data(quick_demo):
    """`python -m demo.race --quick` on the quick demo's folder: it reuses the data and stage 1, trains the four
    recipes in their own processes, evaluates each checkpoint, and its summary is a recomputation of the curves."""
    from demo.race import load_race_config, summarize

    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    proc = subprocess.run([sys.executable, "-m", "demo.race", "--quick", "--out", str(quick_demo)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    race = load_race_config(quick=True)
    report = json.loads((quick_demo / "race.json").read_text())
    assert list(report["curves"]) == list(race.recipes) and (quick_demo / "race.png").is_file()
    for name, curve in report["curves"].items():
        assert [p["step"] for p in curve] == [2, 4]
        assert 0 < curve[0]["cpu_s"] < curve[1]["cpu_s"]
        assert json.loads((quick_demo / "race" / name / "curve.json").read_text()) == curve
        pipeline = json.loads((quick_demo / "race" / name / "final" / "pipeline.json").read_text())
        assert pipeline["objective"] == ("rectified_flow" if "flow" in name else "iddpm")
    results = {n: {"label": race.recipes[n].label, "curve": c} for n, c in report["curves"].items()}
    assert summarize(results, report["targets"], race.reference)["recipes"] == report["recipes"]
    assert "steps to targets" in proc.stdout
