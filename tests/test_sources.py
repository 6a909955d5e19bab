import io
import json
import tarfile
from collections import Counter

import pytest

from curation.shard_format import make_key
from curation.sources import FolderConfig, ImageNetConfig, JourneyDBConfig, SA1BConfig, WorkUnit, build_source
from curation.sources.sa1b import AnnotationError, parse_image_block
from curation.sources.tars import iter_tar, normalise_member_name, split_member_name
from tests.fixtures_data import EXPECTED_SA1B, gradient, jpeg_bytes, sa1b_annotation, sa1b_fixture, write_tar


def read_all(source, work_dir):
    units = source.list_units(work_dir)
    return units, [s for u in units for s in source.iter_unit(u)]


# ---- tar safety -------------------------------------------------------------------------------------------------------
def test_member_names_that_escape_are_refused():
    assert normalise_member_name("./sa_1.jpg") == "sa_1.jpg"
    assert normalise_member_name("a/./b.jpg") == "a/b.jpg"
    for bad in ("../x.jpg", "a/../../x.jpg", "/etc/passwd", "..", "a\\..\\x"):
        assert normalise_member_name(bad) is None, bad
    assert normalise_member_name("a/../b.jpg") == "b.jpg"  # stays inside
    assert split_member_name("dir/sa_1.jpg") == ("dir/sa_1", "jpg")
    assert split_member_name("k.latent_mean.npy") == ("k", "latent_mean.npy")


def test_truncated_archive_ends_with_a_problem_member(tmp_path):
    tar = write_tar(tmp_path / "a.tar", [(f"f{i}.txt", b"x" * 2000) for i in range(3)])
    data = tar.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 512 + 2048 + 700])  # first member whole, second cut short
    members = list(iter_tar(str(tmp_path / "cut.tar")))
    assert members[0].name == "f0.txt" and members[0].data == b"x" * 2000
    assert members[-1].problem and "truncated" in members[-1].problem


# ---- SA-1B ------------------------------------------------------------------------------------------------------------
def test_image_block_is_parsed_without_the_masks():
    block = parse_image_block(sa1b_annotation(7, 1500, 2250, "sa_7.jpg"))
    assert block == {"image_id": "7", "width": 1500, "height": 2250, "file_name": "sa_7.jpg"}
    # Only the image block is decoded: garbage after it (where the masks are) does not matter.
    assert parse_image_block(b'{"image": {"image_id": 3, "width": 5, "height": 6}, "annotations": [NOT JSON')["image_id"] == "3"
    # Another key order falls back to a full parse.
    assert parse_image_block(b'{"annotations": [], "image": {"image_id": "x9"}}')["image_id"] == "x9"
    for bad, reason in [(b"{", "malformed"), (b'{"annotations": []}', "no 'image'"), (b'{"image": []}', "not an object"),
                        (b'{"image": {"width": 3}}', "image_id"), (b'{"image": {"image_id": 1, "width": -3}}', "width")]:
        with pytest.raises(AnnotationError, match=reason):
            parse_image_block(bad)


def test_sa1b_records_match_the_hand_count(tmp_path, photos_dir):
    sa1b_fixture(tmp_path / "sa1b", photos_dir)
    source = build_source(SA1BConfig(root=str(tmp_path / "sa1b")))
    units, samples = read_all(source, tmp_path / "work")
    assert [u.id for u in units] == [f"sa_00000{i}" for i in range(5)]
    assert len(samples) == EXPECTED_SA1B["seen"]
    assert [s.ordinal for s in samples if s.unit == "sa_000000"] == list(range(19))
    rejected = Counter(s.reject.stage for s in samples if s.reject)
    assert rejected == {"source": 5}  # the other rejections need decoding / the whole dataset
    reasons = " | ".join(s.reject.reason for s in samples if s.reject)
    for words in ("malformed annotation JSON", "missing annotation sa_13.json", "sa_14.json has no image",
                  "'../evil.jpg' escapes", "symlink"):
        assert words in reasons
    good = [s for s in samples if not s.reject]
    assert sorted(s.source_id for s in good) == sorted(["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11",
                                                         "15", "16", "17", "20", "21", "2", *map(str, range(30, 36))])
    assert all(s.key == make_key("sa1b", s.source_id) for s in good)
    dog = next(s for s in good if s.source_id == "1")
    assert dog.data == (photos_dir / "dog.jpg").read_bytes() and dog.source_meta["file_name"] == "sa_1.jpg"
    # Deterministic: a second read yields the same records in the same order.
    assert [(s.key, s.ordinal) for s in read_all(source, tmp_path / "work")[1]] == [(s.key, s.ordinal) for s in samples]


