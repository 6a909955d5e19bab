import pytest
from pydantic import Field

from common.config import ConfigError, StrictModel, load_config


class Train(StrictModel):
    lr: float = Field(2e-5, gt=0)
    steps: int = 10


class Job(StrictModel):
    name: str
    train: Train = Train()


def test_load_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(path, Job, ["train.steps=7"])
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 7


@pytest.mark.parametrize("text, needle", [
    ("name: run\ntrain:\n  lrr: 1\n", "train.lrr"),            # a misspelt key is not silently ignored
    ("name: run\ntrain:\n  lr: -1\n", "train.lr"),             # a bound names the field
    ("train: {}\n", "name"),                                   # a missing field names itself
    ("- a\n- b\n", "mapping"),                                 # wrong top-level type
    ("name: [unclosed\n", "not valid YAML"),
])
def test_errors_name_the_field(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")) as err:
        load_config(path, Job)
    assert str(path) in str(err.value) or "YAML" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml", Job)
