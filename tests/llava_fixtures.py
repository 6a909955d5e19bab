"""Random-init LLaVA models for tests, benchmarks and smoke runs on machines without the real weights.

`save_random_llava` writes a random-init LlavaForConditionalGeneration of a preset's size (a tiny one, or
llava-1.5-7b's shapes) with an offline-trained tokenizer and its processor, through save_pretrained: the captioner
then loads it by path like any llava-hf checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from curation.captioners.prompts import IMAGE_TOKEN

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
