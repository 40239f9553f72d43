"""Pictures a user can read: the labelled validation grid, the loss chart's axis and legend, and the
progress lines of the long image commands."""

import numpy as np
import pytest
from PIL import Image

from loraforge.cli import main
from loraforge.train.charts import draw_loss_curve, log_ticks, step_ticks
from loraforge.train.image import labelled_grid


def _image(colour, size=32):
    return Image.new("RGB", (size, size), colour)


def test_labelled_grid_rows_are_prompts_and_columns_base_half_full():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    rows = [(f"prompt {i}", [_image(c) for c in row]) for i, row in enumerate(colours)]
    columns = ["base", "adapter at 0.5", "adapter at 1.0"]
    grid = labelled_grid(rows, columns, "step 1500: seed 0+row")
    cell, gap, line = 128, 4, 16  # 32 px images upscaled x4
    assert grid.size[1] == line + gap + line + 2 * (line + cell + gap) + gap
    assert grid.size[0] >= 3 * (cell + gap) + gap
    a = np.asarray(grid)
    y = line + gap + line
    for row in colours:
        band = a[y : y + line]  # the prompt's label above its images
        assert (band.min(axis=-1) < 128).sum() > 20, "the prompt is written on the grid"
        y += line
        for c, colour in enumerate(row):
            x = gap + c * (cell + gap)
            assert (a[y : y + cell, x : x + cell] == colour).all()  # the whole upscaled cell
        y += cell + gap
    top = a[: line + gap + line]
    assert (top.min(axis=-1) < 128).sum() > 50, "title and column names are written"


def test_grid_upscales_nearest_neighbour():
    pattern = np.zeros((32, 32, 3), dtype=np.uint8)
    pattern[::2, ::2] = 255
    grid = np.asarray(labelled_grid([("p", [Image.fromarray(pattern)])], ["base"], "t"))
    cell = grid[52 : 52 + 128, 4 : 4 + 128]  # below title, column names and the label
    assert set(np.unique(cell)) == {0, 255}  # no blending
    assert (cell[:4, :4] == 255).all() and (cell[4:8, :4] == 0).all()


def _digits(value: float) -> int:
    """Significant digits of a tick label."""
    return len(f"{value:g}".split("e")[0].replace(".", "").strip("0"))


@pytest.mark.parametrize("lo,hi", [(0.08, 0.9), (0.21, 0.34), (0.27, 0.29), (0.5, 40.0), (1.3e-3, 2e-3)])
def test_log_ticks_are_round_values_inside_the_range(lo, hi):
    ticks = log_ticks(lo, hi)
    assert len(ticks) >= 2 and ticks == sorted(ticks)
    assert all(lo * 0.999 <= t <= hi * 1.001 for t in ticks)
    assert len(ticks) >= 3 and all(_digits(t) <= 3 for t in ticks)
    if hi / lo > 3:
        assert all(_digits(t) == 1 for t in ticks)
    assert log_ticks(0.08, 0.9) == [0.1, 0.2, 0.5]


def test_step_ticks_are_round():
    assert step_ticks(1500) == [0, 500, 1000, 1500]
    assert step_ticks(400) == [0, 100, 200, 300, 400]
    assert step_ticks(7) == [0, 2, 4, 6]


def test_loss_chart_is_log_scale_with_a_legend(tmp_path):
    rows = [{"step": s, "loss": 0.9 * (s + 1) ** -0.3} for s in range(0, 300)]
    rows += [{"step": s, "eval_loss": 0.5 * (s + 1) ** -0.2} for s in (0, 100, 200, 299)]
    path = draw_loss_curve(rows, tmp_path / "loss.png", eval_label="eval loss (on training images)")
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    # The three curves' colours (raw train, smoothed train, eval) all appear, in the plot and legend.
    for colour in [(160, 195, 225), (31, 119, 180), (255, 127, 14)]:
        assert (np.abs(a - colour).sum(axis=-1) == 0).sum() > 30
    assert draw_loss_curve([], tmp_path / "none.png") is None


def test_generate_image_reports_progress(tiny_sd, tmp_path, capsys):
    args = ["generate-image", "--base", tiny_sd, "--prompt", "a circle", "--prompt", "a square"]
    assert main(args + ["--num-images", "2", "--steps", "2", "--out", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert "generate-image: 4/4 images" in captured.err and "ETA" in captured.err
    assert captured.out.lstrip().startswith("{")
