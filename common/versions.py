"""The versions of the libraries a run used, recorded in dataset cards, recaption cards and run folders."""
from __future__ import annotations

import importlib.metadata as md
import platform

PACKAGES = ("torch", "diffusers", "transformers", "ray", "deepspeed", "vllm", "pyarrow", "pillow", "numpy",
            "webdataset", "imagehash", "pixart-from-scratch")


def library_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions
