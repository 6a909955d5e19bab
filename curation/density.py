"""Concept density of captions: the noun statistics of PixArt-alpha's Table 1, and caption-length statistics.

PixArt-alpha (arXiv 2310.00426, Table 1) compares caption datasets by the nouns their captions mention: distinct
nouns (DN), valid distinct nouns (VN: nouns seen more than 10 times), VN/DN, total nouns and nouns per image. Nouns
are found by part-of-speech tagging (NLTK's tagger, the paper's method, when its data is installed; otherwise the
pattern tagger that ships inside textblob) and lemmatized, so "dogs" and "dog" are one concept.

Everything here is plain Python: `CaptionStatsStage` turns a batch of captions into pre-aggregated
(kind, key, count) rows, and `DensityStats` adds such rows up. Any engine can run the stage and sum its rows by
(kind, key) (pipelines/density.py does it with Ray Data); `analyse_source` does it in-process.
"""
from __future__ import annotations

import functools
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Protocol, Sequence

import numpy as np

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
DEFAULT_VALID_THRESHOLD = 10  # PixArt-alpha: a valid noun appears more than 10 times
DEFAULT_MAX_WORDS = 1000
DEFAULT_MIN_ENGLISH_SHARE = 0.5

TaggerChoice = Literal["auto", "nltk", "pattern"]

# The kinds of rows the stage emits; see CaptionStatsStage.
KINDS = ("noun", "words", "tokens", "nouns_per_caption", "rejected")

