"""Concept-density statistics (curation/density.py) and the report (curation/density_report.py), without Ray.

Truth here is independent of the code under test: nouns counted by hand, textblob's own PatternTagger run side by
side with our cached tagger, closed-form figures of corpora built with known counts, and ByT5's one token per byte.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.density import (
    CaptionScreen,
    CaptionStatsStage,
    DensityStats,
    PatternNouns,
    TaggerUnavailable,
    analyse_source,
    build_noun_extractor,
    histogram_summary,
    load_tokenizer,
    nltk_tagger_available,
    noun_gaps,
    rank_frequency,
    resolve_source,
    table1,
    top_nouns,
)
from curation.density_report import SourceResult, TokenizerInfo, build_figures, write_report
from common.pretrained import MissingModelError

# Captions and their noun lemmas counted by hand, with repeats. Noun adjuncts count ("coffee table": coffee, table),
# as Penn-treebank tagging (and so the paper's NLTK count) treats them. Mixed: short alt-texts and dense descriptions.
HAND_COUNTED = [
    ("A dog sleeping on a red couch.", ["dog", "couch"]),
    ("Two cats sitting on a windowsill next to a potted plant.", ["cat", "windowsill", "plant"]),
    ("A man riding a bicycle down a city street.", ["man", "bicycle", "city", "street"]),
    ("A bowl of fresh strawberries on a wooden table.", ["bowl", "strawberry", "table"]),
    ("Children playing soccer in a park on a sunny afternoon.", ["child", "soccer", "park", "afternoon"]),
    ("A lighthouse on a rocky cliff overlooking the ocean at sunset.", ["lighthouse", "cliff", "ocean", "sunset"]),
    ("The kitchen has white cabinets, a silver refrigerator and a large window above the sink.",
     ["kitchen", "cabinet", "refrigerator", "window", "sink"]),
    ("A woman holding an umbrella waits at a bus stop in the rain.", ["woman", "umbrella", "bus", "stop", "rain"]),
    ("Three horses graze in a green meadow surrounded by mountains.", ["horse", "meadow", "mountain"]),
    ("A plate of pasta with tomatoes, basil and cheese.", ["plate", "pasta", "tomato", "basil", "cheese"]),
    ("An old truck parked beside a barn on a farm.", ["truck", "barn", "farm"]),
    ("A little girl reads a book under a tree.", ["girl", "book", "tree"]),
    ("Snow covers the roofs of the houses in a small village.", ["snow", "roof", "house", "village"]),
    ("A laptop, a cup of coffee and a notebook on a desk.", ["laptop", "cup", "coffee", "notebook", "desk"]),
    ("Boats floating in the harbor near the pier.", ["boat", "harbor", "pier"]),
    ("A chef in a white hat prepares food in a restaurant kitchen.", ["chef", "hat", "food", "restaurant", "kitchen"]),
    ("A close-up of a butterfly resting on a yellow flower.", ["close-up", "butterfly", "flower"]),
    ("The skyline of a city at night with bright lights reflected in the river.",
     ["skyline", "city", "night", "light", "river"]),
    ("A group of hikers standing around a campfire in the forest.", ["group", "hiker", "campfire", "forest"]),
    ("A black and white photo of an elderly couple dancing.", ["photo", "couple"]),
    ("Fresh bread and croissants displayed in a bakery window.", ["bread", "croissant", "bakery", "window"]),
    ("A surfer rides a huge wave on a clear day.", ["surfer", "wave", "day"]),
    ("An orange cat plays with a ball of yarn on the carpet.", ["cat", "ball", "yarn", "carpet"]),
    ("A train crossing a stone bridge over a river valley.", ["train", "stone", "bridge", "river", "valley"]),
    ("A vase of sunflowers on a kitchen counter.", ["vase", "sunflower", "kitchen", "counter"]),
    ("Two dogs chase each other across a sandy beach.", ["dog", "beach"]),
    ("The image shows a cozy lounge with a large gray sofa placed against a white brick wall. In front of the sofa, "
     "there is a wooden coffee table holding a stack of books, a ceramic vase with fresh tulips, and two mugs.",
     ["image", "lounge", "sofa", "brick", "wall", "front", "sofa", "coffee", "table", "stack", "book", "vase",
      "tulip", "mug"]),
    ("A young woman with long brown hair stands on a balcony overlooking a busy street. She wears a blue dress and "
     "a straw hat, and holds a small purse in her left hand. Behind her, several cars and a yellow taxi wait at a "
     "traffic light.",
     ["woman", "hair", "balcony", "street", "dress", "straw", "hat", "purse", "hand", "car", "taxi", "traffic",
      "light"]),
    ("This photograph captures a mountain lake at dawn. Pine trees line the shore, and their reflections are "
     "visible in the calm water. A wooden canoe rests on the pebbles in the foreground, while mist rises from the "
     "surface of the lake and distant peaks are covered with snow.",
     ["photograph", "mountain", "lake", "dawn", "pine", "tree", "shore", "reflection", "water", "canoe", "pebble",
      "foreground", "mist", "surface", "lake", "peak", "snow"]),
    ("A market stall selling apples, oranges, bananas and grapes.",
     ["market", "stall", "apple", "orange", "banana", "grape"]),
    ("A soldier statue in the center of a town square, with pigeons on its head.",
     ["soldier", "statue", "center", "town", "square", "pigeon", "head"]),
    ("A red car parked in front of a brick building.", ["car", "front", "brick", "building"]),
    ("Close view of a honeybee collecting pollen from a purple flower in the garden.",
     ["view", "honeybee", "pollen", "flower", "garden"]),
    ("An astronaut floating inside a space station, surrounded by cables and monitors.",
     ["astronaut", "space", "station", "cable", "monitor"]),
    ("A family eating dinner at a long table in a bright hall.", ["family", "dinner", "table", "hall"]),
    ("A chocolate cake with candles on a birthday party table.",
     ["chocolate", "cake", "candle", "birthday", "party", "table"]),
]

F1_MEAN_MIN = 0.90  # tolerance: mean per-caption F1 of the noun multisets
F1_EACH_MIN = 0.6  # no caption may be badly wrong
TOTAL_TOLERANCE = 0.10  # total noun count within 10% of the hand count


@pytest.fixture(scope="module")
def pattern() -> PatternNouns:
    return PatternNouns()


@pytest.fixture(scope="module")
def stage() -> CaptionStatsStage:
    return CaptionStatsStage("caption", tagger="pattern")


def _f1(truth: list[str], predicted: list[str]) -> float:
    if not truth and not predicted:
        return 1.0
    hits = sum((Counter(truth) & Counter(predicted)).values())
    return 2 * hits / (len(truth) + len(predicted))


def _extractors():
    yield "pattern"
    yield pytest.param("nltk", marks=pytest.mark.skipif(not nltk_tagger_available(),
                                                        reason="NLTK tagger data not installed"))


@pytest.mark.parametrize("choice", list(_extractors()))
def test_nouns_match_hand_counts(choice):
    assert len(HAND_COUNTED) >= 30
    extractor = build_noun_extractor(choice)
    f1s, total = [], 0
    for caption, truth in HAND_COUNTED:
        predicted = extractor.nouns(caption)
        f1s.append(_f1(truth, predicted))
        total += len(predicted)
        assert f1s[-1] >= F1_EACH_MIN, (caption, truth, predicted)
    hand_total = sum(len(truth) for _, truth in HAND_COUNTED)
    assert np.mean(f1s) >= F1_MEAN_MIN
    assert abs(total - hand_total) <= TOTAL_TOLERANCE * hand_total


def test_pattern_nouns_agree_exactly_with_textblob(pattern):
    """The per-token cache must not change a single tag: compare with textblob's PatternTagger, run as shipped."""
    from textblob.en.inflect import singularize
    from textblob.en.taggers import PatternTagger

    reference = PatternTagger()
    tricky = ["Dogs and cats. Dogs run!", "IMG_2034.JPG", "Paris at night -- Eiffel Tower, 1990s; U.S. flags & co.",
              "don't touch John's car!! \"quoted\" ‘x’", "A 3D render of 2 robots/androids in São Paulo.",
              "Houses. Houses houses HOUSES", "e-mail: a@b.com www.example.com http://x.org/y"]
    for text in [caption for caption, _ in HAND_COUNTED] + tricky:
        ours = [(token, pattern.tag(token, first)) for token, first in pattern.tokens(text)]
        assert ours == [tuple(pair) for pair in reference.tag(text)], text
        expected = [(singularize(w) if t == "NNS" else w).lower() for w, t in reference.tag(text)
                    if t in ("NN", "NNS", "NNP", "NNPS")]
        expected = [lemma for lemma in expected if len(lemma) > 1 and any(c.isalpha() for c in lemma)]
        assert pattern.nouns(text) == expected, text
        assert pattern.nouns(text) == expected  # second call: served from the cache


