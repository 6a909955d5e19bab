"""Captioners: turn images (and optionally their source captions) into captions, through one interface."""
from curation.captioners.base import CaptionResult, Captioner, build_captioner, register_captioner

__all__ = ["CaptionResult", "Captioner", "build_captioner", "register_captioner"]
