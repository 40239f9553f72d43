"""The four shapes of the image examples (circle, square, triangle, star), drawn with PIL.

One definition for everything that draws or recognises them: the pretraining data and the example
style set (`scripts/make_image_data.py`) and the content measure of `loraforge eval-style`.
"""

from __future__ import annotations

import math

from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle", "star")


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ``r`` centred at (cx, cy)."""
    if shape == "square":
        n, radii, start = 4, [r * 0.92], math.pi / 4
    elif shape == "triangle":
        n, radii, start = 3, [r * 1.08], -math.pi / 2
    elif shape == "star":
        n, radii, start = 10, [r * 1.12, r * 0.48], -math.pi / 2
    else:
        raise ValueError(shape)
    pts = []
    for i in range(n):
        rad = radii[i % len(radii)]
        a = start + angle + 2 * math.pi * i / n
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill
) -> None:
    """Fills `shape` of circumradius `r` centred at (cx, cy), turned by `angle` radians."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=fill)
