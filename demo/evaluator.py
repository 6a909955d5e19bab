"""A deterministic judge for synthetic scenes: read a picture back into colours, shapes and positions, and grade it
against the scene it was asked to show.

How it sees (no learned weights, so a score means the same thing on every run):
1. The background colour is the median of the border pixels (objects never touch the border).
2. Each pixel takes the label of the nearest colour among that background and the object palette, so blurry or
   slightly-off colours from a generator still land somewhere sensible.
3. Each object colour's connected regions above a minimum area are objects. An object's position is the grid cell
   of its bounding-box centre and its size class follows from its area. Its shape: an upright triangle is
   bottom-heavy (its top third holds far fewer pixels than its bottom third, even when blurred); otherwise it is the
   square or the inscribed circle, whichever overlaps its pixels better within the box (intersection over union:
   a square fills the corners a circle leaves empty).
Grading (`score`): a scene of N objects is graded on the N largest objects found, so speckles of every colour in a
noisy picture do not pass for the object asked for. Each object asked for is matched with one of those of its
colour; when none has that colour, with the largest one left, whose shape and position are still graded but whose
colour counts as wrong.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from demo.scenes import COLOURS, GRID, POSITIONS, SIZES, Scene, SceneObject

MIN_AREA_FRACTION = 0.004  # regions smaller than this share of the image are specks, not objects
# An upright triangle's top third holds 1/9 of its area, its bottom third 5/9; a circle's or square's hold equal
# shares. Below this ratio of top to bottom an object is a triangle.
TRIANGLE_TOP_SHARE = 0.6
_SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2
_BOX_SHARE = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # share of its bounding box a shape fills
_OBJECT_COLOURS = tuple(COLOURS)
_PALETTE = np.asarray([COLOURS[name] for name in _OBJECT_COLOURS], dtype=np.float32)


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    position: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in pixels
    area: int  # pixels
    fit: float  # IoU of the pixels with the chosen ideal shape


@dataclass(frozen=True)
class ObjectScore:
    expected: dict  # the SceneObject asked for, as a dict
    found: dict | None  # the DetectedObject graded, as a dict; None when the picture holds no object at all
    colour: bool
    shape: bool
    position: bool
    size: bool


def _as_array(image: Image.Image | np.ndarray | str | Path) -> np.ndarray:
    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            image = img.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {array.shape}")
    return array


def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal shapes filling a box of this size, sampled at pixel centres."""
    v = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
    u = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u - 0.5) <= v / 2,
    }


def _iou(mask: np.ndarray, template: np.ndarray) -> float:
    return float(np.logical_and(mask, template).sum() / max(np.logical_or(mask, template).sum(), 1))


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(shape, IoU of the mask with that ideal shape) for an object's pixels cropped to its bounding box."""
    height, width = mask.shape
    third = max(1, height // 3)
    templates = _templates(height, width)
    if mask[:third].sum() < TRIANGLE_TOP_SHARE * mask[height - third:].sum():
        return "triangle", _iou(mask, templates["triangle"])
    circle, square = _iou(mask, templates["circle"]), _iou(mask, templates["square"])
    return ("circle", circle) if circle >= square else ("square", square)


def background_colour(array: np.ndarray) -> np.ndarray:
    """Median RGB of the one-pixel border."""
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return np.median(border, axis=0)


def detect(image: Image.Image | np.ndarray | str | Path, min_area_fraction: float = MIN_AREA_FRACTION) -> list[DetectedObject]:
    """Objects in a picture, largest first."""
    array = _as_array(image)
    height, width, _ = array.shape
    palette = np.concatenate([background_colour(array)[None, :], _PALETTE])  # label 0 = background
    distances = ((array[:, :, None, :] - palette[None, None, :, :]) ** 2).sum(axis=-1)
    labels = distances.argmin(axis=-1)
    min_area = max(1, int(round(min_area_fraction * height * width)))
    short = min(height, width)
    found: list[DetectedObject] = []
    for index, colour in enumerate(_OBJECT_COLOURS, start=1):
        regions, count = ndimage.label(labels == index)
        if count == 0:
            continue
        areas = ndimage.sum_labels(np.ones_like(regions), regions, index=np.arange(1, count + 1))
        for region, (rows, cols) in enumerate(ndimage.find_objects(regions), start=1):
            area = int(areas[region - 1])
            if area < min_area:
                continue
            mask = regions[rows, cols] == region
            shape, fit = _classify_shape(mask)
            cx, cy = (cols.start + cols.stop) / 2.0, (rows.start + rows.stop) / 2.0
            col = min(int(cx * GRID // width), GRID - 1)
            row = min(int(cy * GRID // height), GRID - 1)
            # Size from the area, which anti-aliased edges barely change (a bounding box grows a pixel).
            half_extent = np.sqrt(area / _BOX_SHARE[shape]) / 2.0 / short
            found.append(DetectedObject(
                colour=colour, shape=shape, position=POSITIONS[row * GRID + col],
                size="small" if half_extent < _SIZE_THRESHOLD else "large",
                box=(cols.start, rows.start, cols.stop, rows.stop), area=area, fit=round(fit, 4),
            ))
    found.sort(key=lambda obj: (-obj.area, obj.colour))
    return found


def score(image: Image.Image | np.ndarray | str | Path, scene: Scene) -> list[ObjectScore]:
    """Grade a picture against the scene it should show: one ObjectScore per object of the scene."""
    unused = detect(image)[: len(scene.objects)]
    matched: list[DetectedObject | None] = [None] * len(scene.objects)
    for i, expected in enumerate(scene.objects):  # first every object whose colour is among the largest found
        same_colour = [obj for obj in unused if obj.colour == expected.colour]
        if same_colour:
            matched[i] = same_colour[0]
            unused.remove(same_colour[0])
    for i in range(len(matched)):  # then the rest, largest first
        if matched[i] is None and unused:
            matched[i] = unused.pop(0)
    return [_grade(expected, found) for expected, found in zip(scene.objects, matched)]


def _grade(expected: SceneObject, found: DetectedObject | None) -> ObjectScore:
    if found is None:
        return ObjectScore(expected=asdict(expected), found=None, colour=False, shape=False, position=False, size=False)
    return ObjectScore(
        expected=asdict(expected), found=asdict(found), colour=found.colour == expected.colour,
        shape=found.shape == expected.shape, position=found.position == expected.position,
        size=found.size == expected.size,
    )


ATTRIBUTES = ("colour", "shape", "position", "size")


def accuracy(scores: list[ObjectScore]) -> dict[str, float]:
    """Share of graded objects with each attribute right, and with colour, shape and position all right."""
    if not scores:
        raise ValueError("accuracy of no scores is undefined")
    n = len(scores)
    result = {name: sum(getattr(s, name) for s in scores) / n for name in ATTRIBUTES}
    result["all"] = sum(s.colour and s.shape and s.position for s in scores) / n
    result["objects"] = n
    return result
