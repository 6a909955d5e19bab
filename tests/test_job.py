"""The job primitives shared by curate, recaption and density (pipelines/job.py): preflight of models and
locations, output binding, the resource policy, commit markers."""
from __future__ import annotations

import json
import time

import pyarrow as pa
import pytest
import yaml

from common.config import ConfigError
from pipelines.job import (DIFFUSERS_MODEL, TOKENIZER, TRANSFORMERS_MODEL, ModelNeed, Stage, StageResources,
                           bind_output, check_output_location, claimed_output, fit_stages, is_committed,
                           resolve_models, write_parquet)


@pytest.fixture()
def empty_hub_cache(tmp_path, monkeypatch):
    """No network and an empty Hugging Face cache: what a fresh machine without internet has."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_local_model_folders_must_hold_their_class_files(tmp_path, tiny_vae_dir, tiny_t5_dir):
    resolve_models([ModelNeed("vae.model", str(tiny_vae_dir), DIFFUSERS_MODEL),
                    ModelNeed("t5.model", str(tiny_t5_dir), TOKENIZER),
                    ModelNeed("t5.model", str(tiny_t5_dir), TRANSFORMERS_MODEL)])
    with pytest.raises(ConfigError) as err:  # a T5 folder is no diffusers VAE: it lacks the weights file
        resolve_models([ModelNeed("vae.model", str(tiny_t5_dir), DIFFUSERS_MODEL, what="VAE")])
    message = str(err.value)
    assert message.count("\n") == 0 and message.startswith("vae.model: ")
    assert "diffusion_pytorch_model.safetensors" in message and "set vae.model to" in message
    with pytest.raises(ConfigError, match=r"^t5.model: folder .*missing.* does not exist"):
        resolve_models([ModelNeed("t5.model", str(tmp_path / "missing"), TOKENIZER)])


def test_hub_ids_resolve_through_the_cache_and_offline_mode(empty_hub_cache):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        resolve_models([ModelNeed("vae.model", "stabilityai/sd-vae-ft-ema", DIFFUSERS_MODEL)])
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert message.count("\n") == 0 and message.startswith("vae.model: hub id 'stabilityai/sd-vae-ft-ema'")
    assert "HF_HUB_OFFLINE" in message


def test_curate_with_the_default_hub_vae_offline_stops_at_once_and_claims_nothing(tmp_path, capsys,
                                                                                   empty_hub_cache):
    from pipelines.curate import main

    (tmp_path / "photos").mkdir()
    config = {"source": {"kind": "folder", "root": str(tmp_path / "photos")}, "output": str(tmp_path / "out"),
              "t5": None}  # vae.model left at its default hub id
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: vae.model: hub id 'stabilityai/sd-vae-ft-ema'")
    assert not (tmp_path / "out").exists()


def test_curate_with_the_default_hub_vae_and_a_dead_network_stops_within_10s(tmp_path):
    """A user's command line, imports included, on a machine whose network refuses the hub (not offline mode):
    the preflight asks once, without huggingface_hub's retries, and claims nothing."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a port nobody listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "photos").mkdir()
    config = {"source": {"kind": "folder", "root": str(tmp_path / "photos")}, "output": str(tmp_path / "out"),
              "t5": None}  # vae.model left at its default hub id
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the suite runs offline; this test does not
        env.pop(name, None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipelines.curate", "--config", str(tmp_path / "c.yaml")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - start < 10, done.stderr
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: vae.model: hub id 'stabilityai/sd-vae-ft-ema' cannot be "
                                                   "resolved"), done.stderr
    assert not (tmp_path / "out").exists()


def test_output_location_checks(tmp_path):
    check_output_location("output", tmp_path / "new" / "deeper")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="^output: .* is a file"):
        check_output_location("output", tmp_path / "file")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        import os

        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("running as root")
        with pytest.raises(ConfigError, match="^output: cannot create or write"):
            check_output_location("output", locked / "out")
    finally:
        locked.chmod(0o700)


def test_a_failed_start_leaves_no_output_folder_and_binding_refuses_other_settings(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError):
        with claimed_output(out):
            (out / "work").mkdir(parents=True)  # a source listing may write here before the preflight ends
            raise ConfigError("vae.model: nope")
    assert not out.exists()
    with claimed_output(out):
        out.mkdir()
        bind_output(out, {"buckets": {"resolution": 256}}, "abc", 3)
    assert json.loads((out / "job.json").read_text())["settings"] == {"buckets": {"resolution": 256}}
    bind_output(out, {"buckets": {"resolution": 256}}, "abc", 3)  # the same job resumes
    with pytest.raises(ConfigError, match=r"changed: buckets.resolution"):
        bind_output(out, {"buckets": {"resolution": 512}}, "abc", 3)
    with pytest.raises(ConfigError, match="other input"):
        bind_output(out, {"buckets": {"resolution": 256}}, "abd", 3)
    with pytest.raises(RuntimeError):  # a folder already bound is never removed by a later failed start
        with claimed_output(out):
            raise RuntimeError("later failure")
    assert (out / "job.json").is_file()


