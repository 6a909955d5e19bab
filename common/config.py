"""YAML configs validated by pydantic, with errors that name the offending field and file.

Every job and trainer config is a pydantic model; `load_config` is the one way to read one, so a typo in any
YAML anywhere in the project fails the same way: before any work starts, naming the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors (a misspelt key must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and each bad field."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str] | None) -> dict:
    """`["train.lr=1e-4", "data.batch_size=8"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like section.field=value")
        key, raw = pair.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"  {where}: {item['msg']}" + (f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""))
    return "\n".join(lines)


def validate_config(data: dict, model: type[M], source: str = "<dict>") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, model: type[M], overrides: list[str] | None = None) -> M:
    """Read `path` (YAML), apply `section.field=value` overrides, validate against `model`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides))
    return validate_config(data, model, str(path))


def dump_config(config: BaseModel) -> dict:
    """A JSON-safe dict of a config, for dataset cards and checkpoints."""
    return config.model_dump(mode="json")
