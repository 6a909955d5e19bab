"""Procedural scenes whose generator knows the ground truth: coloured shapes at named positions on a background.

The demo needs data a model can learn in minutes on a CPU and an exact answer key to grade what it generates.
A scene is a small record (`Scene`): up to a few objects, each a shape kind, a colour, a size and one of four named
positions (the quadrants), on a named background colour with a faint texture. `render` draws it at any pixel size,
`dense_caption` / `sparse_caption` describe it in words, and `demo.evaluator` reads a picture back
into the same vocabulary.

Held-out combinations: `HELD_OUT` lists (colour, shape, position) triples that `SceneSampler` never puts in a
training scene, while every colour, shape and position (and every colour-shape pair) still appears elsewhere.
Prompts built from those triples (`held_out_scenes`) test composition rather than memory.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Palettes are far apart in RGB so the evaluator can name a colour by its nearest entry even in a blurry sample.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (40, 170, 70),
    "blue": (45, 85, 225),
    "yellow": (240, 205, 35),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (238, 238, 238),
    "black": (22, 22, 22),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Half the object's extent, as a fraction of the short side. Objects are large on purpose: a denoiser's loss is
# spread over pixels, so the smaller the objects, the less of its training signal is about them.
SIZES: dict[str, float] = {"small": 0.15, "large": 0.2}

# Row-major 2x2 grid (GRID x GRID cells); the phrase is how a caption places an object there.
GRID = 2
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
POSITION_PHRASES: dict[str, str] = {position: f"in the {position}" for position in POSITIONS}

# One held-out triple per position; colour and shape cycle with different periods, so each held-out colour-shape
# pair is still seen at the three other positions.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    (tuple(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)], POSITIONS[i]) for i in range(len(POSITIONS))
)

MAX_JITTER = 0.02  # object centre offset from its cell centre, fraction of the canvas side
SCALE_RANGE = (0.97, 1.03)  # size variation within a size class, small enough to tell the classes apart
TEXTURE_AMPLITUDE = 20.0  # background texture, 8-bit levels: distinct scenes get distinct perceptual hashes
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    position: str
    size: str = "large"
    scale: float = 1.0  # multiplies SIZES[size]
    jitter: tuple[float, float] = (0.0, 0.0)  # (dx, dy) centre offset, fraction of the canvas side

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.position, POSITIONS, "position"), (self.size, SIZES, "size")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; known: {list(allowed)}")

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str = "grey"
    texture_seed: int = 0

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {list(BACKGROUNDS)}")
        positions = [obj.position for obj in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position: {positions}")
        colours = [obj.colour for obj in self.objects]
        if len(set(colours)) != len(colours):
            # The evaluator finds an object by its colour; two of one colour would be ambiguous to grade.
            raise ValueError(f"two objects share a colour: {colours}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        objects = tuple(SceneObject(**{**obj, "jitter": tuple(obj.get("jitter", (0.0, 0.0)))}) for obj in data["objects"])
        return cls(objects=objects, background=data.get("background", "grey"), texture_seed=int(data.get("texture_seed", 0)))


# ----------------------------------------------------------------------------------------------------------- words

def _object_phrase(obj: SceneObject, with_size: bool = True) -> str:
    size = f"{obj.size} " if with_size else ""
    return f"a {size}{obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}"


def dense_caption(scene: Scene) -> str:
    """Every attribute of every object: 'a small red circle in the top left and a large blue square in the bottom
    right, on a grey background'."""
    return " and ".join(_object_phrase(obj) for obj in scene.objects) + f", on a {scene.background} background"


def sparse_caption(scene: Scene) -> str:
    """Only the shape nouns, as a short alt-text would have it: 'a circle and a square'."""
    return " and ".join(f"a {obj.shape}" for obj in scene.objects)


def class_name(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


CLASSES: tuple[tuple[str, str], ...] = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)


# ------------------------------------------------------------------------------------------------------- geometry

def cell_centre(position: str, width: int, height: int) -> tuple[float, float]:
    """Pixel centre (x, y) of a named grid cell."""
    row, col = divmod(POSITIONS.index(position), GRID)
    return ((col + 0.5) * width / GRID, (row + 0.5) * height / GRID)


