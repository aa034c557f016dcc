"""The eval sheet: reference and pruned image per prompt, captioned, under 2048 px whatever the resolution."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFont

from obsdiff.cli import cli
from obsdiff.eval.sheet import (
    FONT_SIZE,
    LARGE,
    MAX_SIDE,
    READABLE,
    fit_text,
    plan_layout,
    render_sheet,
    resize_tile,
    tile_size,
)


def random_images(n, h, w, c, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c), dtype=np.float32)


@pytest.mark.parametrize("n", [1, 8, 40, 200])
@pytest.mark.parametrize("h, w", [(1024, 1024), (28, 28), (16, 16), (1024, 576)])
def test_sheet_stays_under_the_bound(n, h, w):
    layout = plan_layout(n, h, w, max_cells=n)
    assert max(layout.size) <= MAX_SIDE
    assert layout.cols * layout.rows >= layout.shown >= min(n, 40)  # shrinking tiles comes before dropping prompts
    th, tw = layout.tile
    assert max(th, tw) <= max(LARGE, READABLE)  # never blown up past a readable size
    if max(h, w) < READABLE:
        assert th % h == 0 and tw % w == 0  # tiny images: integer enlargement, crisp pixels


def test_tile_sizes():
    assert plan_layout(1, 28, 28).tile == (112, 112)  # digits: 4x to a readable size, not to fill the sheet
    assert plan_layout(1, 16, 16).tile == (96, 96)
    assert plan_layout(2, 1024, 1024).tile == (LARGE, LARGE)
    assert plan_layout(2, 200, 200).tile == (200, 200)  # mid-size images keep their size
    assert tile_size(1024, 576, 256) == (256, 144)
    layout = plan_layout(500, 1024, 1024, max_cells=500)  # too many even at the smallest tile: fewer prompts
    assert layout.shown < 500 and max(layout.size) <= MAX_SIDE


@pytest.mark.parametrize("h, w, c", [(1024, 1024, 3), (28, 28, 1), (96, 160, 3)])
def test_cell_pixels_are_the_resized_images(h, w, c):
    ref, pruned = random_images(5, h, w, c, seed=1), random_images(5, h, w, c, seed=2)
    prompts = [f"prompt number {i}" for i in range(5)]
    sheet = render_sheet([ref, pruned], prompts, ["left: reference", "right: pruned"])
    layout = plan_layout(5, h, w)
    assert sheet.size == layout.size and sheet.mode == "RGB"
    th, tw = layout.tile
    pixels = np.asarray(sheet)
    for i in range(5):
        for j, images in enumerate((ref, pruned)):
            x, y = layout.origin(i, j)
            expected = np.asarray(resize_tile(images[i], layout.tile))
            assert expected.shape == (th, tw, 3)
            np.testing.assert_array_equal(pixels[y:y + th, x:x + tw], expected)
    x, y = layout.origin(0, 1)
    assert x == layout.origin(0, 0)[0] + tw + 2  # pruned right of its reference, 2 px apart
    below = pixels[y + th + 2:y + th + 2 + FONT_SIZE, x - tw - 2:x + tw]
    assert (below < 128).any()  # the caption is drawn under the pair


def test_single_column_without_reference():
    images = random_images(3, 16, 16, 1)
    sheet = render_sheet([images], ["a", "b", "c"], ["model"])
    layout = plan_layout(3, 16, 16, images_per_cell=1)
    assert sheet.size == layout.size
    x, y = layout.origin(2, 0)
    tile = np.asarray(sheet)[y:y + 96, x:x + 96]
    np.testing.assert_array_equal(tile, np.asarray(resize_tile(images[2], (96, 96))))
    assert np.array_equal(tile[:6, :6, 0], np.full((6, 6), tile[0, 0, 0]))  # nearest: 6x6 blocks of one pixel


def test_captions_wrap_and_cut_with_an_ellipsis():
    font = ImageFont.load_default(size=FONT_SIZE)
    assert fit_text("a cat", font, 200, 2) == ["a cat"]
    lines = fit_text("a very long prompt about a lighthouse at sunset painted in oil on canvas", font, 100, 2)
    assert len(lines) == 2 and lines[1].endswith("…") and all(font.getlength(s) <= 100 for s in lines)
    assert fit_text("Supercalifragilisticexpialidocious", font, 40, 2)[0].endswith("…")


def test_eval_writes_sheet_images_and_json(tiny_sd3_dir, tmp_path):
    out = tmp_path / "eval"
    r = CliRunner().invoke(cli, ["eval", str(tiny_sd3_dir), "--reference", str(tiny_sd3_dir), "--num-images", "3",
                                 "--steps", "2", "--sheet-prompts", "2", "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)  # --json: stdout is the record alone, the same as metrics.json
    assert "load models: 100%" in r.stderr and "2/2" in r.stderr  # model and reference, with a progress bar
    assert printed == json.loads((out / "metrics.json").read_text())
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{k}_{i:04d}.png" for k in ("pruned", "ref") for i in range(3)]
    image = np.asarray(Image.open(out / "images" / "pruned_0001.png"))
    assert image.shape[:2] == (16, 16)  # the model's own resolution, not the sheet's tile size
    sheet = Image.open(out / "sheet.png")
    layout = plan_layout(2, 16, 16)  # --sheet-prompts 2 of 3
    assert sheet.size == layout.size and layout.shown == 2
