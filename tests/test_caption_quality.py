"""Caption quality control on hand-written outputs, the retry loop on a scripted generator, the caption config
and the prompt builder."""
from __future__ import annotations

import pytest

from curation.captioners import build_captioner
from curation.captioners.config import CaptionStageConfig, QualityConfig, SamplingConfig
from curation.captioners.prompts import (PAPER_PROMPT, SOURCE_CAPTION_PROMPT, build_instruction,
                                         render_chat_prompt)
from curation.captioners.quality import (Generation, _max_consecutive_repeats, caption_with_retries, clean_caption,
                                         judge)
from common.config import ConfigError, validate_config

RULES = QualityConfig()
GOOD = ("A golden retriever lies on a wooden porch in late afternoon light. Its fur glows warm against the grey "
        "boards, and a red ball rests beside its front paws. The photograph has a soft, shallow depth of field.")


@pytest.mark.parametrize("raw, cleaned", [
    ("The image shows a red ball on a wooden table.", "A red ball on a wooden table."),
    ("The image depicts two cats asleep on a sofa.", "Two cats asleep on a sofa."),
    ("In this image, there is a dog sitting on a couch.", "A dog sitting on a couch."),
    ("In the picture, we can see a lighthouse at dusk.", "A lighthouse at dusk."),
    ("This is a photo of a mountain lake at dawn.", "A mountain lake at dawn."),
    ("The image is a close-up of a sunflower.", "A close-up of a sunflower."),
    ("The photograph captures the skyline of a city at night.", "The skyline of a city at night."),
    ("Sure! Here is a detailed description: The image features an old tram.", "An old tram."),
    ('  "A  bowl of\n\nsoup on a table."  ', "A bowl of soup on a table."),
    # only boilerplate goes: a caption that merely starts with "The image" keeps its words
    ("The image is blurry and dark.", "The image is blurry and dark."),
    ("A painting in the style of Monet.", "A painting in the style of Monet."),
])
def test_clean_caption_strips_boilerplate_openings(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_clean_caption_can_keep_openings():
    assert clean_caption("The image shows a cat.", strip_openings=False) == "The image shows a cat."


@pytest.mark.parametrize("text, hit_limit, reason", [
    ("", False, "empty"),
    ("   \n ", False, "empty"),
    ("...", False, "empty"),
    ("A cat.", False, "too_short"),
    ("I'm sorry, but I cannot describe this image.", False, "refusal"),
    ("As an AI, I am unable to see images.", False, "refusal"),
    ("%%% ### 123 456 789 !! ?? @@", False, "not_text"),
    ("A cat sitting on a mat a mat a mat a mat a mat.", False, "repetition"),
    ("The the the the the dog runs.", False, "repetition"),
    ("The dog runs across the park. The sky is blue and bright. The dog runs across the park.", False, "repetition"),
    ("A cat. hahahahahahahahahahahahaha.", False, "repetition"),
    # a cycle of 6 words: no n-gram (n <= 4) back to back, but only 6 distinct trigrams in 28
    (" ".join(["the red car and blue bus"] * 5) + ".", False, "repetition"),
    ("A woman stands in front of a large window and looks at the", True, "truncated"),
    ("A woman stands in front of a large window and looks out", False, "truncated"),  # require_sentence_end
])
def test_judge_rejects_degenerate_outputs(text, hit_limit, reason):
    assert judge(Generation(text, hit_limit), RULES) == (None, reason)


def test_judge_accepts_real_captions():
    assert judge(Generation(GOOD, False), RULES) == (GOOD, None)
    # ending at a sentence end exactly at the token limit is not a truncation
    assert judge(Generation("The image shows a red ball on a wooden table.", True), RULES) == (
        "A red ball on a wooden table.", None)
    assert judge(Generation('A sign that reads "open late."', False), RULES)[1] is None


def test_truncation_rules_are_configurable():
    lenient = QualityConfig(require_sentence_end=False)
    assert judge(Generation("A red ball on a wooden table", False), lenient) == ("A red ball on a wooden table", None)
    # hitting the token limit mid-sentence stays a truncation whatever require_sentence_end says
    assert judge(Generation("A red ball on a wooden table", True), lenient) == (None, "truncated")
    salvaging = QualityConfig(salvage_truncated=True)
    text = "A red ball rests on a wooden table. Behind it, a window opens onto a garden with"
    assert judge(Generation(text, True), salvaging) == ("A red ball rests on a wooden table.", None)
    assert judge(Generation("A red ball on", True), salvaging) == (None, "truncated")  # nothing complete to keep


def test_max_consecutive_repeats_counts_by_hand():
    assert _max_consecutive_repeats("a b c d".split()) == 1
    assert _max_consecutive_repeats("x x x y".split()) == 3
    assert _max_consecutive_repeats("go a cat a cat a cat a cat now".split()) == 4
    assert _max_consecutive_repeats("p q r s p q r s".split()) == 2
    assert _max_consecutive_repeats([]) == 1


def test_retry_loop_regenerates_only_failures_with_the_schedule():
    schedule = [SamplingConfig(temperature=0.2), SamplingConfig(temperature=0.7, seed=1),
                SamplingConfig(temperature=1.0, seed=2)]
    script = {  # image -> output per attempt
        0: [GOOD],
        1: ["A cat a cat a cat a cat a cat.", GOOD],
        2: ["", "I'm sorry, I can't help.", "A dog runs and runs and runs and"],
    }
    calls = []

    def generate(indices, sampling):
        calls.append((list(indices), sampling.temperature))
        attempt = len(calls) - 1
        return [Generation(script[i][attempt], hit_token_limit=False) for i in indices]

    results = caption_with_retries(3, generate, schedule, RULES)
    assert calls == [([0, 1, 2], 0.2), ([1, 2], 0.7), ([2], 1.0)]
    assert [(r.ok, r.text, r.reason, r.attempts) for r in results] == [
        (True, GOOD, None, 1),
        (True, GOOD, None, 2),
        (False, None, "truncated", 3),  # the last attempt's reason
    ]


def test_retry_loop_survives_a_failing_engine():
    calls = []

    def generate(indices, sampling):
        calls.append(list(indices))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return [Generation(GOOD, False) for _ in indices]

    results = caption_with_retries(2, generate, [SamplingConfig(), SamplingConfig(seed=5)], RULES)
    # the failed batch is redone image by image within the same attempt, which here succeeds
    assert calls == [[0, 1], [0], [1]] and all(r.ok and r.attempts == 1 for r in results)

    always = caption_with_retries(1, lambda i, s: 1 / 0, [SamplingConfig()], RULES)
    assert not always[0].ok and always[0].reason.startswith("error: ZeroDivisionError") and always[0].attempts == 1
    short = caption_with_retries(2, lambda i, s: [Generation(GOOD, False)], [SamplingConfig()], RULES)
    assert [r.ok for r in short] == [True, True]  # a batch answered short is redone image by image


def test_an_image_that_breaks_the_model_fails_alone():
    def generate(indices, sampling):
        if 1 in indices:
            raise ValueError("image 1 has a shape the processor rejects")
        return [Generation(GOOD, False) for _ in indices]

    results = caption_with_retries(3, generate, [SamplingConfig(), SamplingConfig(seed=1)], RULES)
    assert [(r.ok, r.attempts) for r in results] == [(True, 1), (False, 2), (True, 1)]
    assert results[1].reason == "error: ValueError: image 1 has a shape the processor rejects"


def test_sampling_schedule_repeats_the_last_retry_entry():
    cfg = CaptionStageConfig(retries=3, retry_sampling=[{"temperature": 0.5}, {"temperature": 0.9}])
    assert [s.temperature for s in cfg.sampling_schedule()] == [0.2, 0.5, 0.9, 0.9]
    assert [s.temperature for s in CaptionStageConfig(retries=0).sampling_schedule()] == [0.2]


@pytest.mark.parametrize("data, field", [
    ({"backend": "nope"}, "backend"),
    ({"source_prompt": "Describe this image"}, "source_prompt"),
    ({"sampling": {"temperature": -1}}, "sampling.temperature"),
    ({"sampling": {"top_p": 1.5}}, "sampling.top_p"),
    ({"name": "LLaVA caption"}, "name"),
    ({"max_new_tokens": 10, "min_new_tokens": 20}, "<root>"),
    ({"batch_sise": 8}, "batch_sise"),
    ({"engine": {"tensor_parallel": 2}}, "engine.tensor_parallel"),
])
def test_caption_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        validate_config(data, CaptionStageConfig, "caption.yaml")
    assert f"  {field}:" in str(err.value)


def test_captioner_options_carry_only_what_the_config_sets():
    cfg = CaptionStageConfig(backend="vllm", name="llava_next", sampling={"temperature": 0.5}, num_gpus=2,
                             concurrency=3, engine={"tensor_parallel_size": 2}, options={"extra_flag": 1})
    assert cfg.captioner_options() == {"name": "llava_next", "sampling": {"temperature": 0.5},
                                       "engine": {"tensor_parallel_size": 2}, "extra_flag": 1}
    assert CaptionStageConfig().captioner_options() == {"name": "llava"}


def test_backend_factories_reject_unknown_options_by_name():
    with pytest.raises(ConfigError, match="max_tokens"):
        build_captioner("transformers", model="unused", max_tokens=5)
    with pytest.raises(ConfigError, match="sampling.temprature"):
        build_captioner("vllm", sampling={"temprature": 0.3})


def test_instruction_uses_the_paper_prompt_or_quotes_the_source_caption():
    assert build_instruction(PAPER_PROMPT, SOURCE_CAPTION_PROMPT, False, "a dog") == PAPER_PROMPT
    assert build_instruction(PAPER_PROMPT, SOURCE_CAPTION_PROMPT, True, None) == PAPER_PROMPT
    assert build_instruction(PAPER_PROMPT, SOURCE_CAPTION_PROMPT, True, "  ") == PAPER_PROMPT
    assert build_instruction(PAPER_PROMPT, SOURCE_CAPTION_PROMPT, True, 'a "big"\n dog') == (
        "Given the caption of this image \"a 'big' dog\", describe this image in a very detailed manner")
    long = build_instruction(PAPER_PROMPT, SOURCE_CAPTION_PROMPT, True, "word " * 500)
    assert len(long) < 700 and long.count('"') == 2


class _NoTemplateProcessor:
    chat_template = None


def test_chat_format_falls_back_by_model_type():
    assert render_chat_prompt(_NoTemplateProcessor(), "Describe.", "llava") == "USER: <image>\nDescribe. ASSISTANT:"
    assert render_chat_prompt(_NoTemplateProcessor(), "Describe.", "llava_next") == "[INST] <image>\nDescribe. [/INST]"
    with pytest.raises(ValueError, match="chat_template"):
        render_chat_prompt(_NoTemplateProcessor(), "Describe.", "mystery_vlm")
