"""Synthetic scenes for the demo: a generator that knows its ground truth (scenes), the real source layouts written
from it (layouts), and a deterministic judge of generated pictures (evaluator)."""
