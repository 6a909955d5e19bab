"""The demo's synthetic data: scene generator, evaluator, source layouts, captioner and text encoder.

Independent truth here is the generator's own record of what it drew (and hand-written captions): the evaluator
must read every ground-truth render back exactly, and must notice when a picture does not match a scene.
"""
from __future__ import annotations

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from curation.captioners import build_captioner
from demo import evaluator
from demo.layouts import FAULTS, LayoutCounts, read_ground_truth, synset, write_layouts
from demo.scenes import (CLASSES, COLOURS, HELD_OUT, POSITIONS, SHAPES, Scene, SceneObject,
                                       SceneSampler, dense_caption, held_out_scenes, render, sparse_caption)
from common.config import ConfigError


def _jpeg_roundtrip(image: Image.Image, quality: int = 92) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("size", [128, 64, (160, 120)])
def test_evaluator_reads_every_ground_truth_render(size):
    scenes = SceneSampler(seed=11).scenes(150)
    graded = [s for scene in scenes for s in evaluator.score(render(scene, size), scene)]
    assert len(graded) > 150  # some scenes hold two objects
    wrong = [s for s in graded if not (s.colour and s.shape and s.position and s.size)]
    assert wrong == []
    assert evaluator.accuracy(graded) == {"colour": 1.0, "shape": 1.0, "position": 1.0, "size": 1.0, "all": 1.0,
                                          "objects": len(graded)}


def test_evaluator_reads_jpeg_sources_and_held_out_scenes():
    scenes = SceneSampler(seed=12).scenes(60) + held_out_scenes()
    for scene in scenes:
        scores = evaluator.score(_jpeg_roundtrip(render(scene, 160)), scene)
        assert all(s.colour and s.shape and s.position for s in scores), scene


def test_evaluator_notices_each_wrong_attribute():
    drawn = Scene(objects=(SceneObject("circle", "red", "top left"),), background="grey")
    picture = render(drawn, 128)
    asked = {
        "colour": SceneObject("circle", "blue", "top left"),
        "shape": SceneObject("square", "red", "top left"),
        "position": SceneObject("circle", "red", "bottom right"),
    }
    for attribute, obj in asked.items():
        [result] = evaluator.score(picture, Scene(objects=(obj,)))
        for name in ("colour", "shape", "position"):
            assert getattr(result, name) is (name != attribute), (attribute, name)
    # An empty picture has nothing to grade: every attribute is wrong.
    blank = render(Scene(objects=(), background="white"), 128)
    [result] = evaluator.score(blank, drawn)
    assert result.found is None and not (result.colour or result.shape or result.position)


def test_evaluator_finds_objects_by_colour_and_position():
    scene = Scene(objects=(SceneObject("triangle", "yellow", "bottom left", "small"),
                           SceneObject("square", "green", "top right", "large")), background="black")
    found = evaluator.detect(render(scene, 128))
    assert [(o.colour, o.shape, o.position, o.size) for o in found] == [
        ("green", "square", "top right", "large"), ("yellow", "triangle", "bottom left", "small")]


def test_captions_written_by_hand():
    scene = Scene(objects=(SceneObject("circle", "red", "top left", "small"),
                           SceneObject("square", "blue", "bottom right", "large")), background="grey")
    assert dense_caption(scene) == ("a small red circle in the top left and a large blue square in the bottom right, "
                                    "on a grey background")
    assert sparse_caption(scene) == "a circle and a square"
    one = Scene(objects=(SceneObject("triangle", "yellow", "top right"),), background="white")
    assert dense_caption(one) == "a large yellow triangle in the top right, on a white background"
    assert sparse_caption(one) == "a triangle"


def test_sampler_holds_out_its_triples_but_shows_every_part():
    sampler = SceneSampler(seed=3)
    scenes = sampler.scenes(2000) + [sampler.class_scene(k % len(CLASSES)) for k in range(600)]
    triples = {obj.triple for scene in scenes for obj in scene.objects}
    assert not triples & HELD_OUT
    assert {c for c, _, _ in triples} == set(COLOURS)
    assert {s for _, s, _ in triples} == set(SHAPES)
    assert {p for _, _, p in triples} == set(POSITIONS)
    assert {(c, s) for c, s, _ in triples} == set(itertools.product(COLOURS, SHAPES))
    assert len(HELD_OUT) == len(POSITIONS) == 4
    assert {obj.triple for scene in held_out_scenes() for obj in scene.objects} == HELD_OUT
    # Same seed, same scenes (the demo is deterministic).
    assert SceneSampler(seed=3).scenes(20) == scenes[:20]
    assert Scene.from_dict(scenes[5].to_dict()) == scenes[5]


