"""Captioners: turn images (and optionally their source captions) into captions, through one interface."""
from curation.captioners.base import CaptionResult, Captioner, build_captioner, register_captioner

# LLaVA backends (modules import lazily: vLLM is an optional extra, torch loads only when a backend is built).
register_captioner("transformers", "curation.captioners.llava_transformers:build_transformers_captioner")
register_captioner("vllm", "curation.captioners.llava_vllm:build_vllm_captioner")

__all__ = ["CaptionResult", "Captioner", "build_captioner", "register_captioner"]
