"""`make demo-race` (demo.race): recipe configs, and the comparison arithmetic on hand-made curves."""
from __future__ import annotations

from pathlib import Path

import pytest

from demo.race import at_compute, first_reaching, load_race_config, recipe_config, summarize
from demo.run import load_demo_config

TARGETS = {"colour": 0.9, "shape": 0.7, "position": 0.8}


def point(step, cpu_s, colour, shape, position):
    return {"step": step, "cpu_s": cpu_s, "wall_s": cpu_s, "colour": colour, "shape": shape, "position": position,
            "all": min(colour, shape, position)}


def test_recipe_sections_replace_the_stage2_sections_whole(tmp_path):
    race = load_race_config()
    demo = load_demo_config()
    assert list(race.recipes)[:2] == ["b_demo_v", "c_rectified_flow"]  # the reference and flow run first
    configs = {name: recipe_config(demo, race, name, tmp_path)[1] for name in race.recipes}
    assert configs["a_pixart_eps"].diffusion.prediction_type == "epsilon"
    assert configs["b_demo_v"].diffusion.prediction_type == "v_prediction"
    flow = configs["c_rectified_flow"].diffusion
    assert (flow.objective, flow.flow_shift) == ("rectified_flow", 3.0)
    assert "prediction_type" not in flow.model_fields_set  # replaced whole, not merged into the v-prediction one
    assert configs["d_rectified_flow_tread"].routing.rate == 0.5 and configs["c_rectified_flow"].routing.rate == 0
    for name, config in configs.items():
        # Same data, model, batch and seeds as the demo's stage 2; checkpoints at every evaluation, all kept.
        assert config.data.root == str(tmp_path / "datasets" / "sa1b") and config.data.batch_size == 64
        assert config.model == configs["b_demo_v"].model and config.run.seed == 0
        assert config.init.weights == str(tmp_path / "train" / "stage1" / "final")
        assert config.run.checkpoint_every == race.eval_every and config.run.steps == race.steps
        assert config.run.keep_last * race.eval_every > race.steps
        assert config.run.output_dir == str(tmp_path / "race" / name)
        assert (tmp_path / "configs" / f"race_{name}.yaml").is_file()


def test_first_reaching_and_equal_compute_on_hand_made_curves():
    slow = [point(100, 50.0, 0.9, 0.5, 0.9), point(200, 100.0, 0.95, 0.72, 0.79), point(300, 150.0, 1.0, 0.75, 0.85),
            point(400, 200.0, 1.0, 0.8, 0.9)]
    fast = [point(100, 40.0, 0.95, 0.71, 0.81), point(200, 80.0, 1.0, 0.9, 1.0), point(300, 120.0, 1.0, 0.6, 1.0)]
    never = [point(100, 45.0, 0.2, 0.2, 0.2), point(200, 90.0, 0.3, 0.3, 0.3)]
    assert first_reaching(slow, TARGETS)["step"] == 300  # step 200 misses position by 0.01
    assert first_reaching(fast, TARGETS)["step"] == 100
    assert first_reaching(never, TARGETS) is None
    assert at_compute(slow, 120.0)["step"] == 200 and at_compute(slow, 10.0) is None

    summary = summarize({"b": {"label": "B", "curve": slow}, "c": {"label": "C", "curve": fast},
                         "x": {"label": "X", "curve": never}}, TARGETS, reference="b")
    assert summary["equal_compute_cpu_s"] == 90.0  # the cheapest run's total
    rows = summary["recipes"]
    assert rows["c"]["compute_vs_reference"] == pytest.approx(40.0 / 150.0)
    assert rows["b"]["compute_vs_reference"] == 1.0 and rows["x"]["compute_vs_reference"] is None
    assert rows["c"]["at_equal_compute"]["step"] == 200 and rows["b"]["at_equal_compute"]["step"] == 100
    assert rows["c"]["cpu_s_per_step"] == pytest.approx(0.4)
    # A reference that never reaches the targets bounds the ratio from above by its whole run's compute.
    bounded = summarize({"x": {"label": "X", "curve": never}, "c": {"label": "C", "curve": fast}}, TARGETS, "x")
    assert bounded["recipes"]["c"]["compute_vs_reference"] is None
    assert bounded["recipes"]["c"]["compute_vs_reference_at_most"] == pytest.approx(40.0 / 90.0)


def test_quick_race_config_and_unknown_recipe(tmp_path):
    from demo.race import main

    assert load_race_config(quick=True).steps == 4
    assert main(["--out", str(tmp_path), "--recipe", "z_nothing"]) == 2
    assert not Path(tmp_path / "race").exists()
