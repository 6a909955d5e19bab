"""Write synthetic scenes in the real source layouts, so the demo runs the curation pipeline's real readers.

- SA-1B: tars `sa_000000.tar`, ... holding `sa_N.jpg` and `sa_N.json`, whose `image` block names the picture
  (`image_id`, `width`, `height`, `file_name`) and whose `annotations` list has one box per object (the real
  dataset's masks are omitted: readers must ignore annotations anyway).
- JourneyDB: image archives `imgs/000.tgz`, ... (members `000/<name>.jpg`) plus the annotation file
  `train_anno.jsonl`, one JSON object per line with `img_path` ("./000/<name>.jpg"), `prompt` (short, like a
  user's prompt), `Task1` (`Style`, `Content`) and `Task2` (`Caption`, a full description).
- ImageNet: `train/<synset>/<synset>_<n>.JPEG` class folders with synset-like names (one class per colour and
  shape), and `LOC_synset_mapping.txt` naming them.

Every picture's scene goes into the ground-truth sidecar `ground_truth.jsonl` (one line per picture: source,
source_id as the source's reader reports it, file, scene, and the fault injected, if any), which the
synthetic-scene captioner reads and the demo uses to check the filters. Some files are bad on purpose, so the
filters show their work: a truncated JPEG and a re-encoded near-duplicate of a picture in another tar (SA-1B),
a picture too small (JourneyDB) and one with an extreme aspect ratio (ImageNet).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from common.durable import atomic_write_bytes, publish, temp_name
from demo.scenes import (CLASSES, Scene, SceneSampler, class_name, dense_caption, render,
                                       sparse_caption)

GROUND_TRUTH_FILE = "ground_truth.jsonl"
JOURNEYDB_ANNOTATIONS = "train_anno.jsonl"
IMAGENET_MAPPING = "LOC_synset_mapping.txt"
FAULTS = ("truncated", "too_small", "extreme_aspect", "near_duplicate")


@dataclass
class LayoutCounts:
    """How many pictures of each source to write (bad files come on top)."""

    sa1b: int = 1200
    sa1b_per_tar: int = 400
    journeydb: int = 600
    imagenet_per_class: int = 50
    journeydb_non_square: float = 0.0  # share of JourneyDB pictures at 4:3 or 3:4 (alternating), for multi-aspect


@dataclass
class GroundTruth:
    """One picture as written: where it is, what it shows, and what is wrong with it (if anything)."""

    source: str  # sa1b | journeydb | imagenet
    source_id: str  # the id the source's reader reports (SA-1B image_id, JourneyDB img_path, ImageNet rel. path)
    file: str  # path relative to the source's root (inside the tar for SA-1B)
    scene: dict
    fault: str | None = None
    duplicate_of: str | None = None  # near-duplicates: the source_id of the original
    class_label: int | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items()}, sort_keys=True)


@dataclass
class WrittenLayouts:
    root: Path
    sa1b: Path
    journeydb: Path
    imagenet: Path
    ground_truth: Path
    records: list[GroundTruth] = field(default_factory=list)

    # Where each source's reader should look (the `source:` section of a curation config).
    @property
    def journeydb_images(self) -> Path:
        return self.journeydb / "imgs"

    @property
    def journeydb_annotations(self) -> Path:
        return self.journeydb / JOURNEYDB_ANNOTATIONS

    @property
    def imagenet_train(self) -> Path:
        return self.imagenet / "train"

    @property
    def imagenet_classes(self) -> Path:
        return self.imagenet / IMAGENET_MAPPING

    def faults(self) -> list[GroundTruth]:
        return [r for r in self.records if r.fault]

    def count(self, source: str) -> int:
        return sum(r.source == source for r in self.records)


def _jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _near_duplicate(image: Image.Image) -> bytes:
    """The kind of copy a crawl collects twice: downscaled and recompressed harder."""
    smaller = image.resize((image.width * 17 // 20, image.height * 17 // 20), Image.Resampling.LANCZOS)
    return _jpeg(smaller, quality=75)


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _sa1b_json(image_id: int, image: Image.Image, scene: Scene) -> bytes:
    from demo.scenes import object_box

    annotations = []
    for k, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = object_box(obj, image.width, image.height)
        annotations.append({"id": image_id * 100 + k, "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                            "area": round((x1 - x0) * (y1 - y0), 2), "predicted_iou": 1.0, "stability_score": 1.0})
    meta = {"image": {"image_id": image_id, "width": image.width, "height": image.height,
                      "file_name": f"sa_{image_id}.jpg"}, "annotations": annotations}
    return json.dumps(meta).encode()


def write_sa1b(root: Path, scenes: list[Scene], size: int, per_tar: int, first_id: int = 1,
               truncate: int | None = None, duplicate: tuple[int, int] | None = None) -> list[GroundTruth]:
    """SA-1B tars. `truncate` is the index of a scene whose JPEG is cut short (a download that died);
    `duplicate` = (index, original index) makes that picture a near-copy of an earlier one."""
    root.mkdir(parents=True, exist_ok=True)
    records: list[GroundTruth] = []
    pictures: dict[int, Image.Image] = {}
    for tar_index, start in enumerate(range(0, len(scenes), per_tar)):
        path = root / f"sa_{tar_index:06d}.tar"
        tmp = temp_name(path)
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, scene in enumerate(scenes[start:start + per_tar], start=start):
                image_id = first_id + i
                fault, dup_of = None, None
                if duplicate is not None and i == duplicate[0]:
                    scene = scenes[duplicate[1]]
                    image = pictures[duplicate[1]]
                    data, fault, dup_of = _near_duplicate(image), "near_duplicate", str(first_id + duplicate[1])
                else:
                    image = render(scene, size)
                    data = _jpeg(image)
                if duplicate is not None and i == duplicate[1]:
                    pictures[i] = image
                if i == truncate:
                    data, fault = data[: len(data) * 3 // 5], "truncated"
                _add_tar_member(tar, f"sa_{image_id}.jpg", data)
                _add_tar_member(tar, f"sa_{image_id}.json", _sa1b_json(image_id, image, scene))
                records.append(GroundTruth("sa1b", str(image_id), f"{path.name}/sa_{image_id}.jpg", scene.to_dict(),
                                           fault, dup_of))
        publish(tmp, path)
    return records


def _journeydb_line(img_path: str, scene: Scene) -> str:
    return json.dumps({
        "img_path": img_path,
        "prompt": f"{sparse_caption(scene)}, flat colours, minimal",
        "Task1": {"Style": ["flat", "minimalist"], "Content": [obj.shape for obj in scene.objects]},
        "Task2": {"Caption": dense_caption(scene)},
    })


def _non_square(i: int, share: float) -> bool:
    """Whether picture i is one of an evenly spread `share` of the pictures."""
    return int((i + 1) * share) > int(i * share)


def write_journeydb(root: Path, scenes: list[Scene], size: int, per_archive: int = 1000,
                    too_small: int | None = None, non_square: float = 0.0) -> list[GroundTruth]:
    """JourneyDB's image archives (`imgs/000.tgz`, ...) and annotation JSONL. `too_small` is the index of a
    scene rendered at 40 px; a `non_square` share of the pictures is 4:3 landscape or 3:4 portrait (alternately),
    `size` being their shorter side."""
    records, lines = [], []
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for archive_index, start in enumerate(range(0, len(scenes), per_archive)):
        folder = f"{archive_index:03d}"
        path = root / "imgs" / f"{folder}.tgz"
        tmp = temp_name(path)
        # No name and mtime 0 in the gzip header (the temp name is random): the same seed writes the same bytes.
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, scene in enumerate(scenes[start:start + per_archive], start=start):
                name = f"{folder}/{hashlib.sha1(f'journeydb-{i}'.encode()).hexdigest()[:16]}.jpg"
                fault = None
                shape = (size, size)
                if _non_square(i, non_square):
                    long = size * 4 // 3
                    # int(i * share) non-square pictures come before this one: alternate by that count.
                    shape = (long, size) if int(i * non_square) % 2 == 0 else (size, long)
                if i == too_small:
                    data, fault = _jpeg(render(scene, 40)), "too_small"
                else:
                    data = _jpeg(render(scene, shape))
                _add_tar_member(tar, name, data)
                lines.append(_journeydb_line(f"./{name}", scene))
                records.append(GroundTruth("journeydb", name, f"imgs/{folder}.tgz/{name}", scene.to_dict(), fault))
        publish(tmp, path)
    atomic_write_bytes(root / JOURNEYDB_ANNOTATIONS, ("\n".join(lines) + "\n").encode())
    return records


def synset(label: int) -> str:
    """A synset-like folder name for class `label`, in the same order as the classes."""
    return f"n{9_000_000 + label:08d}"


def write_imagenet(root: Path, scenes: list[Scene], labels: list[int], size: int,
                   extreme: int | None = None) -> list[GroundTruth]:
    """ImageNet class folders under `root/train`; `extreme` is the index of a scene rendered 5.5 times wider
    than tall."""
    records = []
    counters: dict[int, int] = {}
    for i, (scene, label) in enumerate(zip(scenes, labels)):
        counters[label] = counters.get(label, 0) + 1
        rel = f"{synset(label)}/{synset(label)}_{counters[label]}.JPEG"
        fault = None
        if i == extreme:
            image, fault = render(scene, (size * 11 // 2, size)), "extreme_aspect"
        else:
            image = render(scene, size)
        atomic_write_bytes(root / "train" / rel, _jpeg(image))
        records.append(GroundTruth("imagenet", rel, f"train/{rel}", scene.to_dict(), fault, class_label=label))
    mapping = "".join(f"{synset(k)} {class_name(*CLASSES[k])}\n" for k in range(len(CLASSES)))
    atomic_write_bytes(root / IMAGENET_MAPPING, mapping.encode())
    return records


def write_layouts(root: str | Path, counts: LayoutCounts = LayoutCounts(), size: int = 160, seed: int = 0,
                  with_faults: bool = True) -> WrittenLayouts:
    """All three sources under `root` (sa1b/, journeydb/, imagenet/) plus the ground-truth sidecar.

    Deterministic for a seed. With `with_faults`, four pictures are bad on purpose (see the module docstring);
    their sidecar lines name the fault so the demo can check each was rejected for it.
    """
    root = Path(root)
    sampler = SceneSampler(seed=seed)
    sa1b_scenes = sampler.scenes(counts.sa1b)
    jdb_scenes = sampler.scenes(counts.journeydb)
    labels = [label for label in range(len(CLASSES)) for _ in range(counts.imagenet_per_class)]
    imagenet_scenes = [sampler.class_scene(label) for label in labels]

    faults = with_faults and counts.sa1b > counts.sa1b_per_tar and counts.sa1b >= 3 and counts.journeydb >= 1
    # The near-duplicate is the last SA-1B picture, copying the first: they sit in different tars (work units),
    # so only a dataset-wide search finds them.
    records = write_sa1b(root / "sa1b", sa1b_scenes, size, counts.sa1b_per_tar,
                         truncate=1 if faults else None, duplicate=(len(sa1b_scenes) - 1, 0) if faults else None)
    records += write_journeydb(root / "journeydb", jdb_scenes, size, too_small=0 if faults else None,
                               non_square=counts.journeydb_non_square)
    records += write_imagenet(root / "imagenet", imagenet_scenes, labels, size,
                              extreme=0 if faults and labels else None)

    sidecar = root / GROUND_TRUTH_FILE
    atomic_write_bytes(sidecar, ("\n".join(r.to_json() for r in records) + "\n").encode())
    return WrittenLayouts(root=root, sa1b=root / "sa1b", journeydb=root / "journeydb", imagenet=root / "imagenet",
                          ground_truth=sidecar, records=records)


def read_ground_truth(path: str | Path) -> list[GroundTruth]:
    """The sidecar's records."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                records.append(GroundTruth(**json.loads(line)))
    return records
