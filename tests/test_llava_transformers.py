"""The transformers LLaVA backend end to end: a tiny LLaVA (tiny CLIP vision tower + tiny Llama, an offline-trained
BPE tokenizer with <image>, a CLIPImageProcessor, in a LlavaProcessor) saved with save_pretrained and loaded back
through build_captioner, the path a user's run takes, captioning real photographs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from curation.captioners import build_captioner
from curation.captioners.config import SamplingConfig
from tests.llava_fixtures import random_llava, save_random_llava
from curation.captioners.prompts import PAPER_PROMPT, SOURCE_CAPTION_PROMPT, build_instruction, render_chat_prompt
from common.pretrained import MissingModelError
from tests.conftest import PHOTOS

# What the taught model says about any image, and the caption quality control makes of it.
TAUGHT_CAPTION = "The image shows a red ball on a wooden table."
CLEANED_CAPTION = "A red ball on a wooden table."


def save_taught_tiny_llava(folder: Path, caption: str = TAUGHT_CAPTION, steps: int = 80) -> Path:
    """A tiny random-init LLaVA trained for a few steps to answer `caption` to the paper's prompt (with or without
    an injected source caption), saved with save_pretrained: a weight-free model whose output is known."""
    torch.manual_seed(0)
    model, processor = random_llava("tiny")
    processor.tokenizer.padding_side = "left"
    photos = sorted(PHOTOS.glob("*.jpg"))[:2]
    images = [Image.open(p).convert("RGB") for p in photos]
    prompts = [render_chat_prompt(processor, build_instruction(PAPER_PROMPT, SOURCE_CAPTION_PROMPT, True, c), "llava")
               for c in (None, "a dog")]
    eos = processor.tokenizer.eos_token
    full = processor(images=images, text=[f"{p} {caption}{eos}" for p in prompts], return_tensors="pt", padding=True)
    prompt_len = processor(images=images, text=prompts, return_tensors="pt", padding=True).input_ids.shape[1]
    labels = full.input_ids.clone()
    labels[:, :prompt_len] = -100  # left padding: every row's answer occupies the last positions
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**full, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"the tiny model did not learn its caption (loss {loss.item():.3f})"
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def taught_dir(tmp_path_factory) -> Path:
    return save_taught_tiny_llava(tmp_path_factory.mktemp("taught_llava"))


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return save_random_llava(tmp_path_factory.mktemp("random_llava"), "tiny")


@pytest.fixture(scope="module")
def photos(photos_dir) -> list[Image.Image]:
    return [Image.open(p) for p in sorted(photos_dir.glob("*.jpg"))]


def test_captions_real_photos_through_from_pretrained(taught_dir, photos):
    captioner = build_captioner("transformers", model=str(taught_dir), max_new_tokens=32, device="cpu")
    assert type(captioner.model).__name__ == "LlavaForConditionalGeneration"  # chosen from config.model_type
    results = captioner(photos, [None] * len(photos), [{}] * len(photos))
    assert [(r.text, r.ok, r.reason, r.attempts) for r in results] == [(CLEANED_CAPTION, True, None, 1)] * len(photos)
    # generated tokens, counted independently: the answer as the tokenizer splits it, plus end-of-sequence
    answer = captioner.processor.tokenizer(f" {TAUGHT_CAPTION}</s>", add_special_tokens=False).input_ids
    assert captioner.tokens_generated == len(photos) * len(answer)


def test_provenance_names_model_prompt_and_sampling(taught_dir):
    captioner = build_captioner("transformers", model=str(taught_dir), sampling={"temperature": 0.3}, retries=1,
                                max_new_tokens=40)
    p = captioner.provenance()
    assert p["model"] == str(taught_dir) and p["model_type"] == "llava" and p["backend"] == "transformers"
    assert p["prompt_template"] == PAPER_PROMPT and p["source_prompt_template"] is None
    assert p["max_new_tokens"] == 40 and p["dtype"] == "float32"
    assert [s["temperature"] for s in p["sampling_schedule"]] == [0.3, 0.7]


def test_source_caption_goes_into_the_prompt(taught_dir, photos):
    captioner = build_captioner("transformers", model=str(taught_dir), inject_source_caption=True, max_new_tokens=32)
    prompts = captioner.prompts_for(["a dog on grass", None])
    assert prompts[0] == ('USER: <image>\nGiven the caption of this image "a dog on grass", describe this image '
                          'in a very detailed manner ASSISTANT:')
    assert prompts[1] == f"USER: <image>\n{PAPER_PROMPT} ASSISTANT:"
    results = captioner(photos[:2], ["a dog on grass", None], [{}, {}])
    assert all(r.ok and r.text == CLEANED_CAPTION for r in results)


def test_batched_generation_matches_one_image_at_a_time_and_plain_transformers(random_dir, photos):
    """Left padding done right: a batch of differently-prompted images gives each image the text it gets alone,
    and the same text as calling the model's generate() directly (the reference implementation)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    captioner = build_captioner("transformers", model=str(random_dir), max_new_tokens=8)
    greedy = SamplingConfig(temperature=0)
    prompts = captioner.prompts_for(["a dog", None, "a long source caption about groceries", None])
    images = [p.convert("RGB") for p in photos]
    batched = captioner.generate(images, prompts, greedy)
    alone = [captioner.generate([image], [prompt], greedy)[0] for image, prompt in zip(images, prompts)]
    assert [g.text for g in batched] == [g.text for g in alone]

    model = LlavaForConditionalGeneration.from_pretrained(random_dir).eval()
    processor = AutoProcessor.from_pretrained(random_dir)
    inputs = processor(images=images[1], text=prompts[1], return_tensors="pt")
    reference = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = processor.batch_decode(reference[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)[0]
    assert batched[1].text == expected


def test_fixed_token_count_and_truncation(random_dir, photos):
    """min_new_tokens = max_new_tokens generates exactly that many tokens (the benchmark's fixed workload); a
    generation cut by the limit is flagged, and a caption that never passes uses every attempt."""
    fixed = build_captioner("transformers", model=str(random_dir), max_new_tokens=6, min_new_tokens=6, retries=2)
    images = [p.convert("RGB") for p in photos[:2]]
    generations = fixed.generate(images, fixed.prompts_for([None, None]), SamplingConfig())
    assert [(g.hit_token_limit, g.num_tokens) for g in generations] == [(True, 6), (True, 6)]
    results = fixed(photos[:2], [None, None], [{}, {}])
    # random tokens: unreadable, looping or cut mid-sentence, whichever rule sees it first; never a caption
    assert all(not r.ok and r.reason in {"truncated", "not_text", "repetition", "empty", "too_short"}
               and r.attempts == 3 for r in results)
    assert fixed.tokens_generated == 2 * 6 + 2 * 3 * 6


def test_odd_image_modes_and_sizes(taught_dir, photos):
    captioner = build_captioner("transformers", model=str(taught_dir), max_new_tokens=32)
    odd = [photos[0].convert("L"), photos[1].convert("RGBA"), photos[2].resize((300, 40)), photos[3].convert("P")]
    assert all(r.ok and r.text == CLEANED_CAPTION for r in captioner(odd, [None] * 4, [{}] * 4))


def save_tiny_llava_next(folder: Path) -> Path:
    """A tiny random-init LLaVA-NeXT (any-resolution tiling) with its processor, saved with save_pretrained."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    from tests.llava_fixtures import LLAVA_15_CHAT_TEMPLATE, PRESETS, build_offline_tokenizer

    torch.manual_seed(0)
    tiny = PRESETS["tiny"]
    tokenizer = build_offline_tokenizer(tiny["vocab_size"])
    pinpoints = [[32, 32], [32, 64], [64, 32]]  # the tiles a picture may be cut into, by its aspect ratio
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, **tiny["vision"]),
        text_config=LlamaConfig(vocab_size=tiny["vocab_size"], pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **tiny["text"]),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints)
    LlavaNextForConditionalGeneration(config).save_pretrained(folder)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=LLAVA_15_CHAT_TEMPLATE).save_pretrained(folder)
    return folder


def test_llava_next_checkpoints_load_their_own_class(tmp_path, photos):
    captioner = build_captioner("transformers", model=str(save_tiny_llava_next(tmp_path)), max_new_tokens=5,
                                min_new_tokens=5, retries=0)
    assert type(captioner.model).__name__ == "LlavaNextForConditionalGeneration"
    images = [photos[0].convert("RGB"), photos[2].convert("RGB").resize((300, 100))]  # different tilings
    generations = captioner.generate(images, captioner.prompts_for([None, "wide"]), SamplingConfig(temperature=0))
    assert [(g.num_tokens, g.hit_token_limit) for g in generations] == [(5, True), (5, True)]
    assert captioner.provenance()["model_type"] == "llava_next"


def test_missing_model_says_what_to_set(tmp_path):
    with pytest.raises(MissingModelError, match="caption.model"):
        build_captioner("transformers", model=str(tmp_path / "no_such_model"))
