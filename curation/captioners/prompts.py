"""Prompts for LLaVA captioning: the instruction (paper's or with the source caption), wrapped in the model's chat
format.

The instruction is model-independent; the chat format is the model's own: the processor's chat template when it
ships one (every current llava-hf checkpoint does), else a fallback chosen by the config's `model_type`.
"""
from __future__ import annotations

import re

# PixArt-alpha, Sec. 2.4: the prompt used to auto-label SAM images with LLaVA.
PAPER_PROMPT = "Describe this image and its style in a very detailed manner"
# The official captioning script's variant that quotes the image's existing caption (its `{}` is our {caption}).
SOURCE_CAPTION_PROMPT = 'Given the caption of this image "{caption}", describe this image in a very detailed manner'

IMAGE_TOKEN = "<image>"

# Chat formats of llava-hf checkpoints, for processors saved without a chat template. {instruction} is replaced.
FALLBACK_FORMATS = {
    "llava": "USER: <image>\n{instruction} ASSISTANT:",  # llava-1.5 (Vicuna)
    "llava_next": "[INST] <image>\n{instruction} [/INST]",  # llava-v1.6-mistral, the common LLaVA-NeXT
    "llava_onevision": "<|im_start|>user <image>\n{instruction}<|im_end|><|im_start|>assistant\n",  # Qwen2 chat
}

MAX_SOURCE_CAPTION_CHARS = 600


def clean_source_caption(text: str) -> str:
    """A source caption made safe to quote inside the instruction: one line, bounded, without double quotes
    (which would close the quote the template opened)."""
    text = re.sub(r"\s+", " ", text).strip().replace('"', "'")
    if len(text) > MAX_SOURCE_CAPTION_CHARS:
        text = text[:MAX_SOURCE_CAPTION_CHARS].rsplit(" ", 1)[0] + " ..."
    return text


def build_instruction(prompt: str, source_prompt: str, inject_source_caption: bool, source_caption: str | None) -> str:
    """The instruction for one image: `source_prompt` with the source caption quoted when injection is on and the
    image has a non-empty caption, else `prompt`."""
    if inject_source_caption and source_caption and source_caption.strip():
        return source_prompt.replace("{caption}", clean_source_caption(source_caption))
    return prompt


def render_chat_prompt(processor, instruction: str, model_type: str, chat_template: str | None = None) -> str:
    """The full prompt text with one image placeholder, in the model's chat format, ready for generation."""
    template = chat_template or getattr(processor, "chat_template", None)
    if template:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, chat_template=template)
    if model_type not in FALLBACK_FORMATS:
        raise ValueError(
            f"the processor has no chat template and model_type {model_type!r} has no built-in format "
            f"(known: {sorted(FALLBACK_FORMATS)}); set `chat_template` in the caption config")
    return FALLBACK_FORMATS[model_type].replace("{instruction}", instruction)
