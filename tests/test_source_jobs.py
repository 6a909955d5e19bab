"""The new sources through the real curation job (local Ray, tiny models): the dataset card adds up to the records
counted by hand in tests/test_source_hf.py and tests/test_source_pixart.py, and a rerun resumes to the same card."""
import json
import shutil

import datasets
import pyarrow.parquet as pq
import pytest

from common.config import validate_config
from pipelines.curate import CurateConfig, run
from tests.test_source_hf import IMAGE, hf_rows
from tests.test_source_pixart import pixart_layout

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def job(source: dict, out, t5_dir, vae_dir, caption: str) -> CurateConfig:
    return validate_config({
        "source": source, "output": str(out), "buckets": {"resolution": 64}, "filters": {"min_side": 64},
        "vae": {"model": str(vae_dir)}, "t5": {"model": str(t5_dir), "captions": [caption]},
        "ray": {"read_num_cpus": 0.5, "write_num_cpus": 0.5, "progress": False,
                "vae": {"num_cpus": 0.25, "batch_size": 4}, "t5": {"num_cpus": 0.25, "batch_size": 8}},
    }, CurateConfig)


def run_twice(config: CurateConfig) -> dict:
    card = run(config)
    assert run(config)["counts"] == card["counts"]  # resumed: every unit already committed, nothing redone
    return card


def test_a_hugging_face_dataset_curates(ray_cluster, tmp_path, tiny_t5_dir, tiny_vae_dir):
    datasets.Dataset.from_dict(hf_rows(tmp_path), features=IMAGE).save_to_disk(str(tmp_path / "saved"))
    config = job({"kind": "hf", "dataset": str(tmp_path / "saved"), "captions": {"original": "text"},
                  "label_column": "label", "unit_size": 3}, tmp_path / "out", tiny_t5_dir, tiny_vae_dir, "original")
    counts = run_twice(config)["counts"]
    # Rows 0, 1, 5, 6 accepted; 2 no image (source), 3 truncated (decode), 4 no caption to encode (t5).
    assert (counts["seen"], counts["accepted"]) == (7, 4)
    assert counts["rejected_by_reason"] == {"source": 1, "decode": 1, "t5": 1}
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").sort_by("source_id").to_pylist()
    assert [row["source_id"] for row in manifest] == ["train/0", "train/1", "train/5", "train/6"]
    assert [row["caption_original"] for row in manifest] == ["a red thing", "first", "from a file", "missing file"]


def test_a_pixart_data_info_layout_curates(ray_cluster, tmp_path, tiny_t5_dir, tiny_vae_dir):
    info = pixart_layout(tmp_path)
    config = job({"kind": "pixart", "data_info": str(info), "images": str(tmp_path / "InternImgs"), "unit_size": 4},
                 tmp_path / "out", tiny_t5_dir, tiny_vae_dir, "prompt")
    counts = run_twice(config)["counts"]
    # Records 0 and 1 accepted; 2, 3, 4, 5, 8 rejected by the source; 6 has no prompt (t5); 7 repeats 0's path.
    assert (counts["seen"], counts["accepted"]) == (9, 2)
    assert counts["rejected_by_reason"] == {"source": 5, "t5": 1, "duplicate_id": 1}
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").sort_by("source_id").to_pylist()
    assert [(row["source_id"], row["caption_prompt"]) for row in manifest] == [("a.jpg", "a cat"),
                                                                             ("sub/b.png", "a dog")]
