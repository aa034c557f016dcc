"""Comparison sheets: for each prompt the reference and the pruned image side by side, the prompt as caption.

A sheet stays under `MAX_SIDE` pixels on its long side whatever the model's resolution: large images are
downscaled, tiny ones (the 16 px digits) enlarged by an integer factor (crisp pixels) to a readable size, and
when even the smallest tiles do not fit, the sheet shows the first prompts only (every image is still written
on its own by `obsdiff eval`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MAX_SIDE = 2048  # long side of a sheet: one screen, small enough to attach to an issue or a README
READABLE = 96  # tiny images are enlarged (integer factor) to at least this long side
LARGE = 384  # large images start at this long side and shrink until the sheet fits
MIN_TILE = 48  # below this an image says nothing: show fewer prompts instead
MIN_CAPTION_WIDTH = 120  # a single-image cell is widened to this so its caption stays readable
GAP, PAD = 2, 8  # pixels between the images of one cell / around cells
FONT_SIZE, CAPTION_LINES = 12, 2
LINE_HEIGHT = FONT_SIZE + 3


@dataclass(frozen=True)
class Layout:
    """Where everything goes on a sheet; `origin(i, j)` is the top-left pixel of image j of cell i."""

    tile: tuple[int, int]  # (height, width) of one image on the sheet
    images_per_cell: int  # 2 for reference | pruned, 1 without a reference
    cols: int
    rows: int
    shown: int  # cells on the sheet (the first `shown` prompts)

    @property
    def images_width(self) -> int:
        return self.images_per_cell * self.tile[1] + (self.images_per_cell - 1) * GAP

    @property
    def cell_width(self) -> int:
        return max(self.images_width, MIN_CAPTION_WIDTH)

    @property
    def cell_height(self) -> int:
        return self.tile[0] + CAPTION_LINES * LINE_HEIGHT + 4

    @property
    def header_height(self) -> int:
        return LINE_HEIGHT + PAD

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the sheet in pixels."""
        width = self.cols * self.cell_width + (self.cols + 1) * PAD
        height = self.header_height + self.rows * self.cell_height + (self.rows + 1) * PAD
        return width, height

    def cell_origin(self, i: int) -> tuple[int, int]:
        r, c = divmod(i, self.cols)
        return PAD + c * (self.cell_width + PAD), self.header_height + PAD + r * (self.cell_height + PAD)

    def origin(self, i: int, j: int) -> tuple[int, int]:
        x, y = self.cell_origin(i)
        return x + (self.cell_width - self.images_width) // 2 + j * (self.tile[1] + GAP), y


def tile_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """An image's size on the sheet for a target long side: an integer enlargement when the target is larger
    (pixels stay square blocks), a proportional reduction otherwise."""
    longest = max(height, width)
    if long_side >= longest:
        k = long_side // longest
        return height * k, width * k
    scale = long_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def _smaller(long_side: int, longest: int) -> int:
    """The next candidate long side: one integer factor less while enlarging, 10 % less otherwise."""
    if long_side > longest:
        return longest * (long_side // longest - 1)
    return int(long_side * 0.9)


def _best_grid(n: int, tile: tuple[int, int], per_cell: int) -> Layout:
    """The column count that makes the sheet's long side shortest (closest to square)."""
    layouts = [Layout(tile, per_cell, cols, -(-n // cols), n) for cols in range(1, n + 1)]
    return min(layouts, key=lambda lay: (max(lay.size), lay.rows))


def plan_layout(n: int, height: int, width: int, images_per_cell: int = 2, max_cells: int = 40,
                max_side: int = MAX_SIDE) -> Layout:
    """The largest readable tiles for `min(n, max_cells)` cells whose sheet fits in `max_side`; fewer cells
    when even `MIN_TILE` tiles do not fit."""
    shown = min(n, max_cells)
    longest = max(height, width)
    long_side = longest * math.ceil(READABLE / longest) if longest < READABLE else min(longest, LARGE)
    while True:
        layout = _best_grid(shown, tile_size(height, width, long_side), images_per_cell)
        smaller = _smaller(long_side, longest)
        if max(layout.size) <= max_side or smaller < min(MIN_TILE, longest):
            break
        long_side = smaller
    if max(layout.size) > max_side:
        fit_cols = max(1, (max_side - PAD) // (layout.cell_width + PAD))
        fit_rows = max(1, (max_side - layout.header_height - PAD) // (layout.cell_height + PAD))
        layout = _best_grid(min(shown, fit_cols * fit_rows), layout.tile, images_per_cell)
    return layout


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, C) float in [0, 1] -> (H, W, C) uint8."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def to_pil(image: np.ndarray):
    """(H, W, C) float in [0, 1] -> a PIL image (grey for one channel, RGB for three)."""
    from PIL import Image

    pixels = to_uint8(image)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def resize_tile(image: np.ndarray, tile: tuple[int, int]):
    """An image as it appears on the sheet: RGB, `tile` = (height, width); nearest neighbour when enlarging
    (digits stay crisp), Lanczos when reducing."""
    from PIL import Image

    pil = to_pil(image).convert("RGB")
    if pil.size == (tile[1], tile[0]):
        return pil
    enlarging = tile[0] >= pil.size[1]
    return pil.resize((tile[1], tile[0]), Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS)


def _cut(line: str, font, width: int, mark: bool) -> str:
    if not mark and font.getlength(line) <= width:
        return line
    while line and font.getlength(line + "…") > width:
        line = line[:-1]
    return line.rstrip() + "…"


def fit_text(text: str, font, width: int, max_lines: int) -> list[str]:
    """Word-wrap `text` into at most `max_lines` lines of `width` pixels; an ellipsis marks a cut."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    return [_cut(line, font, width, mark=bool(words) and k == len(lines) - 1) for k, line in enumerate(lines)]


def render_sheet(columns: list[np.ndarray], prompts: list[str], labels: list[str], max_cells: int = 40,
                 max_side: int = MAX_SIDE):
    """A PIL RGB sheet: cell i holds image i of every array in `columns` (each (N, H, W, C) in [0, 1]), left to
    right, captioned with `prompts[i]`; the header names the columns (`labels`)."""
    from PIL import Image, ImageDraw, ImageFont

    n, height, width = columns[0].shape[:3]
    layout = plan_layout(n, height, width, len(columns), max_cells, max_side)
    if layout.shown < n:
        log.info("the sheet shows %d of %d prompts; every image is in images/", layout.shown, n)
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=FONT_SIZE)
    header = "   |   ".join(labels) if len(labels) > 1 else labels[0]
    draw.text((PAD, PAD // 2), fit_text(header, font, layout.size[0] - 2 * PAD, 1)[0], fill="black", font=font)
    for i in range(layout.shown):
        for j, images in enumerate(columns):
            sheet.paste(resize_tile(images[i], layout.tile), layout.origin(i, j))
        x, y = layout.cell_origin(i)
        caption = fit_text(prompts[i], font, layout.cell_width, CAPTION_LINES)
        for k, line in enumerate(caption):
            draw.text((x, y + layout.tile[0] + 2 + k * LINE_HEIGHT), line, fill="black", font=font)
    return sheet
