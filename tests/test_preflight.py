"""Preflight: settings that cannot work with their data, models or init weights are refused before the first step
(and under --dry-run) in one line naming the config field; nothing is written to the output folder."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from common.config import ConfigError
from tests.shard_fixtures import FixtureSpec, write_dataset
from tests.test_trainer import base_config, write_yaml
from training.launch import launch, main as launch_main
from training.model import PRESETS, PixArt
from training.preflight import PreflightError, expected_pe_interpolation, preflight
from training.stages import TransitionError
from training.train_config import load_train_config


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    specs = {"ok": FixtureSpec({(64, 64): 8}, units=1), "wide_t5": FixtureSpec({(64, 64): 8}, units=1, t5_width=48),
             "eight_channels": FixtureSpec({(64, 64): 8}, units=1, latent_channels=8),
             "large": FixtureSpec({(128, 128): 8, (128, 192): 4}, units=1)}
    for name, spec in specs.items():
        write_dataset(root / name, spec)
    return root


def config(tmp_path, data_root, **sections):
    return load_train_config(write_yaml(tmp_path / "c.yaml", base_config(data_root, tmp_path / "run", **sections)))


def refused(cfg, field: str, exc=PreflightError):
    with pytest.raises(exc) as err:
        preflight(cfg)
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message, message
    return message


def test_a_good_config_passes_and_says_what_it_checked(datasets, tmp_path):
    report = preflight(config(tmp_path, datasets / "ok"))
    assert [c.split(":")[0] for c in report.checks] == ["data", "features", "resolution"]
    assert report.warnings == [] and not (tmp_path / "run").exists()


def test_feature_widths_must_match_the_model(datasets, tmp_path):
    message = refused(config(tmp_path, datasets / "wide_t5"), "model.overrides.caption_channels")
    assert "48 wide" in message and "caption_channels is 32" in message
    message = refused(config(tmp_path, datasets / "eight_channels"), "model.overrides.in_channels")
    assert "8 channels" in message and "in_channels=4" in message


def test_the_data_resolution_must_match_input_size(datasets, tmp_path):
    message = refused(config(tmp_path, datasets / "large"), "model.overrides.input_size")
    assert "about 16x16 latents" in message and "input_size is 8" in message
    ok = config(tmp_path, datasets / "large", model={"preset": "tiny", "overrides": {"input_size": 16}})
    assert preflight(ok).warnings == []


def test_an_unusual_pe_interpolation_is_a_warning_naming_the_field(datasets, tmp_path, caplog):
    cfg = config(tmp_path, datasets / "ok", model={"preset": "tiny", "overrides": {"pe_interpolation": 2.0}})
    with caplog.at_level(logging.WARNING):
        report = preflight(cfg)
    assert report.warnings and report.warnings[0].startswith("model.overrides.pe_interpolation: 2.0")
    assert "model.overrides.pe_interpolation" in caplog.text
    # PixArt's (and diffusers' sample_size // 64) scale: 1 at 256 and 512 px, 2 at 1024 px.
    assert [expected_pe_interpolation(s) for s in (8, 32, 64, 128)] == [1.0, 1.0, 1.0, 2.0]


def test_local_text_encoder_and_vae_must_fit_the_model(datasets, tmp_path, tiny_t5_dir, tiny_vae_dir):
    narrow = {"preset": "tiny", "overrides": {"caption_channels": 48}}
    cfg = config(tmp_path, datasets / "wide_t5", model=narrow,
                 pretrained={"text_encoder": str(tiny_t5_dir), "vae": str(tiny_vae_dir)})
    assert "is 32 wide" in refused(cfg, "pretrained.text_encoder")
    cfg = config(tmp_path, datasets / "eight_channels", model={"preset": "tiny", "overrides": {"in_channels": 8}},
                 pretrained={"vae": str(tiny_vae_dir)})
    assert "4 latent channels" in refused(cfg, "pretrained.vae")


def test_init_weights_must_exist_be_complete_and_fit(datasets, tmp_path):
    message = refused(config(tmp_path, datasets / "ok", init={"weights": str(tmp_path / "nope")}), "init.weights")
    assert "nope is not a folder" in message
    half = tmp_path / "half"
    PixArt(PRESETS["tiny"]).save_pretrained(half)
    (half / "model.safetensors").write_bytes(b"")
    assert "model.safetensors is unreadable" in refused(config(tmp_path, datasets / "ok",
                                                               init={"weights": str(half)}), "init.weights")
    plain = tmp_path / "plain"
    PixArt(PRESETS["tiny"]).save_pretrained(plain)
    assert "ema.safetensors is missing" in refused(config(tmp_path, datasets / "ok", init={
        "weights": str(plain), "use_ema": True}), "init.weights")
    narrow = tmp_path / "narrow"
    PixArt(dataclasses.replace(PRESETS["tiny"], hidden_size=48)).save_pretrained(narrow)
    with pytest.raises(TransitionError, match=r"^init\.weights: .*hidden_size: 48 -> 96"):
        preflight(config(tmp_path, datasets / "ok", init={"weights": str(narrow)}))
    # A shape only the tensors know (a longer caption table): read from the safetensors header.
    longer = tmp_path / "longer"
    PixArt(dataclasses.replace(PRESETS["tiny"], caption_length=7)).save_pretrained(longer)
    assert "y_embedder.y_embedding" in refused(config(tmp_path, datasets / "ok", init={"weights": str(longer)}),
                                               "init.weights")


def test_a_transition_without_weights_is_a_config_error(datasets, tmp_path):
    for transition in ("class_to_text", "continue"):
        with pytest.raises(ConfigError, match=rf"init\.transition: '{transition}' .* init\.weights is null"):
            config(tmp_path, datasets / "ok", init={"weights": None, "transition": transition})


@pytest.mark.slow  # imports DeepSpeed through the launcher
def test_dry_run_runs_the_preflight_and_chained_substages_check_against_their_predecessor(datasets, tmp_path,
                                                                                           capsys):
    cfg = write_yaml(tmp_path / "bad.yaml", base_config(datasets / "ok", tmp_path / "run",
                                                        init={"weights": str(tmp_path / "missing")}))
    assert launch_main(["--stage", "2", "--config", str(cfg), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: init.weights:") and "missing" in err[0]
    assert not (tmp_path / "run").exists()

    # Sub-stage b starts from a's final/, which does not exist yet: checked against a's model instead.
    write_yaml(tmp_path / "a.yaml", base_config(datasets / "ok", tmp_path / "a", stage=3))
    write_yaml(tmp_path / "b.yaml", base_config(datasets / "large", tmp_path / "b", stage=3, model={
        "preset": "tiny-MS", "overrides": {"input_size": 16}}))
    write_yaml(tmp_path / "plan.yaml", {"stage": 3, "substages": ["a.yaml", "b.yaml"]})
    assert launch(3, tmp_path / "plan.yaml", dry_run=True) == 0
    write_yaml(tmp_path / "b.yaml", base_config(datasets / "large", tmp_path / "b", stage=3, model={
        "preset": "tiny-MS", "overrides": {"input_size": 16, "hidden_size": 48}}))
    with pytest.raises(TransitionError, match="hidden_size: 96 -> 48"):
        launch(3, tmp_path / "plan.yaml", dry_run=True)


def test_report_to_wandb_needs_wandb_installed(datasets, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = config(tmp_path, datasets / "ok", run={"output_dir": str(tmp_path / "run"), "steps": 1,
                                                 "report_to": ["tensorboard", "wandb"]})
    assert "wandb is not installed" in refused(cfg, "run.report_to")
