"""The captioner interface and a registry of backends, so a config names a backend and never imports one."""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from PIL import Image


@dataclass
class CaptionResult:
    text: str | None  # the cleaned caption, None when every attempt failed
    ok: bool
    reason: str | None = None  # why it failed (empty, truncated, repetition, ...), None when ok
    attempts: int = 1


class Captioner(ABC):
    """Images in, captions out. Backends hold their model; construct once per worker (a Ray actor), call per batch."""

    name: str = "caption"  # the caption name it writes (manifest column caption_<name>)

    @abstractmethod
    def __call__(self, images: list[Image.Image], source_captions: list[str | None], metas: list[dict]) -> list[CaptionResult]:
        ...

    def provenance(self) -> dict:
        """What produced the captions: model id, prompt template, sampling parameters."""
        return {"backend": type(self).__name__}


# backend name -> "module:factory"; modules are imported only when their backend is asked for (vLLM is optional).
_BACKENDS: dict[str, str] = {}


def register_captioner(backend: str, target: str) -> None:
    _BACKENDS[backend] = target


def build_captioner(backend: str, **options) -> Captioner:
    """`backend` is a registered name or a `module:factory` (how plug-ins outside curation, the demo's, name theirs)."""
    if backend not in _BACKENDS and ":" not in backend:
        raise ValueError(f"unknown captioner backend {backend!r}; known: {sorted(_BACKENDS)} or module:factory")
    module, _, attr = _BACKENDS.get(backend, backend).partition(":")
    factory: Callable[..., Captioner] = getattr(importlib.import_module(module), attr)
    return factory(**options)
