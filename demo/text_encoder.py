"""A small T5 text encoder for the scene language, made offline and saved like a real one.

PixArt conditions on T5 features. No T5 checkpoint can be downloaded on an offline machine, so the demo saves a
random-init `T5EncoderModel` with `save_pretrained`, plus a word-level tokenizer trained with `tokenizers` on the
scene captions and wrapped as a `PreTrainedTokenizerFast`. Curation and sampling then load the folder through
`common.pretrained.load_text_encoder`, the same path a real `DeepFloyd/t5-v1_1-xxl` takes.

A random encoder is enough here: its features are a fixed, injective-enough function of the words (T5's residual
stream keeps each token's embedding), and the diffusion model learns to read them, which is all the demo asks.

One deliberate choice: the scale of its output (the final RMS norm's weight, `output_scale`). PixArt initializes
its caption projection with N(0, 0.02) weights whatever the widths, so at toy widths (64 -> 144 instead of
4096 -> 1152) unit-scale features come out of the projection several times weaker, relative to the rest of the
network, than T5-XXL's do in the full model, and cross-attention takes thousands of steps to start listening.
Features of RMS 8 restore roughly the full model's caption-embedding scale.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from demo.scenes import (BACKGROUNDS, COLOURS, POSITION_PHRASES, SHAPES, SIZES, SceneSampler,
                                       dense_caption, sparse_caption)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # T5's special tokens, with T5's ids 0 and 1 for pad and eos


def scene_vocabulary() -> list[str]:
    """Every word the scene captions use (colours, shapes, sizes, position phrases, glue words)."""
    words: set[str] = set(COLOURS) | set(SHAPES) | set(SIZES) | set(BACKGROUNDS)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    words.update({"a", "and", "on", "background", ","})
    return sorted(words)


def train_word_tokenizer(corpus: Iterable[str]):
    """A lower-casing word-level tokenizer (punctuation split off) that appends </s> as T5 does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, EOS, UNK], min_frequency=1)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=512)


def save_scene_text_encoder(folder: str | Path, width: int = 64, layers: int = 2, heads: int = 4,
                            output_scale: float = 8.0, seed: int = 0) -> Path:
    """Train the tokenizer on the scene language, build a random-init T5 encoder of `width` whose features have
    RMS `output_scale`, save both to `folder` with save_pretrained. Deterministic for a seed."""
    import torch
    from transformers import T5Config, T5EncoderModel

    sampler = SceneSampler(seed=seed, held_out=frozenset())
    corpus = [" ".join(scene_vocabulary())]
    for scene in sampler.scenes(500):
        corpus += [dense_caption(scene), sparse_caption(scene)]
    tokenizer = train_word_tokenizer(corpus)

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=width // heads, d_ff=2 * width,
                      num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.fill_(output_scale)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