def test_one_resource_policy_fits_auto_settings_to_the_cluster():
    model = lambda **kw: Stage(kw.pop("field"), StageResources(**kw))  # noqa: E731
    stages = [model(field="caption"), model(field="vae"), model(field="t5")]
    two_cores = fit_stages(stages, {"CPU": 2}, task_cpus=1)
    assert [two_cores[s]["num_cpus"] for s in ("caption", "vae", "t5")] == pytest.approx([1 / 3] * 3)
    assert all(f["num_gpus"] == 0 and f["compute"].max_size == 1 for f in two_cores.values())
    gpus = fit_stages(stages, {"CPU": 32, "GPU": 8}, task_cpus=1)
    assert gpus["vae"]["num_gpus"] == 1 and gpus["vae"]["compute"].max_size == 8 and gpus["vae"]["num_cpus"] == 1
    # A CPU-bound stage scales out over the free CPUs; a model stage on CPU keeps one actor.
    counting = Stage("ray", StageResources(num_gpus=0), scales_on_cpu=True)
    assert fit_stages([counting], {"CPU": 16}, task_cpus=1)["ray"]["compute"].min_size == 15
    with pytest.raises(ConfigError, match=r"^vae.num_gpus is 2 but the Ray cluster has 1 GPUs"):
        fit_stages([model(field="vae", num_gpus=2)], {"CPU": 8, "GPU": 1}, task_cpus=1)
    fit_stages([model(field="vae", num_gpus=2, num_cpus=64)], {"CPU": 8}, task_cpus=1, check=False)  # autoscaling


def test_commit_markers_empty_or_unreadable_count_as_absent(tmp_path, capsys):
    marker = tmp_path / "manifest" / "u.parquet"
    assert not is_committed(marker)
    write_parquet(marker, pa.table({"key": ["a"]}))
    assert is_committed(marker)
    for damage in (b"", b"PAR1 half a footer"):
        marker.write_bytes(damage)
        assert not is_committed(marker)
        assert not marker.exists() and "damaged" in capsys.readouterr().err


def test_recaption_folder_cpu_config_offline_stops_in_preflight_naming_caption_model(tmp_path, capsys,
                                                                                     empty_hub_cache):
    from pathlib import Path

    from pipelines.recaption import main

    (tmp_path / "photos").mkdir()
    config = Path(__file__).resolve().parents[1] / "configs" / "recaption" / "folder_cpu.yaml"
    start = time.perf_counter()
    code = main(["--config", str(config), "--set", f"input.source.root={tmp_path / 'photos'}",
                 "--set", f"output={tmp_path / 'captions'}"])
    assert code == 2 and time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: caption.model: hub id 'llava-hf/llava-interleave-qwen")
    assert not (tmp_path / "captions").exists()


def test_density_refuses_an_output_it_cannot_write_before_any_work(tmp_path, capsys):
    from pipelines.density import main

    (tmp_path / "taken").write_text("a file where the report folder should go")
    manifest = tmp_path / "captions.parquet"
    write_parquet(manifest, pa.table({"caption_llava": ["a dog on a mat"]}))
    config = {"sources": [{"name": "d", "manifest": str(manifest), "column": "caption_llava"}],
              "output_dir": str(tmp_path / "taken"), "tokenizer": None, "tagger": "pattern"}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "d.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: output_dir: ")


def test_every_shipped_recaption_and_density_config_fits_a_two_core_machine():
    from pathlib import Path

    from common.config import load_config
    from pipelines.density import DensityConfig, stats_stage
    from pipelines.job import check_captioner_fits
    from pipelines.recaption import RecaptionConfig, caption_stage

    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted((configs / "recaption").glob("*.yaml")):
        config = load_config(path, RecaptionConfig)
        if config.caption.backend == "vllm":  # GPU-only: refused in one line on a machine without GPUs
            with pytest.raises(ConfigError, match="^caption.backend: vllm needs a GPU"):
                check_captioner_fits("caption", config.caption, {"CPU": 2})
            continue
        fitted = fit_stages([caption_stage(config.caption)], {"CPU": 2}, config.ray.read_num_cpus)["caption"]
        assert fitted["num_cpus"] + config.ray.read_num_cpus <= 2 and fitted["num_gpus"] == 0, path.name
    for path in sorted((configs / "density").glob("*.yaml")):
        fitted = fit_stages([stats_stage(load_config(path, DensityConfig))], {"CPU": 2}, 1.0)["ray"]
        assert fitted["num_cpus"] + 1.0 <= 2, path.name


def test_legacy_or_damaged_job_files(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"config": {}, "units_sha256": "x"}))
    with pytest.raises(ConfigError, match="another version"):
        bind_output(tmp_path, {"a": 1}, "d", 1)
    (tmp_path / "job.json").write_text("")  # a first start that died mid-write (cannot happen with fsync)
    bind_output(tmp_path, {"a": 1}, "d", 1)
    assert json.loads((tmp_path / "job.json").read_text())["settings"] == {"a": 1}
