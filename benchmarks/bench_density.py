"""Concept-density throughput: captions per second per core, against the goal of 100 (11M SAM-LLaVA captions in
under an hour on 32 cores), on dense ~100-word captions.

Measured side by side, in alternating rounds so a noisy neighbour slows every variant alike (median of rounds):
  textblob      textblob's PatternTagger().tag + singularize per caption: the straightforward way (before)
  cached        curation.density.PatternNouns: the same tags, looked up once per distinct token (after)
  stage         CaptionStatsStage.analyse: screening + nouns + word counts, no tokenizer
  stage+t5tok   the same with a Rust (fast) unigram tokenizer standing in for T5's, loaded by AutoTokenizer
  nltk          NLTKNouns, only when NLTK's tagger data is installed
With --ray, the whole Ray job (read -> stage actors -> hash aggregation) on a local Ray is timed as well.

    python benchmarks/bench_density.py [--captions 2000] [--rounds 3] [--ray] [--ray-captions 20000]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.density import (  # noqa: E402
    CaptionStatsStage,
    PatternNouns,
    build_noun_extractor,
    nltk_tagger_available,
)

GOAL = 100.0  # captions/s per core

NOUNS = ("dog cat woman man child tree house car street window table chair sofa lamp book cup bottle plate bowl "
         "flower garden mountain river lake sky cloud sun beach ocean wave boat bridge road city building tower "
         "wall door roof fence grass field forest bird horse cow sheep bicycle train bus truck sign light shadow "
         "hat dress shirt jacket shoe bag umbrella phone laptop screen keyboard desk shelf painting frame mirror "
         "rug floor ceiling kitchen counter sink stove bread cake fruit apple orange banana tomato cheese coffee "
         "tea glass vase candle pillow blanket bed curtain balcony stair column statue fountain square market "
         "crowd person face hand hair eye smile snow rain fog rock stone sand path hill valley island harbor pier "
         "lighthouse castle church temple garage barn farm tractor field sunset dawn night morning background "
         "foreground texture pattern surface corner edge center side top bottom front").split()
ADJECTIVES = ("red blue green yellow white black gray brown large small tall old young wooden metal glass bright "
              "dark soft warm cold cozy busy quiet sunny cloudy wet dry smooth rough round square narrow wide "
              "distant modern ancient colorful pale golden silver ornate simple elegant rustic").split()
VERBS = "stands sits rests leans hangs lies grows shines flows waits walks runs holds carries covers surrounds".split()
PREPOSITIONS = "on in near beside behind under above across along against inside around".split()
OPENERS = ("The image shows", "This photograph captures", "In this picture we see", "The scene depicts",
           "The photo features")


def dense_captions(n: int, seed: int = 0, words: int = 100) -> list[str]:
    """~100-word LLaVA-style descriptions over a Zipf-ish vocabulary, with a few rare made-up words (long tail)."""
    rng = random.Random(seed)

    def noun() -> str:
        if rng.random() < 0.03:  # rare tokens: the long tail a real corpus has (cache misses)
            return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(5, 9)))
        word = NOUNS[min(int(rng.paretovariate(0.8)) - 1, len(NOUNS) - 1)]
        return word + "s" if rng.random() < 0.3 else word

    captions = []
    for _ in range(n):
        sentences = [f"{rng.choice(OPENERS)} a {rng.choice(ADJECTIVES)} {noun()} {rng.choice(PREPOSITIONS)} "
                     f"a {rng.choice(ADJECTIVES)} {noun()}."]
        while sum(len(s.split()) for s in sentences) < words:
            sentences.append(f"A {rng.choice(ADJECTIVES)} {noun()} {rng.choice(VERBS)} {rng.choice(PREPOSITIONS)} "
                             f"the {rng.choice(ADJECTIVES)} {noun()}, with {rng.choice(ADJECTIVES)} {noun()} and "
                             f"a {noun()} {rng.choice(PREPOSITIONS)} the {noun()}.")
        captions.append(" ".join(sentences))
    return captions


def textblob_nouns(text: str) -> list[str]:
    """The straightforward way: textblob's PatternTagger on every caption, then singularize plural nouns."""
    from textblob.en.inflect import singularize

    out = []
    for word, tag in _PATTERN_TAGGER.tag(text):
        if tag.startswith("NN"):
            lemma = (singularize(word) if tag == "NNS" else word).lower()
            if len(lemma) > 1 and any(c.isalpha() for c in lemma):  # the concept filter PatternNouns applies
                out.append(lemma)
    return out


_PATTERN_TAGGER = None


