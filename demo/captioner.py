"""The synthetic-scene captioner: captions for the demo's procedural pictures, written from their ground truth.

Real runs caption with LLaVA (the `transformers` and `vllm` backends). The demo's pictures come from
`demo.scenes`, whose generator wrote what each picture shows into a sidecar
(`ground_truth.jsonl`, see `demo.layouts`); this backend looks each sample up there by
(source, source_id) and describes it in one of two forms:
- dense: every object's size, colour, shape and position, and the background ("a small red circle in the top left
  and a large blue square in the bottom right, on a grey background"), the kind of caption PixArt's LLaVA
  recaptioning produces;
- sparse: the shape nouns only ("a circle and a square"), like the short alt-texts it replaces.
A sample without a ground-truth entry fails with that reason (it is rejected, never captioned by guesswork).

YAML (a `caption` section of a curation job):

    caption: {backend: "demo.captioner:build_synthetic_captioner", name: dense, num_gpus: 0,
              options: {ground_truth: outputs/demo/sources/ground_truth.jsonl, form: dense}}
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field

from curation.captioners.base import CaptionResult, Captioner
from demo.layouts import read_ground_truth
from demo.scenes import Scene, dense_caption, sparse_caption
from common.config import StrictModel, validate_config

FORMS = {"dense": dense_caption, "sparse": sparse_caption}


class SyntheticCaptionerSettings(StrictModel):
    """Options of the synthetic backend; an unknown or misspelt option is an error naming it."""

    name: str = Field("dense", pattern=r"^[a-z0-9_]{1,40}$", description="caption name: column caption_<name>")
    ground_truth: str = Field(..., min_length=1, description="the generator's ground_truth.jsonl")
    form: Literal["dense", "sparse"] = "dense"


class SyntheticSceneCaptioner(Captioner):
    """Looks up each sample's scene by (meta["source"], meta["source_id"]) and describes it."""

    def __init__(self, ground_truth: str | Path, form: str = "dense", name: str = "dense"):
        self.name = name
        self.form = form
        self.ground_truth = Path(ground_truth)
        if not self.ground_truth.is_file():
            raise FileNotFoundError(f"ground_truth: no sidecar at {self.ground_truth} (written by "
                                    "demo.layouts.write_layouts)")
        self._describe = FORMS[form]
        self._scenes = {(r.source, r.source_id): Scene.from_dict(r.scene) for r in read_ground_truth(self.ground_truth)}
        self._digest = hashlib.sha1(self.ground_truth.read_bytes()).hexdigest()

    def __call__(self, images: list[Image.Image], source_captions: list[str | None], metas: list[dict]) -> list[CaptionResult]:
        results = []
        for meta in metas:
            key = (str(meta.get("source")), str(meta.get("source_id")))
            scene = self._scenes.get(key)
            if scene is None:
                results.append(CaptionResult(text=None, ok=False, reason=f"no ground truth for {key[0]}:{key[1]}"))
            else:
                results.append(CaptionResult(text=self._describe(scene), ok=True))
        return results

    def provenance(self) -> dict:
        return {"backend": "synthetic", "form": self.form, "ground_truth": str(self.ground_truth),
                "ground_truth_sha1": self._digest}


def build_synthetic_captioner(**options) -> SyntheticSceneCaptioner:
    """Plug-in factory (`build_captioner("demo.captioner:build_synthetic_captioner", ground_truth=..., form=..., name=...)`)."""
    settings = validate_config(options, SyntheticCaptionerSettings, "caption options (synthetic backend)")
    return SyntheticSceneCaptioner(settings.ground_truth, form=settings.form, name=settings.name)