_HAS_LETTER = re.compile(r"[^\W\d_]")
_WORD = re.compile(r"[^\W\d_]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CHARS_PER_WORD = 20  # English words average about 5 characters; 20 leaves room for URLs and long names
_MISS = object()
# Per-token caches are bounded: a corpus of tens of millions of captions has millions of rare tokens.
_CACHE_LIMIT = 1_000_000


def _is_concept(lemma: str) -> bool:
    # A noun lemma names a concept only if it has a letter and more than one character: textblob's tokenizer
    # splits "don't" into "n", "'", "t", which its tagger then calls nouns.
    return len(lemma) > 1 and _HAS_LETTER.search(lemma) is not None


class TaggerUnavailable(RuntimeError):
    """The requested tagger cannot run here; the message says what to install or choose instead."""


# --------------------------------------------------------------------------------------------------------------
# Noun extraction


class NounExtractor(Protocol):
    tagger: str  # human-readable: which tagger and which lexicon/model
    lemmatizer: str

    def nouns(self, text: str) -> list[str]:
        """The noun lemmas of `text`, in order, with repeats."""
        ...


@functools.lru_cache(maxsize=1)
def _pattern_lexicon() -> dict[str, str]:
    """Word -> most frequent Penn tag, the lexicon of textblob's bundled pattern tagger (en-lexicon.txt).
    Loaded once per process and shared read-only by the tagger and the language screen."""
    from textblob.en import lexicon

    lexicon.get("the")  # a lazydict: the first lookup loads the file
    return dict(lexicon)


class PatternNouns:
    """Nouns by textblob's PatternTagger, computed per distinct token instead of per occurrence.

    textblob's pattern parser tags a token from the lexicon (the sentence's first token may also be looked up in
    lower case) and tags unknown tokens by capitalization, digits and suffix rules; textblob applies no contextual
    rules. A token's tag therefore depends only on the token and on whether it opens a sentence, so caching it
    changes nothing but speed: `nouns()` agrees exactly with `PatternTagger().tag()` (tests check this).
    Plural nouns (NNS) are lemmatized by pattern's `singularize`, as pattern's own lemmatizer does.
    """

    tagger = "pattern (textblob PatternTagger: bundled Brill lexicon + suffix rules, offline)"
    lemmatizer = "pattern singularize (plural nouns), lower-cased"

    def __init__(self) -> None:
        from textblob.en import parser
        from textblob.en.inflect import singularize
        from textblob._text import CD, _suffix_rules

        self._lexicon = _pattern_lexicon()
        self._find_tokens = parser.find_tokens
        self._singularize = singularize
        self._cd = CD
        self._suffix_rules = _suffix_rules
        self._first: dict[str, str | None] = {}  # sentence-initial token -> lemma (None: not a noun)
        self._rest: dict[str, str | None] = {}

    def tag(self, token: str, first: bool) -> str:
        """The Penn tag textblob's pattern tagger gives `token` (first: it opens a sentence)."""
        tag = self._lexicon.get(token) or (first and self._lexicon.get(token.lower())) or None
        if tag is None:
            if token.istitle():
                tag = "NNP"
            elif self._cd.match(token):
                tag = "CD"
            else:
                tag = self._suffix_rules([token, "NN"])[1]
        return tag

    def _lemma(self, token: str, first: bool) -> str | None:
        tag = self.tag(token, first)
        if tag not in NOUN_TAGS:
            return None
        lemma = (self._singularize(token) if tag == "NNS" else token).lower()
        return lemma if _is_concept(lemma) else None

    def tokens(self, text: str) -> Iterator[tuple[str, bool]]:
        """(token, opens_sentence) in textblob's tokenization."""
        for sentence in self._find_tokens(text):
            first = True
            for token in sentence.split(" "):
                yield token, first
                first = False

    def nouns(self, text: str) -> list[str]:
        out = []
        first_cache, rest_cache = self._first, self._rest
        for token, first in self.tokens(text):
            cache = first_cache if first else rest_cache
            lemma = cache.get(token, _MISS)
            if lemma is _MISS:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                lemma = cache[token] = self._lemma(token, first)
            if lemma:
                out.append(lemma)
        return out


def nltk_tagger_available() -> bool:
    """True when NLTK and its averaged-perceptron English tagger data are installed."""
    try:
        import nltk

        nltk.data.find("taggers/averaged_perceptron_tagger_eng/")
        return True
    except (ImportError, LookupError):
        return False


def _nltk_has(resource: str) -> bool:
    import nltk

    try:
        nltk.data.find(resource)
        return True
    except LookupError:
        return False


class NLTKNouns:
    """Nouns by NLTK's averaged-perceptron tagger (`nltk.pos_tag`'s model, the paper's method).

    Tokens are `nltk.word_tokenize`'s (sentence split by punkt when its data is installed). Nouns are lemmatized by
    the WordNet lemmatizer when WordNet is installed, by pattern's `singularize` otherwise.
    """

    lemmatizer: str

    def __init__(self) -> None:
        try:
            from nltk.tag.perceptron import PerceptronTagger
            from nltk.tokenize import NLTKWordTokenizer
        except ImportError as err:
            raise TaggerUnavailable(f"NLTK is not installed ({err}); `pip install nltk` or set tagger: pattern") from None
        try:
            # One tagger for the worker's lifetime: nltk.pos_tag would reload the model JSON on every call.
            self._tagger = PerceptronTagger()
        except LookupError:
            raise TaggerUnavailable(
                "NLTK's tagger data 'averaged_perceptron_tagger_eng' is not installed; run "
                "`python -m nltk.downloader averaged_perceptron_tagger_eng` (NLTK_DATA sets where) or set tagger: pattern"
            ) from None
        self._word_tokenizer = NLTKWordTokenizer()
        # NLTK's word tokenizer splits off only a text's final period, so sentences are split first: by punkt when
        # its data is installed (as nltk.word_tokenize does), else at sentence-ending punctuation.
        if _nltk_has("tokenizers/punkt_tab/english/"):
            from nltk.tokenize import sent_tokenize

            self._sentences = sent_tokenize
        else:
            self._sentences = _SENTENCE_END.split
        if _nltk_has("corpora/wordnet"):
            from nltk.stem import WordNetLemmatizer

            wordnet = WordNetLemmatizer()
            self._lemmatize = lambda word, tag: wordnet.lemmatize(word, "n")
            self.lemmatizer = "NLTK WordNet lemmatizer (nouns), lower-cased"
        else:
            from textblob.en.inflect import singularize

            self._lemmatize = lambda word, tag: singularize(word) if tag == "NNS" else word
            self.lemmatizer = "pattern singularize (plural nouns), lower-cased; NLTK WordNet data not installed"
        self.tagger = "nltk (averaged perceptron, averaged_perceptron_tagger_eng)"
        self._lemmas: dict[tuple[str, str], str | None] = {}

    def nouns(self, text: str) -> list[str]:
        out = []
        for sentence in self._sentences(text):
            for token, tag in self._tagger.tag(self._word_tokenizer.tokenize(sentence)):
                if tag not in NOUN_TAGS:
                    continue
                lemma = self._lemmas.get((token, tag), _MISS)
                if lemma is _MISS:
                    if len(self._lemmas) >= _CACHE_LIMIT:
                        self._lemmas.clear()
                    lemma = self._lemmatize(token.lower(), tag).lower()
                    lemma = self._lemmas[token, tag] = lemma if _is_concept(lemma) else None
                if lemma:
                    out.append(lemma)
        return out


def build_noun_extractor(choice: TaggerChoice = "auto") -> NounExtractor:
    """`auto`: NLTK when its tagger data is installed, else the offline pattern tagger. `nltk` fails with
    TaggerUnavailable when NLTK cannot run; `pattern` always works (its lexicon ships inside textblob)."""
    if choice == "pattern" or (choice == "auto" and not nltk_tagger_available()):
        return PatternNouns()
    if choice in ("auto", "nltk"):
        return NLTKNouns()
    raise ValueError(f"tagger must be one of auto, nltk, pattern; got {choice!r}")


# --------------------------------------------------------------------------------------------------------------
# Screening bad captions


class CaptionScreen:
    """Decides whether a caption can be analysed; otherwise names why not.

    Reasons: `missing` (null), `not_text`, `empty`, `too_long` (more than `max_words` words, or 20 characters per
    allowed word: a caption model's repetition loop or pasted junk, not a description), `non_english` (mostly non-Latin letters, or fewer than `min_english_share`
    of its words in the English lexicon; names and words in capitals the lexicon tags as proper nouns are not
    counted either way, and captions with fewer than three judgeable words are given the benefit of the doubt).
    """

    def __init__(self, max_words: int = DEFAULT_MAX_WORDS, min_english_share: float = DEFAULT_MIN_ENGLISH_SHARE,
                 lexicon: dict[str, str] | None = None) -> None:
        self.max_words = max_words
        self.min_english_share = min_english_share
        self._lexicon = lexicon if lexicon is not None else _pattern_lexicon()

    def reason(self, text: object) -> str | None:
        """None when `text` should be analysed, else the rejection reason."""
        if text is None:
            return "missing"
        if not isinstance(text, str):
            return "not_text"
        if not text.strip():
            return "empty"
        # Characters too: one 200k-character "word" is no more a caption than 5000 words are.
        if len(text) > self.max_words * _CHARS_PER_WORD or len(text.split()) > self.max_words:
            return "too_long"
        if not self.is_english(text):
            return "non_english"
        return None

    def is_english(self, text: str) -> bool:
        words = _WORD.findall(text)
        letters = sum(map(len, words))
        if letters == 0:
            return True  # digits and symbols only: nothing to call foreign
        if sum(len(w) for w in words if w.isascii()) < 0.5 * letters:
            return False  # mostly non-Latin script (CJK, Cyrillic, Arabic, ...)
        judged = english = 0
        for word in words:
            tag = self._lexicon.get(word.lower()) or self._lexicon.get(word)
            if tag in ("NNP", "NNPS"):
                continue
            judged += 1
            english += tag is not None and tag != "FW"
        return judged < 3 or english >= self.min_english_share * judged


# --------------------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class DensityStats:
    """Additive statistics of one caption source; `merge` and `from_rows` make any split of the work sum exactly.

    Every analysed caption adds one to `words` (at its word count), one to `nouns_per_caption`, and one to `tokens`
    when a tokenizer is configured; every other caption adds one to `rejected` under its reason.
    """

    nouns: Counter = field(default_factory=Counter)  # lemma -> occurrences
    words: Counter = field(default_factory=Counter)  # caption length in words -> captions
    tokens: Counter = field(default_factory=Counter)  # untruncated T5 token count (with </s>) -> captions
    nouns_per_caption: Counter = field(default_factory=Counter)  # nouns in a caption -> captions
    rejected: Counter = field(default_factory=Counter)  # reason -> captions

    @property
    def analysed(self) -> int:
        return sum(self.words.values())

    @property
    def seen(self) -> int:
        return self.analysed + sum(self.rejected.values())

    @property
    def total_nouns(self) -> int:
        return sum(self.nouns.values())

    def merge(self, other: "DensityStats") -> "DensityStats":
        for name in ("nouns", "words", "tokens", "nouns_per_caption", "rejected"):
            getattr(self, name).update(getattr(other, name))
        return self

    def to_rows(self) -> dict[str, np.ndarray]:
        """Columns kind, key (str), count (int64): one row per counter entry."""
        kinds, keys, counts = [], [], []
        for kind, counter in self._counters():
            kinds.extend([kind] * len(counter))
            keys.extend(map(str, counter.keys()))
            counts.extend(counter.values())
        return {"kind": np.array(kinds, dtype=object), "key": np.array(keys, dtype=object),
                "count": np.array(counts, dtype=np.int64)}

    def add_rows(self, kinds: Iterable[str], keys: Iterable[str], counts: Iterable[int]) -> "DensityStats":
        """Add rows produced by `to_rows` (or summed by (kind, key) elsewhere)."""
        counters = dict(self._counters())
        for kind, key, count in zip(kinds, keys, counts):
            if kind not in counters:
                raise ValueError(f"unknown stats row kind {kind!r}; expected one of {KINDS}")
            counters[kind][key if kind in ("noun", "rejected") else int(key)] += int(count)
        return self

    @classmethod
    def from_rows(cls, kinds: Iterable[str], keys: Iterable[str], counts: Iterable[int]) -> "DensityStats":
        return cls().add_rows(kinds, keys, counts)

    def _counters(self):
        return (("noun", self.nouns), ("words", self.words), ("tokens", self.tokens),
                ("nouns_per_caption", self.nouns_per_caption), ("rejected", self.rejected))


def table1(stats: DensityStats, valid_threshold: int = DEFAULT_VALID_THRESHOLD) -> dict:
    """PixArt-alpha Table 1 figures: DN, VN (count > threshold), VN/DN in %, total nouns, average nouns per image."""
    distinct = len(stats.nouns)
    valid = sum(1 for count in stats.nouns.values() if count > valid_threshold)
    images = stats.analysed
    total = stats.total_nouns
    return {
        "images": images,
        "distinct_nouns": distinct,
        "valid_distinct_nouns": valid,
        "valid_threshold": valid_threshold,
        "vn_dn_percent": 100.0 * valid / distinct if distinct else None,
        "total_nouns": total,
        "avg_nouns_per_image": total / images if images else None,
    }


def histogram_summary(histogram: Counter, limit: int | None = None) -> dict:
    """Mean, quantiles and maximum of a value -> count histogram; with `limit`, the share of values above it."""
    n = sum(histogram.values())
    if n == 0:
        return {"count": 0}
    values = np.array(sorted(histogram), dtype=np.int64)
    weights = np.array([histogram[v] for v in values], dtype=np.int64)
    cumulative = np.cumsum(weights)

    def quantile(q: float) -> int:  # the smallest value with at least q of the mass at or below it
        return int(values[np.searchsorted(cumulative, q * n, side="left")])

    summary = {
        "count": int(n),
        "mean": float((values * weights).sum() / n),
        "min": int(values[0]),
        "p5": quantile(0.05),
        "median": quantile(0.5),
        "p95": quantile(0.95),
        "max": int(values[-1]),
    }
    if limit is not None:
        over = int(weights[values > limit].sum())
        summary.update({"limit": limit, "over_limit": over, "share_over_limit": over / n})
    return summary


def top_nouns(stats: DensityStats, k: int) -> list[tuple[str, int]]:
    """The k most frequent nouns, ties broken alphabetically (a stable report for equal counts)."""
    return sorted(stats.nouns.items(), key=lambda item: (-item[1], item[0]))[:k]


def noun_gaps(have: DensityStats, lack: DensityStats, valid_threshold: int, k: int) -> list[tuple[str, int]]:
    """Valid nouns of `have` (count > threshold) that never occur in `lack`, most frequent first."""
    gaps = [(noun, n) for noun, n in have.nouns.items() if n > valid_threshold and noun not in lack.nouns]
    return sorted(gaps, key=lambda item: (-item[1], item[0]))[:k]


def rank_frequency(stats: DensityStats, points: int = 200) -> list[tuple[int, int]]:
    """(rank, count) of the noun frequency curve, sampled at about `points` log-spaced ranks (1-based)."""
    counts = np.sort(np.fromiter(stats.nouns.values(), dtype=np.int64, count=len(stats.nouns)))[::-1]
    if counts.size == 0:
        return []
    ranks = np.unique(np.geomspace(1, counts.size, num=min(points, counts.size)).round().astype(np.int64))
    return [(int(r), int(counts[r - 1])) for r in ranks]


# --------------------------------------------------------------------------------------------------------------
# The stage


def load_tokenizer(name_or_path: str, subfolder: str | None = None):
    """A T5 tokenizer by `AutoTokenizer.from_pretrained`; raises common.pretrained.MissingModelError naming the
    `tokenizer` setting when it cannot be loaded."""
    from transformers import AutoTokenizer

    from common.pretrained import MissingModelError

    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except Exception as err:  # noqa: BLE001 - hub, file and format errors all mean "not loadable here"
        raise MissingModelError(
            f"could not load the T5 tokenizer from {name_or_path!r}: {err.__class__.__name__}: "
            f"{(str(err).splitlines() or [''])[0]}\nSet `tokenizer.name_or_path` to a local folder saved with "
            f"save_pretrained (or a hub id reachable from this machine), or `tokenizer: null` to skip token figures."
        ) from None
    # We count untruncated lengths on purpose; the "sequence longer than model_max_length" warning is noise here.
    tokenizer.model_max_length = 1 << 30
    return tokenizer


def _as_list(column) -> list:
    if hasattr(column, "to_pylist"):
        return column.to_pylist()
    return [None if isinstance(v, float) and v != v else v for v in column]  # pandas/numpy NaN means null


class CaptionStatsStage:
    """A batch of captions -> its statistics as (kind, key, count) rows, pre-aggregated within the batch.

    Row kinds: `noun` (key: lemma), `words` (key: words in a caption), `tokens` (key: T5 tokens with </s>),
    `nouns_per_caption` (key: nouns in a caption), `rejected` (key: reason). Summing rows by (kind, key) over any
    partition of the captions gives the statistics of the whole (`DensityStats.add_rows`). With `source_column`,
    a batch may mix sources: rows are computed per source and carry it in a `source` column.

    Construct once per worker (it loads the tagger lexicon/model and the tokenizer); call per batch.
    """

    def __init__(self, column: str = "caption", tagger: TaggerChoice = "auto", tokenizer: str | None = None,
                 tokenizer_subfolder: str | None = None, max_words: int = DEFAULT_MAX_WORDS,
                 min_english_share: float = DEFAULT_MIN_ENGLISH_SHARE, source_column: str | None = None) -> None:
        self.column = column
        self.source_column = source_column
        self.extractor = build_noun_extractor(tagger)
        self.screen = CaptionScreen(max_words, min_english_share)
        self.tokenizer = None
        if tokenizer:
            # A stage owns one core (one Ray actor, num_cpus=1): a Rust thread pool per worker would oversubscribe.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self.tokenizer = load_tokenizer(tokenizer, tokenizer_subfolder)

    def analyse(self, captions: Sequence[object]) -> DensityStats:
        """Statistics of a list of captions (None or non-strings are rejected, never raised on)."""
        stats = DensityStats()
        kept = []
        for text in captions:
            reason = self.screen.reason(text)
            if reason is not None:
                stats.rejected[reason] += 1
                continue
            kept.append(text)
            nouns = self.extractor.nouns(text)
            stats.nouns.update(nouns)
            stats.nouns_per_caption[len(nouns)] += 1
            stats.words[len(text.split())] += 1
        if self.tokenizer is not None and kept:
            ids = self.tokenizer(kept, add_special_tokens=True, truncation=False)["input_ids"]
            stats.tokens.update(len(seq) for seq in ids)
        return stats

    def __call__(self, batch) -> dict[str, np.ndarray]:
        captions = _as_list(batch[self.column])
        if self.source_column is None:
            return self.analyse(captions).to_rows()
        by_source: dict[str, list] = {}
        for source, text in zip(_as_list(batch[self.source_column]), captions):
            by_source.setdefault(source, []).append(text)
        parts = [DensityStats().to_rows() | {"source": np.array([], dtype=object)}]  # an empty batch has no source
        for source, texts in by_source.items():
            rows = self.analyse(texts).to_rows()
            rows["source"] = np.full(len(rows["count"]), source, dtype=object)
            parts.append(rows)
        return {name: np.concatenate([part[name] for part in parts]) for name in ("source", "kind", "key", "count")}


# --------------------------------------------------------------------------------------------------------------
# Sources: which parquet files hold a caption column


@dataclass
class ResolvedSource:
    """Where a source's captions are: parquet files that have the column, and rows of files that lack it."""

    files: list[str]
    rows: int  # rows in `files`
    missing_column_rows: int = 0  # rows of manifest parts without the column (counted as rejected)
    problem: str | None = None  # why nothing can be read; None when `files` is usable

    @property
    def available(self) -> bool:
        return self.problem is None


def _caption_columns(names: Sequence[str]) -> list[str]:
    return [n for n in names if n.startswith("caption")] or list(names)


def resolve_source(manifest: str | Path, column: str) -> ResolvedSource:
    """Resolve a dataset folder (docs/SHARD_FORMAT.md: manifest.parquet, else its committed manifest/ parts) or a
    parquet file to the files holding `column`. Never raises for bad input: `problem` says what is wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.shard_format import MANIFEST_DIR, MANIFEST_FILE

    path = Path(manifest)
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            candidates = [path / MANIFEST_FILE]
        else:
            candidates = sorted(p for p in (path / MANIFEST_DIR).glob("*.parquet") if not p.name.startswith("."))
            if not candidates:
                return ResolvedSource([], 0, problem=f"{path} holds no {MANIFEST_FILE} and no committed parts "
                                                      f"under {MANIFEST_DIR}/ (is it a dataset folder?)")
    elif path.is_file():
        candidates = [path]
    else:
        return ResolvedSource([], 0, problem=f"{path} does not exist")
    files, rows, missing, seen_columns = [], 0, 0, set()
    for file in candidates:
        try:
            meta = pq.ParquetFile(file).metadata
            schema = meta.schema.to_arrow_schema()
        except Exception as err:  # noqa: BLE001 - a corrupt or non-parquet file is reported, not raised
            return ResolvedSource([], 0, problem=f"{file} is not a readable parquet file ({err.__class__.__name__}: {err})")
        seen_columns.update(schema.names)
        if column not in schema.names:
            missing += meta.num_rows
            continue
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            return ResolvedSource([], 0, problem=f"column {column!r} of {file} holds {kind}, not text")
        files.append(str(file))
        rows += meta.num_rows
    if not files:
        return ResolvedSource([], 0, missing, problem=(
            f"column {column!r} is not in {path}; its caption columns are {_caption_columns(sorted(seen_columns))}"))
    return ResolvedSource(files, rows, missing)


def iter_captions(files: Sequence[str], column: str, batch_size: int = 1024) -> Iterator[list]:
    """Batches of one column's values, read with pyarrow (only that column)."""
    import pyarrow.parquet as pq

    for file in files:
        for record_batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=[column]):
            yield record_batch.column(0).to_pylist()


def analyse_source(manifest: str | Path, column: str, stage: CaptionStatsStage | None = None,
                   batch_size: int = 1024, **stage_options) -> DensityStats:
    """In-process statistics of one source (small data, tests, the reference for the distributed job)."""
    resolved = resolve_source(manifest, column)
    if not resolved.available:
        raise FileNotFoundError(resolved.problem)
    stage = stage or CaptionStatsStage(column, **stage_options)
    stats = DensityStats()
    if resolved.missing_column_rows:
        stats.rejected["missing_column"] += resolved.missing_column_rows
    for captions in iter_captions(resolved.files, column, batch_size):
        stats.merge(stage.analyse(captions))
    return stats