def test_plural_and_singular_count_as_one_concept(stage):
    stats = stage.analyse(["A dog.", "Two dogs and three geese.", "Children near a goose.", "A child and dogs."])
    assert stats.nouns == Counter({"dog": 3, "goose": 2, "child": 2})


# --------------------------------------------------------------------------------------------------------------
# Table 1 arithmetic on corpora with known counts


def _known_corpus() -> tuple[list, dict]:
    """apple x12, pear x10 (exactly the threshold: not valid), plum x11, lemon x1; plus rejected captions."""
    captions = (["An apple."] * 12 + ["A pear."] * 10 + ["A plum."] * 11 + ["A lemon."]
                + ["", "   ", None, 42])
    return captions, {"apple": 12, "pear": 10, "plum": 11, "lemon": 1}


def test_table1_on_a_corpus_with_known_counts(stage):
    captions, counts = _known_corpus()
    stats = stage.analyse(captions)
    assert stats.nouns == Counter(counts)
    assert stats.rejected == Counter({"empty": 2, "missing": 1, "not_text": 1})
    assert stats.seen == len(captions) and stats.analysed == 34
    assert table1(stats, 10) == {
        "images": 34, "distinct_nouns": 4, "valid_distinct_nouns": 2, "valid_threshold": 10,
        "vn_dn_percent": 50.0, "total_nouns": 34, "avg_nouns_per_image": 1.0,
    }
    assert table1(stats, 9)["valid_distinct_nouns"] == 3  # the threshold is configurable: pear (10) > 9
    assert table1(stats, 0)["valid_distinct_nouns"] == 4