def test_sa1b_members_in_any_order_pair_up(tmp_path):
    jpg = jpeg_bytes(gradient(80, 120))
    write_tar(tmp_path / "sa_000009.tar", [("sa_5.json", sa1b_annotation(5, 120, 80, "sa_5.jpg")),
                                           ("sa_6.jpg", jpg), ("sa_5.jpg", jpg),
                                           ("sa_6.json", sa1b_annotation(6, 120, 80, "sa_6.jpg"))])
    _, samples = read_all(build_source(SA1BConfig(root=str(tmp_path))), tmp_path / "w")
    assert [(s.source_id, s.reject) for s in samples] == [("5", None), ("6", None)]


# ---- JourneyDB --------------------------------------------------------------------------------------------------------
def _jdb_line(path, prompt="a cat", style=("oil",), caption="A cat on a mat."):
    return json.dumps({"img_path": path, "prompt": prompt, "Task1": {"Style": list(style), "Content": ["cat"]},
                       "Task2": {"Caption": caption, "Question": []}})


def test_journeydb_archives_and_folders(tmp_path):
    jpg = jpeg_bytes(gradient(64, 96))
    root = tmp_path / "jdb"
    root.mkdir()
    with tarfile.open(root / "000.tgz", "w:gz") as tar:
        for name in ("000/a.jpg", "000/b.jpg", "000/c.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpg)
            tar.addfile(info, io.BytesIO(jpg))
    (root / "001").mkdir()
    for name in ("x.jpg", "y.jpg"):
        (root / "001" / name).write_bytes(jpg)
    lines = [
        _jdb_line("./000/a.jpg"), _jdb_line("./000/b.jpg", style=("sketch", "ink"), caption="Two lines."),
        "{not json", json.dumps(["a list"]), json.dumps({"prompt": "no path"}),
        _jdb_line("./000/a.jpg", prompt="again"),  # duplicate annotation of a.jpg
        _jdb_line("./000/zzz.jpg"),  # annotation whose image is not in its archive
        _jdb_line("./001/x.jpg", prompt="folder image"),
        _jdb_line("./777/not-downloaded.jpg"),  # archive not part of this job: rejected as outside_job
        _jdb_line("./001/gone.jpg"),  # extracted-folder layout, image file missing: rejected, not dropped
        json.dumps({"img_path": "../../etc/passwd.jpg"}),
        "",
    ]
    (tmp_path / "anno.jsonl").write_text("\n".join(lines) + "\n")
    source = build_source(JourneyDBConfig(root=str(root), annotations=str(tmp_path / "anno.jsonl"), unit_size=10))
    units, samples = read_all(source, tmp_path / "work")
    assert [u.id for u in units] == ["arc-000", "files-000000", "journeydb-annotations"]
    summary = json.loads((tmp_path / "work" / "journeydb" / "_summary.json").read_text())
    assert summary["unmatched"] == 2 and summary["problems"] == 6
    accepted = {s.source_id: s for s in samples if not s.reject}
    assert set(accepted) == {"000/a.jpg", "000/b.jpg", "001/x.jpg"}
    assert accepted["000/a.jpg"].captions == {"prompt": "a cat", "style": "oil", "caption": "A cat on a mat."}
    assert accepted["000/b.jpg"].captions["style"] == "sketch, ink"
    assert accepted["001/x.jpg"].captions["prompt"] == "folder image"
    stages = Counter((s.unit, s.reject.stage) for s in samples if s.reject)
    assert stages == {("arc-000", "duplicate_id"): 1, ("arc-000", "source"): 2,  # c.jpg unannotated, zzz.jpg missing
                      ("files-000000", "source"): 1,  # y.jpg unannotated
                      ("journeydb-annotations", "source"): 5,  # 3 malformed, the unsafe path, 001/gone.jpg
                      ("journeydb-annotations", "outside_job"): 1}  # 777/not-downloaded.jpg
    # Every annotation line is accounted for: accepted, or rejected with a reason.
    from_lines = [s for s in samples if s.reject and ("#line-" in s.source_id or s.source_id.startswith("annotations:"))]
    assert len(accepted) + len(from_lines) == sum(1 for line in lines if line.strip())
    reasons = [s.reject.reason for s in samples if s.reject and s.unit == "journeydb-annotations"]
    assert sum("malformed JSONL line" in r for r in reasons) == 3 and any("unsafe img_path" in r for r in reasons)
    # The routing is reused on a second listing (same fingerprint), and reads identically.
    mtime = (tmp_path / "work" / "journeydb" / "arc-000.jsonl").stat().st_mtime_ns
    assert [(s.key, s.ordinal) for s in read_all(source, tmp_path / "work")[1]] == [(s.key, s.ordinal) for s in samples]
    assert (tmp_path / "work" / "journeydb" / "arc-000.jsonl").stat().st_mtime_ns == mtime


# ---- ImageNet ---------------------------------------------------------------------------------------------------------
def test_imagenet_class_index_and_units(tmp_path):
    jpg = jpeg_bytes(gradient(64, 64))
    for synset, count in (("n02", 3), ("n01", 2), ("n03", 1)):
        (tmp_path / "train" / synset).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "train" / synset / f"{synset}_{i}.JPEG").write_bytes(jpg)
    (tmp_path / "train" / "stray.jpg").write_bytes(jpg)  # not in a class folder: not a sample
    source = build_source(ImageNetConfig(root=str(tmp_path / "train"), unit_size=4))
    units, samples = read_all(source, tmp_path / "w")
    assert [len(u.paths) for u in units] == [4, 2]
    assert [(s.source_id.split("/")[0], s.class_label) for s in samples] == [
        ("n01", 0), ("n01", 0), ("n02", 1), ("n02", 1), ("n02", 1), ("n03", 2)]
    # A classes file fixes the index (and names) independently of which folders exist.
    (tmp_path / "map.txt").write_text("n00 zero\nn01 tench, Tinca tinca\nn02 goldfish\n")
    source = build_source(ImageNetConfig(root=str(tmp_path / "train"), classes_file=str(tmp_path / "map.txt"),
                                         class_name_caption=True))
    _, samples = read_all(source, tmp_path / "w")
    labels = {s.source_id.split("/")[0]: (s.class_label, s.captions.get("class_name"), s.reject) for s in samples}
    assert labels["n01"] == (1, "tench", None) and labels["n02"] == (2, "goldfish", None)
    assert labels["n03"][2].stage == "source" and "not in source.classes_file" in labels["n03"][2].reason


