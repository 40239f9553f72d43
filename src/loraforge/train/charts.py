"""The loss curve of a run (``loss.png``), drawn with PIL so no plotting library is needed.

The loss axis is logarithmic (losses fall by factors, and a log axis keeps both the first steps and
the end readable) with round tick values (1, 2 and 5 times a power of ten, or every digit when the
range is narrow); a legend names each curve, including what the eval loss is measured on."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TRAIN_COLOR = (160, 195, 225)
SMOOTH_COLOR = (31, 119, 180)
EVAL_COLOR = (255, 127, 14)


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round values within [lo, hi]: 1, 2, 5 x 10^k, or every digit x 10^k if that gives fewer than 3,
    or for a narrow range evenly spaced values a round step apart (e.g. 0.22, 0.24, ... 0.34)."""
    if lo <= 0 or hi <= 0 or hi < lo:
        raise ValueError(f"log_ticks needs 0 < lo <= hi, got {lo}, {hi}")
    for mantissas in ((1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = []
        for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
            for m in mantissas:
                value = float(f"{m}e{k}")  # exact decimal, e.g. 0.2 rather than 2 * 0.1
                if lo * (1 - 1e-9) <= value <= hi * (1 + 1e-9):
                    ticks.append(value)
        if len(ticks) >= 3:
            return ticks
    # A narrow range: evenly spaced round values (a step of 1, 2 or 5 x 10^k, at least 3 of them).
    raw = (hi - lo) / 3
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (5, 2, 1) if m * base <= raw)
    digits = max(0, -math.floor(math.log10(step)) + 1)
    first = math.ceil(lo / step * (1 - 1e-12))
    return [round(k * step, digits) for k in range(first, int(hi / step * (1 + 1e-12)) + 1)]


def step_ticks(hi: float, count: int = 6) -> list[int]:
    """Round step values from 0 to about `hi` (steps of 1, 2 or 5 x 10^k)."""
    if hi <= 0:
        return [0]
    raw = hi / (count - 1)
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    return [int(round(i * step)) for i in range(int(hi // step) + 1)]


def _smooth(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    out, values = [], []
    for step, value in points:
        values.append(value)
        recent = values[-window:]
        out.append((step, sum(recent) / len(recent)))
    return out


def draw_loss_curve(
    rows: list[dict[str, Any]],
    path: str | Path,
    size=(800, 450),
    eval_label: str = "eval loss",
    smooth: int = 50,
) -> Path | None:
    """Train loss (light blue: each logged step; blue: mean of the last `smooth` logged values) and eval
    loss (orange, labelled `eval_label`) against step on a log loss axis. Returns the path, or None
    without data."""
    from PIL import Image, ImageDraw, ImageFont

    train_pts = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and r["loss"] > 0]
    eval_pts = [
        (r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None and r["eval_loss"] > 0
    ]
    pts = train_pts + eval_pts
    if not pts:
        return None
    font = ImageFont.load_default(size=12)
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    x_lo, x_hi = 0, max(s for s, _ in pts) or 1
    y_lo, y_hi = min(v for _, v in pts), max(v for _, v in pts)
    if y_hi / y_lo < 1.01:
        y_lo, y_hi = y_lo / 1.05, y_hi * 1.05
    ly_lo, ly_hi = math.log10(y_lo), math.log10(y_hi)
    pad = 0.05 * (ly_hi - ly_lo)
    ly_lo, ly_hi = ly_lo - pad, ly_hi + pad

    def xy(step, value):
        x = left + (step - x_lo) / (x_hi - x_lo) * (width - left - right)
        y = top + (ly_hi - math.log10(value)) / (ly_hi - ly_lo) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for value in log_ticks(10**ly_lo, 10**ly_hi):
        _, y = xy(0, value)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((5, y - 7), f"{value:g}", fill="black", font=font)
    for step in step_ticks(x_hi):
        x, _ = xy(step, 10**ly_lo)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{step}", fill="black", font=font)
    draw.text((width // 2 - 15, height - 20), "step", fill="black", font=font)
    draw.text((left, 8), "loss (log scale)", fill="black", font=font)
    curves = [(train_pts, TRAIN_COLOR, "train loss (each logged step)", 1)]
    if len(train_pts) > smooth:
        curves.append(
            (_smooth(train_pts, smooth), SMOOTH_COLOR, f"train loss, mean of the last {smooth} logged", 2)
        )
    curves.append((eval_pts, EVAL_COLOR, eval_label, 2))
    legend = [c for c in curves if c[0]]
    box_w = 14 + 32 + max(int(draw.textlength(c[2], font=font)) for c in legend)
    lx, ly = width - right - box_w - 8, top + 8
    for pts_, color, _, line_width in legend:
        coords = [xy(s, v) for s, v in pts_]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=line_width)
        if pts_ is eval_pts or len(coords) == 1:
            for x, y in coords if len(coords) < 40 or pts_ is eval_pts else []:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    # The legend last, over the curves.
    draw.rectangle([lx - 6, ly - 4, lx + box_w, ly + 18 * len(legend)], fill="white", outline=(180, 180, 180))
    for k, (_, color, label, _) in enumerate(legend):
        y = ly + 18 * k
        draw.line([lx, y + 7, lx + 25, y + 7], fill=color, width=3)
        draw.text((lx + 32, y), label, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