def test_table1_arithmetic_exact():
    stats = DensityStats(nouns=Counter({f"n{i}": i for i in range(1, 21)}),  # counts 1..20, total 210
                         words=Counter({5: 3, 7: 4}), nouns_per_caption=Counter({30: 7}))
    figures = table1(stats)
    assert figures["distinct_nouns"] == 20
    assert figures["valid_distinct_nouns"] == 10  # counts 11..20
    assert figures["vn_dn_percent"] == 50.0
    assert figures["total_nouns"] == 210 and figures["images"] == 7
    assert figures["avg_nouns_per_image"] == 30.0
    assert table1(DensityStats())["vn_dn_percent"] is None  # no nouns: undefined, not a crash


def test_histogram_summary_closed_form():
    summary = histogram_summary(Counter({1: 1, 2: 2, 10: 1}), limit=2)
    assert summary == {"count": 4, "mean": 15 / 4, "min": 1, "p5": 1, "median": 2, "p95": 10, "max": 10,
                       "limit": 2, "over_limit": 1, "share_over_limit": 0.25}
    assert histogram_summary(Counter()) == {"count": 0}


def test_top_nouns_gaps_and_rank_frequency():
    a = DensityStats(nouns=Counter({"dog": 30, "cat": 20, "owl": 12, "yak": 3}))
    b = DensityStats(nouns=Counter({"dog": 5, "cow": 50}))
    assert top_nouns(a, 2) == [("dog", 30), ("cat", 20)]
    assert noun_gaps(a, b, valid_threshold=10, k=10) == [("cat", 20), ("owl", 12)]  # yak is not valid in a
    assert noun_gaps(b, a, valid_threshold=10, k=10) == [("cow", 50)]
    assert rank_frequency(a) == [(1, 30), (2, 20), (3, 12), (4, 3)]