# ---- plain folders and webdataset -----------------------------------------------------------------------------------
def test_folder_with_captions_and_webdataset_tars(tmp_path):
    jpg = jpeg_bytes(gradient(64, 64))
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.png", "sub/c.jpeg"):
        (tmp_path / "d" / name).write_bytes(jpg)
    (tmp_path / "d" / "a.txt").write_text("  a caption \n")
    (tmp_path / "d" / ".hidden.jpg").write_bytes(jpg)
    write_tar(tmp_path / "d" / "shard-0.tar", [("k1.jpg", jpg), ("k1.txt", b"one"), ("k2.png", jpg),
                                                ("k3.txt", b"caption without image"), ("k4.jpg", jpg), ("k4.json", b"{}")])
    source = build_source(FolderConfig(root=str(tmp_path / "d"), unit_size=2))
    units, samples = read_all(source, tmp_path / "w")
    assert [(u.id, u.kind) for u in units] == [("wds-shard-0", "tar"), ("files-000000", "files"),
                                               ("files-000001", "files")]
    got = {s.source_id: (s.captions, s.reject.stage if s.reject else None) for s in samples}
    assert got == {
        "shard-0.tar/k1": ({"original": "one"}, None), "shard-0.tar/k2": ({}, None),
        "shard-0.tar/k3": ({}, "source"), "shard-0.tar/k4": ({}, None),
        "a.png": ({"original": "a caption"}, None), "b.jpg": ({}, None), "sub/c.jpeg": ({}, None)}


def test_unit_rows_round_trip():
    unit = WorkUnit(id="u", kind="files", root="/r", paths=("a", "b"), sidecar=None)
    assert WorkUnit.from_row(unit.to_row()) == unit


def test_missing_roots_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="source.root"):
        build_source(SA1BConfig(root=str(tmp_path / "nope"))).list_units(tmp_path)
    with pytest.raises(FileNotFoundError, match="source.annotations"):
        build_source(JourneyDBConfig(root=str(tmp_path), annotations=str(tmp_path / "x.jsonl"))).list_units(tmp_path)


@pytest.mark.parametrize("make_config", [
    lambda root: FolderConfig(root=str(root), unit_size=2),
    lambda root: SA1BConfig(root=str(root)),
])
def test_a_moved_source_lists_the_same_units(tmp_path, make_config):
    """`ray job submit` unpacks the working dir at a new temp path in each Ray session: the units (what binds the
    output folder) must not depend on where the source folder sits."""
    jpg = jpeg_bytes(gradient(32, 32))
    for copy in ("session_a/pkg", "session_b/pkg"):
        root = tmp_path / copy / "data"
        root.mkdir(parents=True)
        for name in ("a.jpg", "b.jpg", "c.jpg"):
            (root / name).write_bytes(jpg)
        write_tar(root / "sa_1.tar", [("sa_1.jpg", jpg), ("sa_1.json", sa1b_annotation(1, 32, 32, "sa_1.jpg"))])
    listed = [build_source(make_config(tmp_path / copy / "data")).list_units(tmp_path / f"w-{copy[:9]}")
              for copy in ("session_a/pkg", "session_b/pkg")]
    assert [u.to_row() for u in listed[0]] != [u.to_row() for u in listed[1]]  # absolute roots differ
    assert [u.identity() for u in listed[0]] == [u.identity() for u in listed[1]] != []
