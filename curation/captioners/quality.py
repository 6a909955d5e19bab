"""Caption quality control: clean a generated caption, decide whether it is usable, retry the ones that are not.

A captioner backend only has to turn (images, prompts, sampling) into raw generations; `caption_with_retries`
does the rest the same way for every backend: clean, check, regenerate the failures with the next sampling of the
schedule, and record each image's outcome (caption or the reason it has none) and how many attempts it took.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from curation.captioners.base import CaptionResult
from curation.captioners.config import QualityConfig, SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One raw model output."""

    text: str
    hit_token_limit: bool  # generation stopped at max_new_tokens, not at an end-of-sequence token
    num_tokens: int = 0  # tokens generated (for throughput figures)
    error: str | None = None  # the engine failed this request; text is then meaningless


# Reasons a caption is rejected (the `reason` column); engine and input failures add their own.
EMPTY, TOO_SHORT, REFUSAL, NOT_TEXT, REPETITION, TRUNCATED = (
    "empty", "too_short", "refusal", "not_text", "repetition", "truncated")

_SUBJECT = r"(?:image|picture|photo|photograph|scene|artwork|painting|illustration|drawing|frame|shot)"
_VERB = (r"(?:shows|depicts|features|displays|captures|presents|portrays|showcases|illustrates|contains|"
         r"is of|is an image of|appears to (?:show|be)|is)")
# Openings that describe the act of looking rather than the image ("The image shows", "In this image, there is",
# "Sure! Here is a detailed description:"). They repeat across millions of captions and teach the model nothing.
_OPENINGS = [
    re.compile(r"^(?:sure|certainly|of course)[,.!]?\s+(?:here(?: is|'s)[^:.]*[:.])?\s*", re.I),
    re.compile(r"^here(?: is|'s) (?:a|the) (?:detailed )?description[^:.]*[:.]\s*", re.I),
    re.compile(rf"^(?:in|within|on) (?:this|the) {_SUBJECT},?\s+(?:(?:we|you) can see|there (?:is|are)|we see)?\s*", re.I),
    re.compile(rf"^(?:the|this) {_SUBJECT} {_VERB}\s+(?=(?:a|an|the|two|three|several|many|some)\b)", re.I),
    re.compile(rf"^(?:the|this) {_SUBJECT} (?:shows|depicts|features|displays|captures|presents|portrays|showcases|"
               rf"illustrates|contains)\s+", re.I),
    re.compile(rf"^this is (?:an?|the) {_SUBJECT} (?:of|showing|depicting)\s+", re.I),
]
_REFUSAL = re.compile(r"^(?:i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i am unable|i'm unable|as an ai)\b", re.I)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_CHAR_LOOP = re.compile(r"(.{1,4}?)\1{7,}", re.S)  # "!!!!!!!!", "hahahahahahahaha"


def clean_caption(text: str, strip_openings: bool = True) -> str:
    """One paragraph, no surrounding quotes, no boilerplate opening, first letter capitalised."""
    text = re.sub(r"\s+", " ", text).strip().strip('"').strip()
    if strip_openings:
        changed = True
        while changed and text:  # openings stack: "Sure! Here is a description: In this image, there is ..."
            changed = False
            for pattern in _OPENINGS:
                stripped = pattern.sub("", text, count=1)
                if stripped != text:
                    text, changed = stripped.strip(), True
    return text[:1].upper() + text[1:]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _max_consecutive_repeats(words: Sequence[str], max_n: int = 4) -> int:
    """The most times any n-gram (n <= max_n) occurs back to back, e.g. 4 for "a cat a cat a cat a cat"."""
    best = 1
    for n in range(1, max_n + 1):
        i = 0
        while i + 2 * n <= len(words):
            count = 1
            while words[i + count * n : i + (count + 1) * n] == words[i : i + n]:
                count += 1
            best = max(best, count)
            i += n * (count - 1) + 1 if count > 1 else 1
    return best


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def repetition_problem(text: str, rules: QualityConfig) -> bool:
    """True for degenerate repetition: a phrase looping, a sentence said twice, too few distinct trigrams."""
    if _CHAR_LOOP.search(text):
        return True
    words = _words(text)
    if _max_consecutive_repeats(words) > rules.max_consecutive_repeats:
        return True
    long_sentences = [" ".join(_words(s)) for s in _sentences(text) if len(_words(s)) >= 5]
    if any(count > 1 for count in Counter(long_sentences).values()):
        return True
    if len(words) >= 20:
        trigrams = list(zip(words, words[1:], words[2:]))
        if len(set(trigrams)) / len(trigrams) < rules.min_distinct_trigram_ratio:
            return True
    return False