# --------------------------------------------------------------------------------------------------------------
# Additivity: any split of the work sums to the same statistics


def test_stats_are_additive_over_any_partition(stage):
    captions = [caption for caption, _ in HAND_COUNTED] + ["", None, "Le chat noir dort sur le canapé du salon"]
    whole = stage.analyse(captions)
    pieces = [stage.analyse(captions[i:i + 7]) for i in range(0, len(captions), 7)]
    merged = DensityStats()
    for piece in pieces:
        merged.merge(piece)
    assert merged == whole
    # An independent reduction: pandas sums every piece's rows by (kind, key), as the Ray job's groupby does.
    rows = pd.concat([pd.DataFrame(piece.to_rows()) for piece in pieces])
    summed = rows.groupby(["kind", "key"], as_index=False)["count"].sum()
    assert DensityStats.from_rows(summed["kind"], summed["key"], summed["count"]) == whole
    assert whole.total_nouns == sum(n * c for n, c in whole.nouns_per_caption.items())


def test_stage_with_a_source_column_splits_a_mixed_batch(stage):
    stage_by_source = CaptionStatsStage("caption", tagger="pattern", source_column="source")
    batch = pa.table({"source": ["a", "b", "a", "b"], "caption": ["A dog.", "A cat.", "", "Two cats."]})
    rows = pd.DataFrame(stage_by_source(batch))
    for source, captions in (("a", ["A dog.", ""]), ("b", ["A cat.", "Two cats."])):
        part = rows[rows["source"] == source]
        assert DensityStats.from_rows(part["kind"], part["key"], part["count"]) == stage.analyse(captions)
    empty = stage_by_source(pa.table({"source": pa.array([], pa.string()), "caption": pa.array([], pa.string())}))
    assert all(len(column) == 0 for column in empty.values())


# --------------------------------------------------------------------------------------------------------------
# Bad input is counted, never raised


@pytest.mark.parametrize("text, reason", [
    (None, "missing"), (3.5, "not_text"), ("", "empty"), (" \n\t ", "empty"),
    ("word " * 1001, "too_long"),
    ("Une photo d'un chien qui joue dans le jardin avec un ballon rouge près de la maison", "non_english"),
    ("Ein Hund spielt im Garten mit einem roten Ball neben dem Haus und der Katze", "non_english"),
    ("Un perro juega en el jardín con una pelota roja cerca de la casa", "non_english"),
    ("一只小狗在公园的草地上玩红色的球", "non_english"),
    ("Собака играет с красным мячом в саду", "non_english"),
    ("Paris skyline at sunset with the Eiffel Tower, Seine river and Notre Dame", None),
    ("Modern minimalist Scandinavian apartment interior, oak parquet, IKEA furniture, 4k wallpaper", None),
    ("IMG_2034.JPG", None),
    ("selfie with my bff at the beach lol", None),
])
def test_screen_reasons(text, reason):
    assert CaptionScreen().reason(text) == reason


def test_bad_captions_are_counted_and_counts_add_up(stage):
    captions = ["A dog on a sofa.", None, "", "word " * 5000, "Le chat noir dort sur le canapé du salon", 7,
                "A cat.", "x" * 200_000]
    stats = stage.analyse(captions)
    assert stats.rejected == Counter({"missing": 1, "empty": 1, "too_long": 2, "non_english": 1, "not_text": 1})
    assert stats.analysed == 2 and stats.seen == len(captions)


# --------------------------------------------------------------------------------------------------------------
# T5 token lengths: ByT5 has one token per UTF-8 byte plus </s>


