"""LLaVA captioning with transformers: any llava-hf checkpoint (LLaVA-1.5, LLaVA-NeXT, OneVision) on a GPU or CPU.

`AutoModelForImageTextToText` picks the class from the checkpoint's `model_type` (LlavaForConditionalGeneration,
LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration) and `AutoProcessor` its processor, so
images are preprocessed exactly as the model was trained to see them. Built by
`build_captioner("transformers", model=..., ...)`; options are CaptionerSettings fields.
Random-init LLaVA models for tests and benchmarks live with the test fixtures (tests/llava_fixtures.py).
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from curation.captioners.base import CaptionResult, Captioner
from curation.captioners.config import CaptionerSettings, SamplingConfig
from curation.captioners.prompts import build_instruction, render_chat_prompt
from curation.captioners.quality import Generation, caption_with_retries
from common.pretrained import _load

SETTING = "caption.model"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def sampling_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    """`generate()` keyword arguments for one attempt; temperature 0 is greedy decoding."""
    if sampling.temperature == 0:
        return {"do_sample": False, "repetition_penalty": sampling.repetition_penalty}
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k or 0, "repetition_penalty": sampling.repetition_penalty}


class LlavaTransformersCaptioner(Captioner):
    """A LLaVA model and its processor on one device; call it with a batch of images."""

    def __init__(self, settings: CaptionerSettings, model: torch.nn.Module | None = None, processor=None):
        """Loads `settings.model` with from_pretrained; `model`/`processor` may be passed already built (the
        benchmark's random-init 7B model, which is not worth 14 GB of disk)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.settings = settings
        self.name = settings.name
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        if processor is None:
            processor = _load(AutoProcessor.from_pretrained, settings.model, "LLaVA processor", SETTING)
        if model is None:
            kwargs: dict[str, Any] = {"dtype": self.dtype}
            if self.device.type == "cuda":
                kwargs["device_map"] = str(self.device)  # load straight onto the GPU, not through host memory
            if settings.attn_implementation:
                kwargs["attn_implementation"] = settings.attn_implementation
            model = _load(AutoModelForImageTextToText.from_pretrained, settings.model, "LLaVA model", SETTING, **kwargs)
        self.model = model.to(self.device).eval()
        self.processor = processor
        # Decoder-only batches must be padded on the left, so every row's next token follows its own prompt.
        self.processor.tokenizer.padding_side = "left"
        self.model_type = self.model.config.model_type
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.processor.tokenizer.eos_token_id
        self.eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=self.device)
        pad = self.processor.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else int(self.eos_ids[0])
        self.tokens_generated = 0  # running total, for throughput figures

    def provenance(self) -> dict:
        import transformers

        s = self.settings
        return {
            "backend": "transformers",
            **s.provenance(),
            "model_type": self.model_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "transformers": transformers.__version__,
        }

    def prompts_for(self, source_captions: list[str | None]) -> list[str]:
        s = self.settings
        return [
            render_chat_prompt(self.processor, build_instruction(s.prompt, s.source_prompt, s.inject_source_caption, c),
                               self.model_type, s.chat_template)
            for c in source_captions
        ]

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], prompts: list[str], sampling: SamplingConfig) -> list[Generation]:
        """One generate() call over the batch; marks the rows that ran into max_new_tokens."""
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # per batch: transformers has no per-request seed
        output = self.model.generate(
            **inputs, max_new_tokens=self.settings.max_new_tokens, min_new_tokens=self.settings.min_new_tokens,
            pad_token_id=self.pad_id, **sampling_kwargs(sampling),
        )
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        is_eos = torch.isin(new_tokens, self.eos_ids)
        stopped = is_eos.any(dim=1)
        # tokens up to and including the first end-of-sequence; rows that never stopped used the whole budget
        lengths = torch.where(stopped, is_eos.int().argmax(dim=1) + 1, torch.full_like(stopped, new_tokens.shape[1], dtype=torch.long))
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        self.tokens_generated += int(lengths.sum())
        return [Generation(text=t, hit_token_limit=not bool(s), num_tokens=int(n))
                for t, s, n in zip(texts, stopped.tolist(), lengths.tolist())]

    def __call__(self, images: list[Image.Image], source_captions: list[str | None], metas: list[dict]) -> list[CaptionResult]:
        images = [image.convert("RGB") for image in images]
        prompts = self.prompts_for(source_captions)

        def attempt(indices: list[int], sampling: SamplingConfig) -> list[Generation]:
            return self.generate([images[i] for i in indices], [prompts[i] for i in indices], sampling)

        return caption_with_retries(len(images), attempt, self.settings.sampling_schedule(), self.settings.quality)


def build_transformers_captioner(**options) -> LlavaTransformersCaptioner:
    """The `transformers` backend: options are CaptionerSettings fields, validated (a bad one is named)."""
    from common.config import validate_config

    return LlavaTransformersCaptioner(validate_config(options, CaptionerSettings, "transformers captioner options"))
