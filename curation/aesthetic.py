"""The LAION aesthetic predictor: a small MLP on L2-normalised CLIP ViT-L/14 image embeddings.

The CLIP model loads with `CLIPVisionModelWithProjection.from_pretrained` (its `image_embeds` are OpenAI CLIP's
`encode_image`); the predictor's weights (improved-aesthetic-predictor's `sac+logos+ava1-l14-linearMSE.pth`, or
the older single linear layer) load from safetensors or `torch.load(weights_only=True)`, never by unpickling.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from common.config import StrictModel

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class AestheticConfig(StrictModel):
    clip_model: str = Field(DEFAULT_CLIP, description="CLIP vision model (hub id or save_pretrained folder)")
    predictor: str = Field(description="aesthetic MLP weights (.safetensors, or .pth/.pt read with weights_only)")
    min_score: float | None = Field(None, description="reject below this score; null records the score only")
    dtype: str = Field("auto", pattern=r"^(auto|float32|float16|bfloat16)$")


def _mlp(dim: int):
    import torch.nn as nn

    # The released predictor is this exact stack (its ReLUs are commented out upstream); module indices 0, 2, 4,
    # 6, 7 match the released state dict, so it loads without renaming.
    return nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def load_predictor(path: str | Path):
    """The predictor head as an eval-mode torch module, from its weights file."""
    import torch
    import torch.nn as nn

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic predictor weights not found at {path}; set filters.aesthetic.predictor")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if "layers.0.weight" in state:
        module = nn.Module()
        module.layers = _mlp(int(state["layers.0.weight"].shape[1]))
    elif set(state) == {"weight", "bias"}:
        module = nn.Linear(int(state["weight"].shape[1]), 1)
    else:
        raise ValueError(f"{path}: not an aesthetic predictor state dict (keys {sorted(state)[:6]}...)")
    module.load_state_dict(state, strict=True)
    return module.eval()


class AestheticScorer:
    """Images -> aesthetic scores (roughly 1..10 for the released predictor)."""

    def __init__(self, clip_model: str = DEFAULT_CLIP, predictor: str | Path = "", device: str = "auto",
                 dtype: str = "auto"):
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from curation.encoders import load_pretrained, resolve_device, resolve_dtype

        self.device = resolve_device(device)
        self.processor = load_pretrained(CLIPImageProcessor.from_pretrained, clip_model, "CLIP image processor",
                                         "filters.aesthetic.clip_model")
        self.model = load_pretrained(CLIPVisionModelWithProjection.from_pretrained, clip_model, "CLIP vision model",
                                     "filters.aesthetic.clip_model", dtype=resolve_dtype(dtype, self.device))
        self.model = self.model.to(self.device).eval()
        head = load_predictor(predictor)
        self.head = head.to(self.device, torch.float32)
        self.forward = head.layers if hasattr(head, "layers") else head

    def score(self, images: list) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = self.processor(images=images, return_tensors="pt").pixel_values
            pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
            embeds = self.model(pixel_values=pixels).image_embeds.float()
            embeds = embeds / embeds.norm(dim=-1, keepdim=True)
            return self.forward(embeds).squeeze(-1).cpu().numpy().astype(np.float64)


class AestheticStage:
    """Model stage: score each alive sample's bucketed image; record `scores.aesthetic`, reject below min_score."""

    def __init__(self, config: AestheticConfig, device: str = "auto"):
        self.config = config
        self.scorer = AestheticScorer(config.clip_model, config.predictor, device=device, dtype=config.dtype)

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        from curation.writer import RowBatch

        rows = RowBatch(batch)
        alive = rows.alive()
        if alive:
            images = [Image.fromarray(np.asarray(rows.columns["image"][i], dtype=np.uint8)) for i in alive]
            for i, score in zip(alive, self.scorer.score(images)):
                score = float(score)
                rows.metas[i].setdefault("scores", {})["aesthetic"] = score
                if not np.isfinite(score):
                    rows.reject(i, "aesthetic", "aesthetic score is not finite")
                elif self.config.min_score is not None and score < self.config.min_score:
                    rows.reject(i, "aesthetic", f"aesthetic score {score:.3f} < min_score {self.config.min_score}")
        return rows.to_batch()
