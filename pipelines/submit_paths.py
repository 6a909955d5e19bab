"""Paths in a job config when the job runs under `ray job submit --working-dir`.

Ray zips the working dir, uploads it and unpacks it on each node into a temporary folder
(`<temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>`); the driver and every worker start in
that folder. So a relative input path resolves against the uploaded copy of the project on every node, and a
relative output would be written into that temporary copy: it is lost with the session and can never be resumed.
What Ray leaves out of the upload (`.gitignore`, `.rayignore`, the runtime env's `excludes`, `.git`, `.venv`,
`__pycache__`) is not there at all, so a relative path into `outputs/` or `data/` names nothing on the cluster.

`check_job_paths` finds both mistakes on the driver, before any work and before the output folder is bound, and
says in one line which field to change. Outside a submitted job it does nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from pydantic import BaseModel

from common.config import ConfigError, dump_config

# Set by Ray's job supervisor for the entrypoint process only (not for its tasks and actors): the job's runtime env.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
IGNORE_FILES = (".gitignore", ".rayignore")


def submitted_runtime_env() -> dict | None:
    """The runtime env of the `ray job submit` job this process is the driver of, or None when it is not one."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        job = json.loads(raw)
    except ValueError:
        return None
    return (job.get("runtime_env") or {}) if isinstance(job, dict) else None


def uploaded_working_dir() -> Path | None:
    """The folder Ray unpacked `--working-dir` into (the driver's current directory), or None when this process is
    not the driver of a submitted job, or its job has no working dir."""
    env = submitted_runtime_env()
    if not env or not env.get("working_dir"):
        return None
    return Path.cwd()


def upload_excludes(working_dir: Path, runtime_env: dict):
    """A predicate: would Ray's upload have left this relative path out? The same gitwildmatch rules Ray applies
    (its own vendored pathspec), from the ignore files that travelled with the upload, the runtime env's
    `excludes` and Ray's default excludes."""
    from ray._private.thirdparty.pathspec import PathSpec

    try:
        from ray._private.ray_constants import get_runtime_env_default_excludes
        defaults = get_runtime_env_default_excludes()
    except ImportError:  # Ray before 2.5x uploaded everything but what the ignore files list
        defaults = []
    lines = [*defaults, *(runtime_env.get("excludes") or [])]
    for name in IGNORE_FILES:
        path = working_dir / name
        if path.is_file():
            lines += path.read_text(errors="replace").splitlines()
    spec = PathSpec.from_lines("gitwildmatch", lines)
    # "outputs/" matches only a folder: ask about a file inside the path too ("outputs/vae/" names that folder).
    return lambda rel: spec.match_file(rel) or spec.match_file(f"{rel.rstrip('/')}/_")


def _string_fields(tree, prefix: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _string_fields(value, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _string_fields(value, f"{prefix}{index}.")
    elif isinstance(tree, str):
        yield prefix.rstrip("."), tree


def _is_relative_path(value: str) -> bool:
    return bool(value) and not value.startswith(("/", "~")) and "://" not in value


def check_job_paths(config: BaseModel, outputs: Iterable[str]) -> None:
    """Under `ray job submit --working-dir`: refuse a relative output (`outputs` are dotted field names), and any
    relative path that Ray did not upload (ignored, or outside the working dir), naming the field."""
    env = submitted_runtime_env()
    work = uploaded_working_dir()
    if work is None:
        return
    fields = dict(_string_fields(dump_config(config)))
    for name in outputs:
        value = fields.get(name)
        if value and _is_relative_path(value):
            raise ConfigError(f"{name}: {value!r} is relative, and under `ray job submit --working-dir` it would be "
                              f"written into the job's temporary copy of the working dir ({work}), lost with the "
                              f"session and never resumable; set {name} to an absolute path on storage every node "
                              f"shares")
    excluded = upload_excludes(work, env)
    for name, value in fields.items():
        if name in outputs or not _is_relative_path(value) or (work / value).exists():
            continue
        if value.startswith("../") or value == "..":
            raise ConfigError(f"{name}: {value!r} points outside the working dir, which is all `ray job submit` "
                              f"uploads; set {name} to an absolute path on storage every node can read")
        # Only values that look like paths: a bare word ("data", "original") is a name far more often than a folder.
        if "/" in value and excluded(value):
            raise ConfigError(f"{name}: {value!r} is not in the job's working dir: `ray job submit` leaves out "
                              f"what .gitignore / .rayignore list (outputs/, data/, .venv, ...); set {name} to an "
                              f"absolute path on storage every node can read")
