"""The loss curve of a run (``loss.png``), drawn with PIL so no plotting library is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw_loss_curve(rows: list[dict[str, Any]], path: str | Path, size=(800, 450)) -> Path | None:
    """Train (blue) and eval (orange) loss against step, drawn with PIL. Returns the path, or None without data."""
    from PIL import Image, ImageDraw

    train_pts = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    eval_pts = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    pts = train_pts + eval_pts
    if not pts:
        return None
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    x_lo, x_hi = 0, max(s for s, _ in pts) or 1
    y_lo, y_hi = min(v for _, v in pts), max(v for _, v in pts)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def xy(step, value):
        x = left + (step - x_lo) / (x_hi - x_lo) * (width - left - right)
        y = top + (y_hi - value) / (y_hi - y_lo) * (height - top - bottom)
        return x, y

    # Axes, ticks and grid.
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        value = y_lo + (y_hi - y_lo) * i / 5
        _, y = xy(0, value)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.text((5, y - 6), f"{value:.3g}", fill="black")
        step = x_lo + (x_hi - x_lo) * i / 5
        x, _ = xy(step, y_lo)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{step:.0f}", fill="black")
    draw.text((width // 2 - 15, height - 20), "step", fill="black")
    draw.text((left, 8), "loss", fill="black")
    for pts_, color, label, offset in (
        (train_pts, (31, 119, 180), "train", 0),
        (eval_pts, (255, 127, 14), "eval", 1),
    ):
        if not pts_:
            continue
        coords = [xy(s, v) for s, v in pts_]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for x, y in coords if len(coords) < 40 or label == "eval" else []:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        lx = width - right - 120
        ly = top + 10 + 18 * offset
        draw.line([lx, ly + 6, lx + 25, ly + 6], fill=color, width=3)
        draw.text((lx + 32, ly), f"{label} loss", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