def test_scene_rejects_ambiguous_or_unknown_content():
    with pytest.raises(ValueError, match="colour"):
        SceneObject("circle", "purple", "top left")
    with pytest.raises(ValueError, match="position"):
        SceneObject("circle", "red", "center")
    with pytest.raises(ValueError, match="share a position"):
        Scene(objects=(SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "top left")))
    with pytest.raises(ValueError, match="share a colour"):
        Scene(objects=(SceneObject("circle", "red", "top left"), SceneObject("square", "red", "top right")))


def test_distinct_scenes_have_distinct_perceptual_hashes():
    """Global near-duplicate removal must not eat the dataset: the texture makes each picture's pHash its own."""
    import imagehash

    pictures = [_jpeg_roundtrip(render(scene, 160)) for scene in SceneSampler(seed=5).scenes(300)]
    hashes = np.array([imagehash.phash(p).hash.ravel() for p in pictures])
    distances = (hashes[:, None, :] != hashes[None, :, :]).sum(-1)[np.triu_indices(len(hashes), 1)]
    assert (distances <= 2).sum() <= 1  # of 44,850 pairs


def test_layouts_follow_the_real_formats(tmp_path):
    counts = LayoutCounts(sa1b=7, sa1b_per_tar=4, journeydb=5, imagenet_per_class=2)
    written = write_layouts(tmp_path, counts, size=96, seed=1)
    records = read_ground_truth(written.ground_truth)
    assert len(records) == 7 + 5 + 2 * len(CLASSES)
    assert sorted(r.fault for r in records if r.fault) == sorted(FAULTS)

    # SA-1B: two tars of jpg + json pairs; the json's image block names the picture.
    tars = sorted(written.sa1b.glob("sa_*.tar"))
    assert [t.name for t in tars] == ["sa_000000.tar", "sa_000001.tar"]
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        assert names[:2] == ["sa_1.jpg", "sa_1.json"] and len(names) == 8
        meta = json.loads(tar.extractfile("sa_3.json").read())
        assert meta["image"] == {"image_id": 3, "width": 96, "height": 96, "file_name": "sa_3.jpg"}
        assert len(meta["annotations"]) == len(records[2].scene["objects"])
        truncated = tar.extractfile("sa_2.jpg").read()
        original = Image.open(io.BytesIO(tar.extractfile("sa_1.jpg").read()))
    with pytest.raises(OSError):
        Image.open(io.BytesIO(truncated)).load()
    assert [r.source_id for r in records if r.source == "sa1b"] == [str(i) for i in range(1, 8)]

    # The near-duplicate (last SA-1B picture, in the other tar) shows the first one's scene, within 2 pHash bits.
    import imagehash

    dup = next(r for r in records if r.fault == "near_duplicate")
    assert (dup.source_id, dup.duplicate_of, dup.scene) == ("7", "1", records[0].scene)
    with tarfile.open(tars[1]) as tar:
        copy = Image.open(io.BytesIO(tar.extractfile("sa_7.jpg").read()))
        assert copy.size == (81, 81)
        assert imagehash.phash(copy) - imagehash.phash(original) <= 2

    # JourneyDB: an archive whose members the JSONL's img_paths name, with the fields the reader uses.
    lines = [json.loads(line) for line in written.journeydb_annotations.read_text().splitlines()]
    with tarfile.open(written.journeydb_images / "000.tgz") as archive:
        members = archive.getnames()
        small = Image.open(io.BytesIO(archive.extractfile(members[0]).read()))
    assert [line["img_path"] for line in lines] == [f"./{m}" for m in members] and len(members) == 5
    for line in lines:
        assert {"img_path", "prompt", "Task1", "Task2"} <= set(line) and "Style" in line["Task1"]
        assert line["Task2"]["Caption"].endswith("background")
    assert small.size == (40, 40)
    assert [r.source_id for r in records if r.source == "journeydb"] == members

    # ImageNet: one synset-like folder per class, named in the mapping; the extreme picture is 5.5:1.
    folders = sorted(p.name for p in written.imagenet_train.iterdir())
    assert folders == [synset(k) for k in range(len(CLASSES))] and folders[0] == "n09000000"
    assert written.imagenet_classes.read_text().splitlines()[1] == "n09000001 red square"
    extreme = next(r for r in records if r.fault == "extreme_aspect")
    with Image.open(written.imagenet_train / extreme.source_id) as picture:
        assert picture.size == (528, 96)
    labels = [r.class_label for r in records if r.source == "imagenet"]
    assert labels == sorted(labels) and set(labels) == set(range(len(CLASSES)))

    # Deterministic: the same seed writes the same bytes.
    again = write_layouts(tmp_path / "again", counts, size=96, seed=1)
    assert again.ground_truth.read_bytes() == written.ground_truth.read_bytes()
    for rel in ("sa1b/sa_000001.tar", "journeydb/imgs/000.tgz"):
        assert (again.root / rel).read_bytes() == (written.root / rel).read_bytes()


