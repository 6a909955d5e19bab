"""LLaVA captioning with transformers: any llava-hf checkpoint (LLaVA-1.5, LLaVA-NeXT, OneVision) on a GPU or CPU.

`AutoModelForImageTextToText` picks the class from the checkpoint's `model_type` (LlavaForConditionalGeneration,
LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration) and `AutoProcessor` its processor, so
images are preprocessed exactly as the model was trained to see them. Built by
`build_captioner("transformers", model=..., ...)`; options are CaptionerSettings fields.

`save_random_llava` writes a random-init LLaVA of a preset's size (a tiny one, or llava-1.5-7b's shapes) with an
offline-trained tokenizer, for tests, benchmarks and smoke runs on machines without the real weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from curation.captioners.base import CaptionResult, Captioner
from curation.captioners.config import CaptionerSettings, SamplingConfig
from curation.captioners.prompts import IMAGE_TOKEN, build_instruction, render_chat_prompt
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


# --- random-init models ----------------------------------------------------------------------------------------

# Shapes of a LLaVA-1.5 model: CLIP ViT vision tower + MLP projector + Llama language model.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image_size=32, patch_size=8,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512),
        vocab_size=512,
    ),
    "small": dict(
        image_size=224, patch_size=14,
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=2048),
        vocab_size=2048,
    ),
    "llava-1.5-7b": dict(  # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B
        image_size=336, patch_size=14,
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    projection_dim=768),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096),
        vocab_size=32064,
    ),
}

# llava-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as a chat template.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_TOKENIZER_CORPUS = [
    "USER: ASSISTANT: Describe this image and its style in a very detailed manner.",
    "Given the caption of this image, describe this image in a very detailed manner.",
    "The image shows a red ball on a wooden table. A dog sits on a green lawn under a blue sky.",
    "A photograph of a city street at night, with cars, people, lights and tall buildings.",
    "In this image, there is a woman holding an umbrella in the rain, painted in a soft watercolor style.",
]


def build_offline_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a few sentences (no download), with Llama's special tokens and
    LLaVA's <image> token; ids past the learned vocabulary decode to nothing, so any model vocab size works."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1000), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def random_llava(preset: str = "tiny", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0):
    """(model, processor): a random-init LlavaForConditionalGeneration of a preset's shapes, with its processor."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    if preset not in PRESETS:
        raise ValueError(f"unknown LLaVA preset {preset!r}; known: {sorted(PRESETS)}")
    shape = PRESETS[preset]
    tokenizer = build_offline_tokenizer(shape["vocab_size"])
    size = shape["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=shape["patch_size"],
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_15_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=size, patch_size=shape["patch_size"], **shape["vision"]),
        text_config=LlamaConfig(vocab_size=shape["vocab_size"], pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                **shape["text"]),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(size // shape["patch_size"]) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # built in place, in its dtype: a 7B model never exists in float32 on the host
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def save_random_llava(folder: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-init LLaVA and its processor with save_pretrained; load it like any llava-hf checkpoint."""
    folder = Path(folder)
    model, processor = random_llava(preset, seed=seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
