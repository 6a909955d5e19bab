"""`python -m training.sample` end to end: a tiny PixArt saved with save_pretrained plus pipeline.json naming the
tiny VAE and T5 fixtures (each loaded back through from_pretrained), PNGs of the requested size out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from training.model import PRESETS, PixArt
from training.sample import PipelineInfo, main, write_pipeline_info


pytestmark = pytest.mark.usefixtures("one_thread")


def save_weights(folder: Path, preset: str, vae_dir: Path, t5_dir: Path | None, ema: bool = False) -> Path:
    torch.manual_seed(0)
    model = PixArt(PRESETS[preset])
    with torch.no_grad():  # zero-initialized output layers would make every image the same
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    if ema:
        save_file({k: (v + 0.05 * torch.randn_like(v)).contiguous() for k, v in model.state_dict().items()},
                  str(folder / "ema.safetensors"))
    write_pipeline_info(folder, PipelineInfo(vae=str(vae_dir), text_encoder=str(t5_dir) if t5_dir else None))
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_vae_dir, tiny_t5_dir) -> Path:
    return save_weights(tmp_path_factory.mktemp("weights"), "tiny-MS", tiny_vae_dir, tiny_t5_dir, ema=True)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_end_to_end(weights, tmp_path, capsys):
    out = tmp_path / "samples"
    # main() is what `python -m training.sample` runs; in-process it shares this session's library imports.
    code, log = run_cli(capsys, "--checkpoint", weights, "--prompt", "a red bus in the snow",
                        "--prompt", "a bowl of ramen", "--out", out, "--height", "32", "--width", "48", "--steps", "3")
    assert code == 0, log
    assert f"wrote 2 images and grid.png to {out}" in log
    files = sorted(p.name for p in out.iterdir())
    assert files == ["000_a-red-bus-in-the-snow.png", "001_a-bowl-of-ramen.png", "grid.png", "samples.json"]
    for name in files[:2]:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size == (48, 32) and im.mode == "RGB"
    with Image.open(out / "grid.png") as grid:
        assert grid.width >= 2 * 48 and grid.height > 32
    record = json.loads((out / "samples.json").read_text())
    assert record["ema"] is True and record["sampler"] == "dpm++" and record["steps"] == 3
    assert record["cfg_scale"] == 4.5 and record["vae"] == str(PipelineInfo.model_validate(
        json.loads((weights / "pipeline.json").read_text())).vae)
    assert [i["prompt"] for i in record["images"]] == ["a red bus in the snow", "a bowl of ramen"]


def test_cli_ema_switch_and_defaults(weights, tmp_path, capsys):
    args = ["--checkpoint", weights, "--prompt", "a cat", "--sampler", "iddpm", "--steps", "2", "--seed", "3"]
    for name, flag in (("ema", "--ema"), ("plain", "--no-ema"), ("default", None)):
        code, log = run_cli(capsys, *args, "--out", tmp_path / name, *([flag] if flag else []))
        assert code == 0, log
    pixels = {n: np.asarray(Image.open(tmp_path / n / "000_a-cat.png")) for n in ("ema", "plain", "default")}
    assert pixels["ema"].shape == (64, 64, 3)  # the model's native size (input_size 8 x VAE factor 8)
    assert np.array_equal(pixels["ema"], pixels["default"]) and not np.array_equal(pixels["ema"], pixels["plain"])
    assert json.loads((tmp_path / "plain" / "samples.json").read_text())["ema"] is False


def test_cli_class_conditional_checkpoint(tmp_path, tiny_vae_dir, capsys):
    weights = save_weights(tmp_path / "w", "tiny-class", tiny_vae_dir, None)
    # The VAE given as a subfolder of a bigger folder (a diffusers pipeline's layout); no text encoder needed.
    write_pipeline_info(weights, PipelineInfo(vae=str(tiny_vae_dir.parent), vae_subfolder=tiny_vae_dir.name,
                                              text_encoder=None))
    code, log = run_cli(capsys, "--checkpoint", weights, "--class-label", "3", "--class-label", "7", "--steps", "2",
                        "--height", "16", "--width", "32", "--out", tmp_path / "out")
    assert code == 0, log
    assert sorted(p.name for p in (tmp_path / "out").glob("0*.png")) == ["000_class-3.png", "001_class-7.png"]
    assert Image.open(tmp_path / "out" / "000_class-3.png").size == (32, 16)
    code, log = run_cli(capsys, "--checkpoint", weights, "--prompt", "a cat", "--out", tmp_path / "x")
    assert code == 2 and "class-label" in log


@pytest.mark.parametrize("extra, field", [
    (["--sampler", "ddim"], "--sampler"),
    (["--steps", "0"], "steps"),
    (["--height", "40"], "height"),
    (["--width", "24"], "width"),
    (["--cfg-scale", "-2"], "--cfg-scale"),
    (["--vae", "/nonexistent/vae"], "--vae"),
    (["--text-encoder", "/nonexistent/t5"], "--text-encoder"),
])
def test_cli_bad_arguments_name_the_field(weights, tmp_path, capsys, extra, field):
    code, log = run_cli(capsys, "--checkpoint", weights, "--prompt", "x", "--out", tmp_path / "out", *extra)
    assert code == 2 and field in log, log
    assert not (tmp_path / "out").exists()


def test_cli_missing_or_incomplete_checkpoint(tmp_path, capsys):
    code, log = run_cli(capsys, "--checkpoint", tmp_path / "nope", "--prompt", "x", "--out", tmp_path / "out")
    assert code == 2 and "checkpoint" in log and "nope" in log
    (tmp_path / "empty").mkdir()
    code, log = run_cli(capsys, "--checkpoint", tmp_path / "empty", "--prompt", "x", "--out", tmp_path / "out")
    assert code == 2 and "config.json" in log


def test_cli_ema_requested_but_absent(tmp_path, tiny_vae_dir, tiny_t5_dir, capsys):
    weights = save_weights(tmp_path / "w", "tiny", tiny_vae_dir, tiny_t5_dir)
    code, log = run_cli(capsys, "--checkpoint", weights, "--prompt", "x", "--ema", "--out", tmp_path / "out")
    assert code == 2 and "ema" in log and "--no-ema" in log


def test_cli_prompt_file_images_per_prompt_negative_prompt_and_sa_solver(weights, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red bus\n\n  a bowl of ramen  \n")
    out = tmp_path / "samples"
    code, log = run_cli(capsys, "--checkpoint", weights, "--prompt", "a cat", "--prompt-file", prompts,
                        "--images-per-prompt", "2", "--negative-prompt", "blurry", "--sampler", "sa-solver",
                        "--steps", "3", "--height", "32", "--width", "32", "--out", out)
    assert code == 0, log
    record = json.loads((out / "samples.json").read_text())
    assert [i["prompt"] for i in record["images"]] == ["a cat"] * 2 + ["a red bus"] * 2 + ["a bowl of ramen"] * 2
    assert record["negative_prompt"] == "blurry" and record["sampler"] == "sa-solver" and record["steps"] == 3
    assert len(list(out.glob("0*.png"))) == 6
    code, log = run_cli(capsys, "--checkpoint", weights, "--prompt-file", tmp_path / "none.txt", "--out", out)
    assert code == 2 and "prompt-file" in log


def test_help_prints_each_default_once_and_explains_sampler_seed_device(capsys):
    from training.sample import build_parser

    text = build_parser().format_help()
    flat = " ".join(text.split())
    for option in ("--sampler", "--seed", "--device", "--steps", "--cfg-scale", "--batch-size"):
        section = flat.split(option, 2)[-1].split(" --", 1)[0]  # the option's own help entry
        assert section.count("default") <= 1, (option, section)
    assert "dpm++: DPM-Solver++" in flat and "sa-solver: SA-Solver" in flat and "iddpm:" in flat
    assert "seed of the random stream" in flat and "torch device" in flat
    assert "(default: 4.5)" in flat  # --cfg-scale: argparse's default, once


def test_cli_takes_a_run_folder_and_says_which_weights_it_used(weights, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(weights, run / "final")
    code, log = run_cli(capsys, "--checkpoint", run, "--prompt", "a red bus", "--out", tmp_path / "s",
                        "--height", "32", "--width", "32", "--steps", "2")
    assert code == 0, log
    assert f"using {run / 'final' / 'ema.safetensors'} (the run's final weights)" in log
