"""Image grids for people to look at (sampling CLI, the trainer's periodic samples, the demo), and atomic PNG writes."""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from common.durable import publish, temp_name


def image_grid(images: Sequence[Image.Image], cols: int | None = None, pad: int = 2,
               captions: Sequence[str] | None = None, caption_lines: int = 2,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile images row-major into an RGB grid, `pad` pixels around and between cells.

    Cells are as large as the largest image; smaller images sit centred in theirs (bucketed samples differ in
    size). `cols` defaults to a near-square layout. With `captions`, each cell gets up to `caption_lines` lines of
    text under its image (wrapped to the cell width, the rest elided).
    """
    if not images:
        raise ValueError("images: need at least one image for a grid")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"captions: got {len(captions)} for {len(images)} images")
    if pad < 0:
        raise ValueError(f"pad: must be >= 0, got {pad}")
    cols = cols or math.ceil(math.sqrt(len(images)))
    if cols < 1:
        raise ValueError(f"cols: must be >= 1, got {cols}")
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)

    font = ImageFont.load_default() if captions is not None else None
    text_h = 0
    if font is not None:
        line_h = font.getbbox("Ag")[3] + 2
        text_h = caption_lines * line_h + 2
        # textwrap needs room for its "..." placeholder, even in cells narrower than that.
        chars = max(4, cell_w // max(1, int(font.getlength("x"))))

    grid = Image.new("RGB", (cols * cell_w + (cols + 1) * pad, rows * (cell_h + text_h) + (rows + 1) * pad), background)
    draw = ImageDraw.Draw(grid) if font is not None else None
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        x0 = pad + col * (cell_w + pad)
        y0 = pad + row * (cell_h + text_h + pad)
        grid.paste(image.convert("RGB"), (x0 + (cell_w - image.width) // 2, y0 + (cell_h - image.height) // 2))
        if draw is not None:
            lines = textwrap.wrap(captions[i], width=chars, max_lines=caption_lines, placeholder="...") or [""]
            for j, line in enumerate(lines):
                draw.text((x0, y0 + cell_h + 1 + j * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG through a temp name in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    image.save(tmp, format="PNG")
    publish(tmp, path)
    return path
