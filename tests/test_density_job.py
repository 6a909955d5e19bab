"""The concept-density Ray job (pipelines/density.py): config errors first (no Ray), then one real run on a local
Ray whose figures must equal the in-process computation (curation.density.analyse_source) exactly."""
from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curation.density import CaptionStatsStage, analyse_source, table1
from common.config import ConfigError, load_config
from pipelines.density import DensityConfig, check_tokenizer, main
from tests.test_density import HAND_COUNTED


def _config_file(tmp_path, **fields):
    data = {"sources": [{"name": "a", "manifest": str(tmp_path / "ds"), "column": "caption_a"}],
            "output_dir": str(tmp_path / "out"), **fields}
    path = tmp_path / "density.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("fields, needle", [
    ({"valid_threshold": -1}, "valid_threshold"),
    ({"tagger": "spacy"}, "tagger"),
    ({"sources": []}, "sources"),
    ({"sources": [{"name": "a/b", "manifest": "x", "column": "c"}]}, "sources.0.name"),
    ({"sources": [{"name": "a", "manifest": "x", "column": "c"}, {"name": "a", "manifest": "y", "column": "c"}]},
     "unique"),
    ({"outptu_dir": "x"}, "outptu_dir"),
    ({"ray": {"batch_size": 0}}, "ray.batch_size"),
    ({"tokenizer": {"max_lenght": 120}}, "tokenizer.max_lenght"),
])
def test_bad_config_names_the_field(tmp_path, fields, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(_config_file(tmp_path, **fields), DensityConfig)


def test_shipped_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "density"
    for name in ("demo.yaml", "example.yaml"):
        config = load_config(root / name, DensityConfig)
        assert config.valid_threshold == 10 and config.tokenizer.max_length == 120


def test_no_readable_source_is_a_config_error_naming_each_source(tmp_path, capsys):
    path = _config_file(tmp_path, sources=[
        {"name": "a", "manifest": str(tmp_path / "missing"), "column": "caption_a"},
        {"name": "b", "manifest": str(tmp_path / "t.parquet"), "column": "caption_b"}])
    pq.write_table(pa.table({"caption_x": ["a dog"]}), tmp_path / "t.parquet")
    assert main(["--config", str(path), "--set", "tokenizer=null"]) == 2
    err = capsys.readouterr().err
    assert "sources.0 (a)" in err and "does not exist" in err
    assert "sources.1 (b)" in err and "'caption_b' is not in" in err and "caption_x" in err


def test_unavailable_nltk_is_a_config_error(tmp_path, capsys, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert main(["--config", str(_config_file(tmp_path, tagger="nltk", tokenizer=None))]) == 2
    assert "tagger:" in capsys.readouterr().err


def test_tokenizer_from_the_dataset_card(tmp_path, tiny_t5_dir):
    config = load_config(_config_file(tmp_path, tokenizer={"name_or_path": "from_dataset"}), DensityConfig)
    info = check_tokenizer(config.tokenizer, config.sources)
    assert not info.available and "dataset_card.json" in info.reason
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_card.json").write_text(json.dumps({"text_encoder": {"name_or_path": str(tiny_t5_dir)}}))
    info = check_tokenizer(config.tokenizer, config.sources)
    assert info.available and info.name_or_path == str(tiny_t5_dir)


# --------------------------------------------------------------------------------------------------------------
# One real run on a local Ray


@pytest.fixture(scope="module")
def ray_local():
    from pipelines.ray_cluster import init_ray

    ray = init_ray(num_cpus=2, object_store_memory=300 * 2**20)
    yield ray
    ray.shutdown()


BAD = [None, "", "   ", "Ein Hund spielt im Garten mit einem roten Ball neben dem Haus", "word " * 1200,
       "一只小狗在公园的草地上玩红色的球"]


@pytest.mark.slow
def test_ray_job_matches_the_in_process_figures(tmp_path, tiny_t5_dir, ray_local, capsys):
    dense = [caption for caption, _ in HAND_COUNTED] + BAD
    sparse = [caption.split(",")[0].split(".")[0] for caption, _ in HAND_COUNTED] + ["a dog"] * len(BAD)
    ds = tmp_path / "ds"
    (ds / "manifest").mkdir(parents=True)
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(len(dense))], "caption_dense": dense,
                             "caption_sparse": sparse}), ds / "manifest" / "u0.parquet")
    # A later unit without the dense caption: its rows are counted as rejected (missing_column), not lost.
    pq.write_table(pa.table({"key": ["x0", "x1", "x2"], "caption_sparse": ["a cat", "two cats", "a red bus"]}),
                   ds / "manifest" / "u1.parquet")
    alt = tmp_path / "alt.parquet"
    pq.write_table(pa.table({"TEXT": ["dog photo", "IMG_0001.JPG", "Le chat noir dort sur le canapé du salon",
                                      "cute cat sticker", None, "vintage car poster"] * 4}), alt)
    sources = [{"name": "dense", "manifest": str(ds), "column": "caption_dense"},
               {"name": "sparse", "manifest": str(ds), "column": "caption_sparse"},
               {"name": "alt", "manifest": str(alt), "column": "TEXT"},
               {"name": "broken", "manifest": str(tmp_path / "nope"), "column": "caption"}]
    out = tmp_path / "report"
    path = _config_file(tmp_path, sources=sources, tokenizer={"name_or_path": str(tiny_t5_dir)}, tagger="pattern",
                        valid_threshold=2, ray={"concurrency": 1, "batch_size": 16})

    assert main(["--config", str(path), "--set", f"output_dir={out}"]) == 0
    assert "report.html" in capsys.readouterr().out

    figures = json.loads((out / "density.json").read_text())
    by_name = {s["name"]: s for s in figures["sources"]}
    assert figures["tagger"].startswith("pattern") and figures["tokenizer"]["available"]
    assert not by_name["broken"]["available"] and "does not exist" in by_name["broken"]["problem"]

    stage = CaptionStatsStage("caption", tagger="pattern", tokenizer=str(tiny_t5_dir))
    for source in sources[:3]:
        local = analyse_source(source["manifest"], source["column"], stage=stage)
        got = by_name[source["name"]]
        assert got["table1"] == table1(local, 2)
        assert got["counts"]["seen"] == local.seen and got["counts"]["rejected"] == dict(local.rejected)
        assert got["words"]["histogram"] == {str(k): v for k, v in sorted(local.words.items())}
        assert got["tokens"]["histogram"] == {str(k): v for k, v in sorted(local.tokens.items())}
        nouns = pq.read_table(out / "nouns" / f"{source['name']}.parquet").to_pydict()
        assert Counter(dict(zip(nouns["noun"], nouns["count"]))) == local.nouns

    # Counts add up to the rows on disk, and the rejections are the ones planted.
    assert by_name["dense"]["counts"]["seen"] == len(dense) + 3
    assert by_name["dense"]["counts"]["rejected"] == {"empty": 2, "missing": 1, "missing_column": 3,
                                                      "non_english": 2, "too_long": 1}
    assert by_name["sparse"]["counts"] == {"seen": len(sparse) + 3, "analysed": len(sparse) + 3, "rejected": {}}
    assert by_name["alt"]["counts"]["rejected"] == {"missing": 4, "non_english": 4}
    # ByT5: one token per UTF-8 byte plus </s>; the truncated share follows in closed form.
    analysed = [c for c in dense if stage.screen.reason(c) is None]
    over = sum(1 for c in analysed if len(c.encode()) + 1 > 120)
    assert by_name["dense"]["tokens"]["over_limit"] == over > 0
    assert by_name["dense"]["tokens"]["share_over_limit"] == pytest.approx(over / len(analysed))
    for name in ("report.html", "summary.md", "plots/noun_rank_frequency.png", "plots/caption_t5_tokens.png"):
        assert (out / name).is_file(), name