def test_synthetic_captioner_writes_captions_from_ground_truth(tmp_path):
    sidecar = tmp_path / "ground_truth.jsonl"
    scene = Scene(objects=(SceneObject("circle", "green", "bottom left", "small"),), background="black")
    sidecar.write_text(json.dumps({"source": "sa1b", "source_id": "7", "file": "sa_000000.tar/sa_7.jpg",
                                   "scene": scene.to_dict(), "fault": None}) + "\n")
    dense = build_captioner("demo.captioner:build_synthetic_captioner", ground_truth=str(sidecar), form="dense", name="dense")
    sparse = build_captioner("demo.captioner:build_synthetic_captioner", ground_truth=str(sidecar), form="sparse", name="sparse")
    assert (dense.name, sparse.name) == ("dense", "sparse")
    image = render(scene, 64)
    metas = [{"source": "sa1b", "source_id": "7"}, {"source": "sa1b", "source_id": "8"}]
    ok, missing = dense([image, image], [None, None], metas)
    assert ok.ok and ok.text == "a small green circle in the bottom left, on a black background"
    assert not missing.ok and missing.text is None and missing.reason == "no ground truth for sa1b:8"
    assert sparse([image], [None], metas[:1])[0].text == "a circle"
    assert dense.provenance()["backend"] == "synthetic" and len(dense.provenance()["ground_truth_sha1"]) == 40

    with pytest.raises(ConfigError, match="colour_words"):
        build_captioner("demo.captioner:build_synthetic_captioner", ground_truth=str(sidecar), colour_words=True)
    with pytest.raises(ConfigError, match="form"):
        build_captioner("demo.captioner:build_synthetic_captioner", ground_truth=str(sidecar), form="poetic")
    with pytest.raises(FileNotFoundError, match="ground_truth"):
        build_captioner("demo.captioner:build_synthetic_captioner", ground_truth=str(tmp_path / "nope.jsonl"))


def test_scene_text_encoder_loads_like_a_real_one(tmp_path):
    import torch

    from common.pretrained import load_text_encoder
    from demo.text_encoder import save_scene_text_encoder

    folder = save_scene_text_encoder(tmp_path / "t5", width=32)
    encoder = load_text_encoder(str(folder))
    caption = "a small red circle in the top left and a large blue square in the bottom right, on a grey background"
    ids = encoder.tokenizer(caption).input_ids
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["a", "small", "red", "circle", "in", "the", "top", "left", "and", "a", "large", "blue",
                      "square", "in", "the", "bottom", "right", ",", "on", "a", "grey", "background", "</s>"]
    assert encoder.tokenizer.unk_token_id not in ids
    features, mask = encoder.encode([caption, "a circle"])
    assert features.shape == (2, 120, 32) and mask.sum(1).tolist() == [23, 3]
    rms = features[0, :23].pow(2).mean(dim=-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 8.0), rtol=1e-3, atol=0)  # the final RMS norm's scale