def save_fast_tokenizer(folder: Path, corpus: list[str]) -> Path:
    """A unigram (sentencepiece-style) tokenizer trained with `tokenizers`, appending </s> like T5, saved with
    save_pretrained: T5TokenizerFast is the same Rust Unigram model, so its speed stands in for T5's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=2000, special_tokens=["<pad>", "</s>",
                                                                                                   "<unk>"],
                                                                  unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                             special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def time_rounds(variants: dict, captions: list[str], rounds: int) -> dict[str, tuple[float, float]]:
    """Median (captions per CPU-second, captions per wall-second) of each variant over `rounds` alternating passes.

    CPU time (all threads of this process) is the per-core figure: on a machine shared with other jobs it is what
    a dedicated core would give, where wall time also counts the waits for a core.
    """
    cpu = {name: [] for name in variants}
    wall = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            fn(captions)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return {name: (len(captions) / statistics.median(cpu[name]), len(captions) / statistics.median(wall[name]))
            for name in variants}


def ray_job(captions: list[str], tokenizer: str, batch_size: int) -> tuple[float, float, int]:
    """(captions/s of the Ray job, seconds, stage actors) for one caption column on a local Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.density import DensityConfig, compute_stats, stats_stage
    from pipelines.job import fit_stages
    from pipelines.ray_cluster import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captions.parquet"
        pq.write_table(pa.table({"caption_llava": captions}), path, row_group_size=batch_size * 2)
        ray = init_ray()
        config = DensityConfig(sources=[{"name": "llava", "manifest": tmp, "column": "caption_llava"}],
                               output_dir=tmp, ray={"batch_size": batch_size})
        resources = fit_stages([stats_stage(config)], ray.cluster_resources(), task_cpus=1.0)["ray"]
        actors = resources["compute"].max_size
        options = {"tagger": "pattern", "tokenizer": tokenizer}
        compute_stats({"warmup": ([str(path)], "caption_llava")}, options, resources)  # actor start-up
        start = time.perf_counter()
        stats = compute_stats({"llava": ([str(path)], "caption_llava")}, options, resources)
        elapsed = time.perf_counter() - start
        ray.shutdown()
    assert stats["llava"].seen == len(captions)
    return len(captions) / elapsed, elapsed, actors


def main(argv: list[str] | None = None) -> None:
    global _PATTERN_TAGGER
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also time the Ray job end to end on a local Ray")
    parser.add_argument("--ray-captions", type=int, default=20000)
    args = parser.parse_args(argv)

    from textblob.en.taggers import PatternTagger

    _PATTERN_TAGGER = PatternTagger()
    captions = dense_captions(args.captions)
    mean_words = statistics.mean(len(c.split()) for c in captions)
    print(f"{len(captions)} dense captions, {mean_words:.0f} words each on average; one process (one core)")

    cached = PatternNouns()
    agree = sum(cached.nouns(c) == textblob_nouns(c) for c in captions[:200])
    print(f"cached pattern nouns == textblob's on {agree}/200 captions")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = str(save_fast_tokenizer(Path(tmp), captions))
        stage = CaptionStatsStage("caption", tagger="pattern")
        stage_tok = CaptionStatsStage("caption", tagger="pattern", tokenizer=tokenizer_dir)
        variants = {
            "textblob": lambda cs: [textblob_nouns(c) for c in cs],
            "cached": lambda cs: [cached.nouns(c) for c in cs],
            "stage": stage.analyse,
            "stage+t5tok": lambda cs: [stage_tok.analyse(cs[i:i + 1024]) for i in range(0, len(cs), 1024)],
        }
        if nltk_tagger_available():
            nltk_nouns = build_noun_extractor("nltk")
            variants["nltk"] = lambda cs: [nltk_nouns.nouns(c) for c in cs]
        cold = PatternNouns()
        start = time.process_time()
        for caption in captions:
            cold.nouns(caption)
        cold_rate = len(captions) / (time.process_time() - start)
        rates = time_rounds(variants, captions, args.rounds)
        base = rates["textblob"][0]

        print(f"\n{'variant':<14}{'captions/s/core':>16}{'(wall)':>9}{'vs textblob':>13}{'vs goal 100/s':>15}")
        for name, (rate, wall_rate) in rates.items():
            print(f"{name:<14}{rate:>16,.0f}{wall_rate:>9,.0f}{rate / base:>12.1f}x{rate / GOAL:>14.1f}x")
        print(f"{'cached, cold':<14}{cold_rate:>16,.0f}{'':>9}{cold_rate / base:>12.1f}x{cold_rate / GOAL:>14.1f}x"
              "   (first pass, empty token cache)")
        print("captions/s/core = captions per CPU-second of this process; (wall) = per elapsed second")
        if "nltk" not in rates:
            print("nltk: not measured (NLTK tagger data not installed)")
        minutes = 11e6 / (rates["stage+t5tok"][0] * 32) / 60
        print(f"\n11M SAM-LLaVA captions on 32 cores at the stage+t5tok rate: {minutes:.1f} min (goal: under 60 min)")

        if args.ray:
            job_captions = dense_captions(args.ray_captions, seed=1)
            rate, elapsed, actors = ray_job(job_captions, tokenizer_dir, batch_size=1024)
            print(f"\nRay job, local, {actors} stage actor(s): {len(job_captions):,} captions in {elapsed:.1f} s wall = "
                  f"{rate:,.0f} captions/s ({rate / actors:,.0f} per actor; in-process stage+t5tok, wall: "
                  f"{rates['stage+t5tok'][1]:,.0f}/s, ratio {rate / actors / rates['stage+t5tok'][1]:.2f})")


if __name__ == "__main__":
    main()
