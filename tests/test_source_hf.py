"""The Hugging Face `datasets` source on datasets built here: a save_to_disk folder (map-style, row units) and
parquet data files streamed (one unit per file), with every kind of bad row counted by hand."""
import json
import pickle

import datasets
import pytest

from common.config import ConfigError
from curation.sources import HFDatasetConfig, build_source
from tests.fixtures_data import gradient, jpeg_bytes, png_bytes, truncated_jpeg

IMAGE = datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string")),
                           "label": datasets.Value("int64"), "uid": datasets.Value("string")})


def hf_rows(folder) -> dict:
    """Seven rows: 0, 1, 4, 5 and 6 carry pictures (5 and 6 given by file path: save_to_disk embeds their bytes,
    so 6 survives its file's deletion); 2 has no image, 3 truncated bytes (the source passes them on, the job's
    decode rejects them). Row 1 has two captions (the first is used), row 4 none."""
    external = folder / "external.jpg"
    external.write_bytes(jpeg_bytes(gradient(96, 128, seed=5)))
    (folder / "gone.jpg").write_bytes(jpeg_bytes(gradient(96, 128, seed=6)))
    images = [{"bytes": jpeg_bytes(gradient(96, 128, seed=1)), "path": None},
              {"bytes": png_bytes(gradient(128, 96, seed=2)), "path": None},
              None,
              {"bytes": truncated_jpeg(jpeg_bytes(gradient(96, 128, seed=3))), "path": None},
              {"bytes": jpeg_bytes(gradient(112, 112, seed=4)), "path": None},
              {"bytes": None, "path": str(external)},
              {"bytes": None, "path": str(folder / "gone.jpg")}]
    return {"image": images, "text": [["a red thing"], ["first", "second"], ["no picture"], ["cut short"], [],
                                      ["from a file"], ["missing file"]],
            "label": list(range(7)), "uid": [f"u{i}" for i in range(7)]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    datasets.Dataset.from_dict(hf_rows(folder), features=IMAGE).save_to_disk(str(folder / "saved"))
    (folder / "gone.jpg").unlink()
    return folder / "saved"


def read_all(source, tmp_path):
    units = source.list_units(tmp_path)
    return units, [sample for unit in units for sample in source.iter_unit(unit)]


def test_saved_dataset_rows_become_units_and_every_row_is_accounted_for(saved, tmp_path):
    source = build_source(HFDatasetConfig(dataset=str(saved), captions={"original": "text"}, label_column="label",
                                          unit_size=3))
    units, samples = read_all(source, tmp_path)
    assert [u.id for u in units] == ["rows-000000", "rows-000001", "rows-000002"]
    assert [u.paths for u in units] == [("0:3",), ("3:6",), ("6:7",)]
    assert [s.source_id for s in samples] == [f"train/{i}" for i in range(7)]
    assert [s.ordinal for s in samples] == [0, 1, 2, 0, 1, 2, 0]
    rejected = {s.source_id: s.reject.reason for s in samples if s.reject}
    assert rejected == {"train/2": "no image in column 'image'"}
    by_id = {s.source_id: s for s in samples}
    assert by_id["train/0"].captions == {"original": "a red thing"} and by_id["train/0"].class_label == 0
    assert by_id["train/1"].captions == {"original": "first"}
    assert by_id["train/4"].captions == {}
    assert by_id["train/3"].data[:2] == b"\xff\xd8" and by_id["train/3"].reject is None  # the job's decode decides
    assert by_id["train/5"].data == (saved.parent / "external.jpg").read_bytes()
    assert by_id["train/6"].data == jpeg_bytes(gradient(96, 128, seed=6))
    # Deterministic, and the same after travelling to a worker (the open dataset does not travel, it reopens).
    again = pickle.loads(pickle.dumps(source))
    assert again._dataset is None
    assert [(s.key, s.data) for u in units for s in again.iter_unit(u)] == [(s.key, s.data) for s in samples]


def test_id_column_names_the_records(saved, tmp_path):
    source = build_source(HFDatasetConfig(dataset=str(saved), id_column="uid", max_units=1, unit_size=4))
    units, samples = read_all(source, tmp_path)
    assert len(units) == 1 and [s.source_id for s in samples] == ["u0", "u1", "u2", "u3"]


def test_streamed_data_files_are_one_unit_per_file_and_a_broken_file_ends_its_unit(saved, tmp_path):
    table = datasets.load_from_disk(str(saved))
    table.select(range(3)).to_parquet(str(tmp_path / "part-0.parquet"))
    table.select(range(3, 7)).to_parquet(str(tmp_path / "part-1.parquet"))
    (tmp_path / "part-2.parquet").write_bytes(b"PAR1 this is not parquet")
    files = [str(tmp_path / f"part-{i}.parquet") for i in range(3)]
    source = build_source(HFDatasetConfig(dataset="parquet", data_files=files, streaming=True,
                                          captions={"original": "text"}))
    units, samples = read_all(source, tmp_path / "work")
    assert [u.id for u in units] == ["shard-000000", "shard-000001", "shard-000002"]
    by_unit = {u.id: [s for s in samples if s.unit == u.id] for u in units}
    assert [s.source_id for s in by_unit["shard-000000"]] == ["train/0/0", "train/0/1", "train/0/2"]
    assert len(by_unit["shard-000001"]) == 4
    broken = by_unit["shard-000002"]
    assert len(broken) == 1 and broken[0].reject and "unreadable after 0 rows" in broken[0].reject.reason
    assert [s.captions for s in by_unit["shard-000000"]] == [{"original": "a red thing"}, {"original": "first"},
                                                             {}]  # row 2: no image, rejected


def test_image_paths_in_a_data_file(tmp_path):
    """A JSON-lines file whose image column holds paths: files are read, a missing one, a URL and an empty cell
    are rejected with the reason."""
    picture = tmp_path / "a.jpg"
    picture.write_bytes(jpeg_bytes(gradient(96, 128, seed=7)))
    rows = [{"file": str(picture), "caption": "here"}, {"file": str(tmp_path / "missing.jpg"), "caption": "gone"},
            {"file": "https://example.com/b.jpg", "caption": "remote"}, {"file": None, "caption": "nothing"}]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = build_source(HFDatasetConfig(dataset="json", data_files=str(tmp_path / "list.jsonl"), streaming=True,
                                          image_column="file", captions={"original": "caption"}))
    _, samples = read_all(source, tmp_path / "work")
    assert len(samples) == 4 and samples[0].reject is None and samples[0].data == picture.read_bytes()
    reasons = [s.reject.reason for s in samples[1:]]
    assert "unreadable image file" in reasons[0] and "missing.jpg" in reasons[0]
    assert "holds a URL" in reasons[1] and reasons[2] == "no image in column 'file'"


def test_settings_that_name_nothing_fail_on_the_driver_naming_the_field(saved, tmp_path):
    with pytest.raises(ConfigError, match=r"source.image_column: 'picture' is not a column"):
        build_source(HFDatasetConfig(dataset=str(saved), image_column="picture")).list_units(tmp_path)
    with pytest.raises(ConfigError, match=r"source.captions.original: 'caption' is not a column"):
        build_source(HFDatasetConfig(dataset=str(saved), captions={"original": "caption"})).list_units(tmp_path)
    datasets.DatasetDict({"validation": datasets.load_from_disk(str(saved))}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ConfigError, match=r"source.split 'train' is not a split .* \['validation'\]"):
        build_source(HFDatasetConfig(dataset=str(tmp_path / "dict"))).list_units(tmp_path)
    with pytest.raises(ValueError, match="caption name"):
        HFDatasetConfig(dataset="x", captions={"Bad Name": "text"})