def salvage(text: str, rules: QualityConfig) -> str | None:
    """The complete sentences of a truncated caption, if they still make a caption."""
    complete = _sentences(text)
    if complete and not _SENTENCE_END.search(complete[-1]):
        complete = complete[:-1]
    kept = " ".join(complete)
    return kept if len(_words(kept)) >= rules.min_words else None


def judge(generation: Generation, rules: QualityConfig) -> tuple[str | None, str | None]:
    """(cleaned caption, None) when the generation is usable, else (None, reason)."""
    if generation.error:
        return None, generation.error
    text = clean_caption(generation.text, rules.strip_openings)
    words = _words(text)
    if not words:
        return None, EMPTY
    if rules.reject_refusals and _REFUSAL.search(text):
        return None, REFUSAL
    letters = sum(ch.isalpha() for ch in text)
    if letters / max(1, sum(not ch.isspace() for ch in text)) < rules.min_alpha_ratio:
        return None, NOT_TEXT
    if repetition_problem(text, rules):
        return None, REPETITION
    ends_sentence = bool(_SENTENCE_END.search(text))
    if not ends_sentence and (generation.hit_token_limit or rules.require_sentence_end):
        if rules.salvage_truncated and (kept := salvage(text, rules)):
            return kept, None
        return None, TRUNCATED
    if len(words) < rules.min_words:
        return None, TOO_SHORT
    return text, None


GenerateFn = Callable[[list[int], SamplingConfig], list[Generation]]


def _failed(err: Exception) -> Generation:
    return Generation("", False, error=f"error: {type(err).__name__}: {err}"[:300])


def generate_isolated(generate: GenerateFn, indices: list[int], sampling: SamplingConfig) -> list[Generation]:
    """`generate` over the batch; if it raises, image by image, so an image that breaks the model (or the
    processor) fails alone and the rest of the batch is still captioned."""
    try:
        generations = generate(indices, sampling)
        if len(generations) != len(indices):
            raise RuntimeError(f"backend returned {len(generations)} generations for {len(indices)} requests")
        return generations
    except Exception as err:  # noqa: BLE001 - recorded per image, logged once per batch
        log.warning("caption generation failed for a batch of %d: %s: %s", len(indices), type(err).__name__, err)
        if len(indices) == 1:
            return [_failed(err)]
    out = []
    for index in indices:
        try:
            [generation] = generate([index], sampling)
        except Exception as err:  # noqa: BLE001
            generation = _failed(err)
        out.append(generation)
    return out


def caption_with_retries(count: int, generate: GenerateFn, schedule: Sequence[SamplingConfig],
                         rules: QualityConfig) -> list[CaptionResult]:
    """Caption `count` images: attempt k regenerates, with `schedule[k - 1]`, only the images still failing.

    `generate(indices, sampling)` returns one Generation per index. An exception from it fails the attempt for
    the images that cause it (reason `error: ...`), not the job: the next attempt may succeed, and if none does
    the images are recorded as failed instead of lost.
    """
    results = [CaptionResult(text=None, ok=False, reason="not attempted", attempts=0) for _ in range(count)]
    pending = list(range(count))
    for sampling in schedule:
        if not pending:
            break
        generations = generate_isolated(generate, pending, sampling)
        still_failing = []
        for index, generation in zip(pending, generations):
            text, reason = judge(generation, rules)
            results[index] = CaptionResult(text=text, ok=text is not None, reason=reason,
                                           attempts=results[index].attempts + 1)
            if text is None:
                still_failing.append(index)
        pending = still_failing
    return results