def test_token_lengths_and_truncation_share(tiny_t5_dir):
    stage = CaptionStatsStage("caption", tagger="pattern", tokenizer=str(tiny_t5_dir))
    captions = ["A red ball.", "A dog " + "and a dog " * 20, "Ein großer Hund.", "Café au lait on a table."]
    stats = stage.analyse(captions)
    analysed = [c for c in captions if stage.screen.reason(c) is None]
    expected = Counter(len(c.encode()) + 1 for c in analysed)
    assert stats.tokens == expected
    summary = histogram_summary(stats.tokens, limit=120)
    assert summary["over_limit"] == sum(1 for c in analysed if len(c.encode()) + 1 > 120) == 1
    assert summary["share_over_limit"] == 1 / len(analysed)


def test_missing_tokenizer_names_the_setting(tmp_path):
    with pytest.raises(MissingModelError, match="tokenizer.name_or_path"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))


# --------------------------------------------------------------------------------------------------------------
# Taggers


def test_nltk_requested_without_its_data_is_a_clear_error(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert not nltk_tagger_available()
    with pytest.raises(TaggerUnavailable, match="averaged_perceptron_tagger_eng"):
        build_noun_extractor("nltk")
    assert isinstance(build_noun_extractor("auto"), PatternNouns)  # auto falls back to the offline tagger


def test_auto_uses_nltk_when_its_tagger_data_is_installed(monkeypatch, tmp_path):
    """A tiny averaged-perceptron model trained here and saved where NLTK looks, loaded through NLTK's own API."""
    import nltk
    from nltk.tag.perceptron import PerceptronTagger

    tagged = [[("The", "DT"), ("dogs", "NNS"), ("chase", "VBP"), ("a", "DT"), ("red", "JJ"), ("ball", "NN"),
               (".", ".")],
              [("A", "DT"), ("woman", "NN"), ("holds", "VBZ"), ("two", "CD"), ("geese", "NNS"), (".", ".")]]
    tagger = PerceptronTagger(load=False)
    tagger.train(tagged * 25, nr_iter=2)  # 25 repeats: every word enters the tag dictionary
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # NLTK only writes inside its data path
    folder = tmp_path / "taggers" / "averaged_perceptron_tagger_eng"
    folder.mkdir(parents=True)
    tagger.save_to_json(lang="eng", loc=str(folder))

    extractor = build_noun_extractor("auto")
    assert extractor.tagger.startswith("nltk")
    assert extractor.nouns("The dogs chase a red ball. A woman holds two geese.") == ["dog", "ball", "woman", "goose"]


# --------------------------------------------------------------------------------------------------------------
# Sources


def _write(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_resolve_source_variants(tmp_path):
    ds = tmp_path / "dataset"
    _write(ds / "manifest" / "a.parquet", key=["1", "2"], caption_llava=["A dog.", "A cat."])
    _write(ds / "manifest" / "b.parquet", key=["3"], caption_original=["a bird"])  # lacks caption_llava
    _write(ds / "manifest" / ".c.parquet.tmp-1234", key=["9"])  # a temp file is never read
    resolved = resolve_source(ds, "caption_llava")
    assert resolved.available and resolved.rows == 2 and resolved.missing_column_rows == 1
    assert resolved.files == [str(ds / "manifest" / "a.parquet")]

    missing = resolve_source(ds, "caption_blip")
    assert not missing.available and "caption_llava" in missing.problem and "caption_original" in missing.problem
    assert "does not exist" in resolve_source(tmp_path / "nope", "caption_llava").problem
    (tmp_path / "empty").mkdir()
    assert "no manifest.parquet" in resolve_source(tmp_path / "empty", "caption_llava").problem
    numbers = _write(tmp_path / "numbers.parquet", caption=[1, 2])
    assert "not text" in resolve_source(numbers, "caption").problem
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    assert "not a readable parquet" in resolve_source(tmp_path / "junk.parquet", "caption").problem

    # The consolidated manifest wins over the parts once the job has finished.
    _write(ds / "manifest.parquet", key=["1", "2", "3"], caption_llava=["A dog.", "A cat.", None])
    resolved = resolve_source(ds, "caption_llava")
    assert resolved.files == [str(ds / "manifest.parquet")] and resolved.rows == 3


def test_analyse_source_counts_every_row(tmp_path, stage):
    ds = tmp_path / "dataset"
    _write(ds / "manifest" / "a.parquet", caption_llava=["A dog.", "", None, "Two cats."])
    _write(ds / "manifest" / "b.parquet", caption_original=["a bird", "a fish"])
    stats = analyse_source(ds, "caption_llava", stage=stage, batch_size=3)
    assert stats.seen == 6 and stats.analysed == 2
    assert stats.rejected == Counter({"missing_column": 2, "empty": 1, "missing": 1})
    assert stats.nouns == Counter({"dog": 1, "cat": 1})


# --------------------------------------------------------------------------------------------------------------
# The report


def test_report_files_figures_and_escaping(tmp_path):
    from PIL import Image

    a = DensityStats(nouns=Counter({"dog": 30, "cat": 20, "<script>alert(1)</script>": 15, "yak": 3}),
                     words=Counter({8: 2, 12: 1}), tokens=Counter({40: 2, 130: 1}),
                     nouns_per_caption=Counter({20: 2, 28: 1}), rejected=Counter({"empty": 1}))
    b = DensityStats(nouns=Counter({"dog": 12, "cow": 11}), words=Counter({4: 2}), tokens=Counter({9: 2}),
                     nouns_per_caption=Counter({11: 1, 12: 1}))
    results = [SourceResult("dense", "ds", "caption_dense", a), SourceResult("sparse", "ds", "caption_sparse", b),
               SourceResult("gone", "nowhere", "caption_x", problem="nowhere does not exist")]
    figures = build_figures(results, valid_threshold=10, top_k=3, tagger="pattern", lemmatizer="singularize",
                            tokenizer=TokenizerInfo("byt5", True, None, 120))
    written = write_report(figures, results, tmp_path / "report")

    data = json.loads(written["json"].read_text())
    dense, sparse, gone = data["sources"]
    assert dense["table1"] == table1(a, 10) and sparse["table1"] == table1(b, 10)
    assert dense["counts"] == {"seen": 4, "analysed": 3, "rejected": {"empty": 1}}
    assert dense["tokens"]["share_over_limit"] == pytest.approx(1 / 3)
    assert dense["top_nouns"] == [["dog", 30], ["cat", 20], ["<script>alert(1)</script>", 15]]
    assert not gone["available"] and gone["problem"] == "nowhere does not exist"
    gaps = {(g["have"], g["lack"]): g["nouns"] for g in data["noun_gaps"]}
    assert gaps[("dense", "sparse")] == [["cat", 20], ["<script>alert(1)</script>", 15]]
    assert gaps[("sparse", "dense")] == [["cow", 11]]

    page = written["html"].read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page  # untrusted nouns are escaped
    assert page.count("data:image/png;base64,") == 5 and "nowhere does not exist" in page
    summary = written["markdown"].read_text()
    assert "| dense | 3 | 4 | 3 | 75.0 | 68 | 22.7 |" in summary
    for key, path in written.items():
        if key.startswith("plot:"):
            with Image.open(path) as image:
                assert image.format == "PNG" and image.width > 300
    nouns = pq.read_table(written["nouns:dense"]).to_pydict()
    assert dict(zip(nouns["noun"], nouns["count"])) == dict(a.nouns)
    assert not list(written["json"].parent.glob(".*"))  # no temp files left behind


def test_report_without_tokenizer_says_why(tmp_path):
    stats = DensityStats(nouns=Counter({"dog": 1}), words=Counter({3: 1}), nouns_per_caption=Counter({1: 1}))
    figures = build_figures([SourceResult("only", "ds", "caption", stats)], valid_threshold=10, top_k=5,
                            tagger="pattern", lemmatizer="singularize",
                            tokenizer=TokenizerInfo("DeepFloyd/t5-v1_1-xxl", False, "no network"))
    written = write_report(figures, [SourceResult("only", "ds", "caption", stats)], tmp_path)
    data = json.loads(written["json"].read_text())
    assert data["sources"][0]["tokens"] == {"available": False, "reason": "no network"}
    assert "T5 token figures unavailable: no network" in written["html"].read_text()
    assert "plot:caption_t5_tokens.png" not in written and "plot:caption_words.png" in written
