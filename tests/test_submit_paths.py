"""Path checks of a job config under `ray job submit --working-dir`, in the environment Ray's job supervisor gives
the driver (RAY_JOB_CONFIG_JSON_ENV_VAR, the unpacked working dir as the current directory); the real cluster run
is tests/test_submit.py."""
import json

import pytest

from common.config import ConfigError, validate_config
from pipelines.curate import CurateConfig
from pipelines.submit_paths import JOB_CONFIG_ENV, check_job_paths, uploaded_working_dir


def config(**fields) -> CurateConfig:
    tree = {"source": {"kind": "folder", "root": "/shared/photos"}, "output": "/shared/curated",
            "vae": {"model": "stabilityai/sd-vae-ft-ema"}, "t5": {"model": "DeepFloyd/t5-v1_1-xxl"}}
    for dotted, value in fields.items():
        section, _, name = dotted.partition("__")
        if name:
            tree[section][name] = value
        else:
            tree[section] = value
    return validate_config(tree, CurateConfig)


@pytest.fixture
def submitted(tmp_path, monkeypatch):
    """This process as the driver of a submitted job whose working dir is tmp_path (a copy of the project)."""
    work = tmp_path / "_ray_pkg_0123456789abcdef"
    (work / "models" / "vae").mkdir(parents=True)
    (work / ".gitignore").write_text("outputs/\n*.pyc\n")
    (work / ".rayignore").write_text("/data/\n")
    monkeypatch.chdir(work)
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip",
                                                                   "excludes": ["scratch/"]}}))
    return work


def test_outside_a_submitted_job_nothing_is_checked(monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert uploaded_working_dir() is None
    check_job_paths(config(output="relative/out", vae__model="outputs/vae"), outputs=["output"])


def test_a_job_without_a_working_dir_is_not_checked(monkeypatch):
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))
    check_job_paths(config(output="relative/out"), outputs=["output"])


def test_a_relative_output_is_refused_naming_the_field(submitted):
    assert uploaded_working_dir() == submitted
    with pytest.raises(ConfigError, match=r"^output: 'curated/out' is relative.*_ray_pkg_.*absolute path"):
        check_job_paths(config(output="curated/out"), outputs=["output"])
    check_job_paths(config(), outputs=["output"])  # absolute: fine


@pytest.mark.parametrize("field, value, ignored_by", [
    ("vae__model", "outputs/vae", ".gitignore"),
    ("source", {"kind": "folder", "root": "outputs/photos/"}, ".gitignore"),
    ("source", {"kind": "folder", "root": "data/photos"}, ".rayignore"),
    ("t5__model", "scratch/t5", "the runtime env's excludes"),
    ("source", {"kind": "folder", "root": "venv/photos"}, "Ray's defaults")])
def test_paths_the_upload_left_out_are_refused_naming_the_field(submitted, field, value, ignored_by):
    name = "source.root" if field == "source" else field.replace("__", ".")
    with pytest.raises(ConfigError, match=rf"^{name}: .* is not in the job's working dir"):
        check_job_paths(config(**{field: value}), outputs=["output"])


def test_paths_outside_the_working_dir_are_refused(submitted):
    with pytest.raises(ConfigError, match=r"^source.root: '../photos' points outside the working dir"):
        check_job_paths(config(source={"kind": "folder", "root": "../photos"}), outputs=["output"])


def test_uploaded_relative_paths_and_hub_ids_pass(submitted):
    check_job_paths(config(vae__model="models/vae"), outputs=["output"])  # in the upload: resolves on every node
    check_job_paths(config(vae__model="stabilityai/sd-vae-ft-ema"), outputs=["output"])  # a hub id
    check_job_paths(config(t5__captions=["data"]), outputs=["output"])  # a name that is also an ignored folder


def test_every_job_names_its_own_output_field(submitted):
    from pipelines.density import DensityConfig, run as density_run
    from pipelines.recaption import RecaptionConfig, preflight

    recaption = validate_config({"input": {"source": {"kind": "folder", "root": "/shared/photos"}},
                                 "output": "captions/llava"}, RecaptionConfig)
    with pytest.raises(ConfigError, match=r"^output: 'captions/llava' is relative"):
        preflight(recaption)

    config = validate_config({"sources": [{"name": "a", "manifest": "/shared/a", "column": "caption_original"}],
                              "output_dir": "reports/density"}, DensityConfig)
    with pytest.raises(ConfigError, match=r"^output_dir: 'reports/density' is relative"):
        density_run(config)