def object_box(obj: SceneObject, width: int, height: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the object's bounding box in pixels; shapes are sized by the short side."""
    cx, cy = cell_centre(obj.position, width, height)
    short = min(width, height)
    cx += obj.jitter[0] * short
    cy += obj.jitter[1] * short
    r = SIZES[obj.size] * obj.scale * short
    return (cx - r, cy - r, cx + r, cy + r)


def _shape_mask(obj: SceneObject, width: int, height: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one object, drawn at SUPERSAMPLE x and box-filtered down."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * s for v in object_box(obj, width, height))
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    else:  # an upright isosceles triangle filling its box: apex top centre, base along the bottom
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=255)
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(scene: Scene, width: int, height: int) -> np.ndarray:
    """The background colour plus a faint smooth texture (seeded), float32 [H, W, 3]."""
    rng = np.random.default_rng(scene.texture_seed)
    coarse = rng.uniform(-1.0, 1.0, size=(5, 5)).astype(np.float32)
    field_img = Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    texture = np.clip(np.asarray(field_img), -1.0, 1.0) * TEXTURE_AMPLITUDE
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    return base[None, None, :] + texture[:, :, None]


def render(scene: Scene, size: int | tuple[int, int] = 64) -> Image.Image:
    """Draw a scene as an RGB image; `size` is a side or (width, height). Positions are thirds of each side."""
    width, height = (size, size) if isinstance(size, int) else size
    pixels = _background(scene, width, height)
    for obj in scene.objects:
        alpha = _shape_mask(obj, width, height)[:, :, None]
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)[None, None, :]
        pixels = pixels * (1.0 - alpha) + colour * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


# -------------------------------------------------------------------------------------------------------- sampling

@dataclass
class SceneSampler:
    """Random training scenes, reproducible from `seed`, never containing a held-out (colour, shape, position).

    `two_object_share` of scenes hold two objects (distinct positions and colours); the rest hold one.
    """

    seed: int = 0
    two_object_share: float = 0.4
    held_out: frozenset = field(default_factory=lambda: HELD_OUT)
    backgrounds: Sequence[str] = tuple(BACKGROUNDS)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def _object(self, colour: str | None = None, shape: str | None = None, taken: Iterable[str] = (),
                used_colours: Iterable[str] = ()) -> SceneObject:
        rng = self._rng
        taken, used_colours = set(taken), set(used_colours)
        while True:
            obj_colour = colour or rng.choice([c for c in COLOURS if c not in used_colours])
            obj_shape = shape or rng.choice(SHAPES)
            position = rng.choice([p for p in POSITIONS if p not in taken])
            if (obj_colour, obj_shape, position) in self.held_out:
                continue
            return SceneObject(
                shape=obj_shape, colour=obj_colour, position=position, size=rng.choice(tuple(SIZES)),
                scale=round(rng.uniform(*SCALE_RANGE), 4),
                jitter=(round(rng.uniform(-MAX_JITTER, MAX_JITTER), 4), round(rng.uniform(-MAX_JITTER, MAX_JITTER), 4)),
            )

    def scene(self) -> Scene:
        """A scene of one or two objects."""
        rng = self._rng
        first = self._object()
        objects = [first]
        if rng.random() < self.two_object_share:
            objects.append(self._object(taken=[first.position], used_colours=[first.colour]))
        return Scene(objects=tuple(objects), background=rng.choice(list(self.backgrounds)),
                     texture_seed=rng.randrange(2**31))

    def class_scene(self, label: int) -> Scene:
        """A one-object scene of class `label` (an index into CLASSES), for class-conditional data."""
        colour, shape = CLASSES[label]
        obj = self._object(colour=colour, shape=shape)
        return Scene(objects=(obj,), background=self._rng.choice(list(self.backgrounds)),
                     texture_seed=self._rng.randrange(2**31))

    def scenes(self, count: int) -> list[Scene]:
        return [self.scene() for _ in range(count)]


def held_out_scenes(size: str = "large", background: str = "grey") -> list[Scene]:
    """One single-object scene per held-out triple, centred in its cell: the evaluation prompts."""
    return [
        Scene(objects=(SceneObject(shape=shape, colour=colour, position=position, size=size),), background=background)
        for colour, shape, position in sorted(HELD_OUT, key=lambda t: POSITIONS.index(t[2]))
    ]
