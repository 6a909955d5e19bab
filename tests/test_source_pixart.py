"""The PixArt-alpha data_info.json source on a hand-made layout: every record accepted or rejected with its reason."""
import json
import os

import pytest

from common.config import ConfigError
from curation.sources import PixArtConfig, build_source
from tests.fixtures_data import gradient, jpeg_bytes, png_bytes

RECORDS = [
    {"path": "a.jpg", "prompt": "a cat", "height": 96, "width": 128, "ratio": 0.75},  # 0 accepted
    {"path": "sub/b.png", "prompt": "  a dog  ", "sharegpt4v": "a long description", "height": 128, "width": 96,
     "ratio": 1.333},  # 1 accepted, prompt stripped
    "just a string",  # 2 not an object
    {"prompt": "no path here"},  # 3 no path
    {"path": "../escape.jpg", "prompt": "out"},  # 4 leaves the folder
    {"path": "missing.jpg", "prompt": "gone"},  # 5 missing image
    {"path": "./c.jpg", "height": 112, "width": 112},  # 6 accepted by the source, no prompt
    {"path": "a.jpg", "prompt": "a cat again"},  # 7 the same path again: the job rejects it as duplicate_id
    {"path": "link.jpg", "prompt": "a link out"},  # 8 a symlink out of the image folder
]


def pixart_layout(base):
    """PixArt's official layout: InternData/data_info.json, images under InternImgs/. Returns data_info's path."""
    images = base / "InternImgs"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(jpeg_bytes(gradient(96, 128, seed=11)))
    (images / "sub" / "b.png").write_bytes(png_bytes(gradient(128, 96, seed=12)))
    (images / "c.jpg").write_bytes(jpeg_bytes(gradient(112, 112, seed=13)))
    (base / "secret.jpg").write_bytes(jpeg_bytes(gradient(96, 128, seed=14)))
    os.symlink(base / "secret.jpg", images / "link.jpg")
    (base / "InternData").mkdir()
    info = base / "InternData" / "data_info.json"
    info.write_text(json.dumps(RECORDS))
    return info


def read_all(source, work):
    units = source.list_units(work)
    return units, [sample for unit in units for sample in source.iter_unit(unit)]


def test_every_record_is_accepted_or_rejected_with_its_reason(tmp_path):
    info = pixart_layout(tmp_path)
    config = PixArtConfig(data_info=str(info), images=str(tmp_path / "InternImgs"), unit_size=4,
                          captions={"prompt": "prompt", "sharegpt4v": "sharegpt4v"})
    units, samples = read_all(build_source(config), tmp_path / "work")
    assert [u.id for u in units] == ["data_info-000000", "data_info-000001", "data_info-000002"]
    assert len(samples) == len(RECORDS) and [s.ordinal for s in samples] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    accepted = {s.source_id: s for s in samples if s.reject is None}
    assert sorted(accepted) == ["a.jpg", "c.jpg", "sub/b.png"] and len([s for s in samples if not s.reject]) == 4
    assert samples[0].captions == {"prompt": "a cat"}
    assert samples[0].data == (tmp_path / "InternImgs" / "a.jpg").read_bytes()
    assert samples[0].source_meta == {"data_info": "data_info.json", "index": 0, "declared_height": 96,
                                      "declared_width": 128}
    assert samples[1].captions == {"prompt": "a dog", "sharegpt4v": "a long description"}
    assert samples[6].source_id == "c.jpg" and samples[6].captions == {}
    assert samples[7].key == samples[0].key  # one image, one key: the job's duplicate search keeps the first
    reasons = {i: samples[i].reject.reason for i in (2, 3, 4, 5, 8)}
    assert "is a JSON str, not an object" in reasons[2]
    assert "has no path" in reasons[3]
    assert "leaves the image folder" in reasons[4]
    assert "image missing or unreadable" in reasons[5]
    assert "link out of the image folder" in reasons[8]
    assert all(samples[i].reject.stage == "source" for i in reasons)


def test_routing_is_reused_until_the_file_changes(tmp_path):
    info = pixart_layout(tmp_path)
    source = build_source(PixArtConfig(data_info=str(info), images=str(tmp_path / "InternImgs"), unit_size=4))
    first = source.list_units(tmp_path / "work")
    marker = tmp_path / "work" / "pixart" / "data_info.units.json"
    stamp = marker.stat().st_mtime_ns
    assert source.list_units(tmp_path / "work") == first and marker.stat().st_mtime_ns == stamp
    info.write_text(json.dumps(RECORDS[:2]))
    os.utime(info, ns=(stamp + 10**9, stamp + 10**9))
    again = source.list_units(tmp_path / "work")
    assert len(again) == 1 and [s.source_id for s in source.iter_unit(again[0])] == ["a.jpg", "sub/b.png"]


def test_images_default_to_the_folder_of_data_info_and_same_named_files_keep_apart(tmp_path):
    for part in ("part0", "part1"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "x.jpg").write_bytes(jpeg_bytes(gradient(96, 128, seed=len(part))))
        (tmp_path / part / "data_info.json").write_text(json.dumps([{"path": "x.jpg", "prompt": part}]))
    source = build_source(PixArtConfig(data_info=[str(tmp_path / p / "data_info.json") for p in ("part0", "part1")]))
    units, samples = read_all(source, tmp_path / "work")
    assert [u.id for u in units] == ["0-data_info-000000", "1-data_info-000000"]
    assert [s.captions["prompt"] for s in samples] == ["part0", "part1"]


def test_a_data_info_that_is_not_a_list_of_records_fails_on_the_driver(tmp_path):
    bad = tmp_path / "data_info.json"
    bad.write_text(json.dumps({"path": "a.jpg"}))
    with pytest.raises(ConfigError, match="holds a JSON dict"):
        build_source(PixArtConfig(data_info=str(bad))).list_units(tmp_path / "work")
    bad.write_text("[{\"path\": ")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        build_source(PixArtConfig(data_info=str(bad))).list_units(tmp_path / "work")
    with pytest.raises(FileNotFoundError, match="source.data_info"):
        build_source(PixArtConfig(data_info=str(tmp_path / "nope.json"))).list_units(tmp_path / "work")


def test_relative_paths_give_the_same_units_from_any_copy_of_the_project(tmp_path, monkeypatch):
    """Under `ray job submit` each session unpacks the project somewhere new: units (which the output folder is
    bound to) must not carry that place, and each worker resolves the relative folder in its own copy."""
    listed = []
    for copy in ("_ray_pkg_a", "_ray_pkg_b"):
        pixart_layout(tmp_path / copy)
        monkeypatch.chdir(tmp_path / copy)
        source = build_source(PixArtConfig(data_info="InternData/data_info.json", images="InternImgs", unit_size=4))
        units = source.list_units(tmp_path / "work")
        listed.append([u.to_row() for u in units])
        first = next(source.iter_unit(units[0]))
        assert first.data == (tmp_path / copy / "InternImgs" / "a.jpg").read_bytes()
    assert listed[0] == listed[1]
