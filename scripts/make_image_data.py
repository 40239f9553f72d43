#!/usr/bin/env python3
"""Deterministic generators for the image side of loraforge.

Three kinds of images, all drawn with PIL (4x supersampled, then box-filtered down so edges are
anti-aliased) from a seeded ``random.Random``; the same seed always gives the same pixels:

* the **pretraining set** for the embedded ``tiny-sd`` base: one coloured shape (circle, square,
  triangle, star) on a plain background of another colour, captioned
  ``"a red circle on a blue background"`` (six named colours), plus 30% of shapes in random colours
  (kept away from the style palette) captioned with the shape only (``"a circle"``).  It is generated in memory at training time by
  ``scripts/pretrain_image_base.py`` and never committed;
* **generic textures** (random stripes at random angles/periods, checkerboards, blobs, in random RGB
  colours) used only to train the autoencoder so that it reconstructs patterns and colours the
  diffusion base never draws (the style adapters need that);
* the **example style dataset** shipped in ``src/loraforge/examples/style/``: the same kind of
  subjects drawn in a style the base never produces -- a solid plum shape over 45-degree diagonal
  stripes of magenta and orange (2 stripe periods across the image along each axis).  Each PNG has a
  same-name ``.txt`` caption describing the content only (``"a circle"``).
  ``loraforge.eval.style.style_score`` measures exactly this palette and stripe texture.

Usage::

    python scripts/make_image_data.py                      # (re)writes the example style set
    python scripts/make_image_data.py --preview /tmp/data  # also dumps a few pretraining PNGs + captions
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from loraforge.examples.shapes import SHAPES, draw_shape

REPO = Path(__file__).resolve().parent.parent
STYLE_DIR = REPO / "src" / "loraforge" / "examples" / "style"

RESOLUTION = 32
SUPERSAMPLE = 4

# Base colours.  Deliberately none of them is magenta, orange or plum (the style palette below).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

# The example style: every pixel lies in the RGB triangle spanned by these three colours.
STYLE_MAGENTA = (235, 20, 185)
STYLE_ORANGE = (255, 145, 20)
STYLE_PLUM = (85, 10, 105)
STYLE_PALETTE = (STYLE_MAGENTA, STYLE_ORANGE, STYLE_PLUM)
# Stripe periods across the image along x (and y); the stripes run at 45 degrees ("/").
STYLE_STRIPE_CYCLES = 2
STYLE_COUNT = 16

# Share of pretraining images drawn in random colours (captioned "a circle"), and how far (RGB
# units) those colours keep from the style palette so that the base never draws the style.
FREE_FRACTION = 0.3
FREE_COLOUR_MARGIN = 90.0

# Extra words the tokenizer should know as whole tokens (prompts people will naturally type).
EXTRA_WORDS = (
    "a an the of on in with and picture photo image drawing painting style shape small large big "
    "background plain colored coloured color colour one single centered simple art"
).split()


# ----------------------------------------------------------------------------------------------
# drawing


def _shape_geometry(rng: random.Random, size: int, jitter: bool) -> tuple[float, float, float, float]:
    """Centre, radius and small rotation of a shape in supersampled pixel units."""
    s = size * SUPERSAMPLE
    if not jitter:
        return s / 2, s / 2, s * 0.3, 0.0
    # Shapes stay near the centre at a similar size: neither is in the caption, and a tiny base
    # trained for minutes learns colours and shapes much faster without layout variation.
    r = s * rng.uniform(0.27, 0.35)
    cx = s / 2 + s * rng.uniform(-0.06, 0.06)
    cy = s / 2 + s * rng.uniform(-0.06, 0.06)
    angle = rng.uniform(-0.15, 0.15)
    return cx, cy, r, angle


def _jitter_colour(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _finish(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.BOX)


def _distance_to_style_palette(rgb: tuple[int, int, int]) -> float:
    """Approximate RGB distance to the triangle spanned by the style palette (sampled barycentrically)."""
    best = float("inf")
    steps = 20
    for i in range(steps + 1):
        for j in range(steps + 1 - i):
            a, b = i / steps, j / steps
            c = 1 - a - b
            q = [a * m + b * o + c * p for m, o, p in zip(STYLE_MAGENTA, STYLE_ORANGE, STYLE_PLUM)]
            best = min(best, math.dist(q, rgb))
    return best


def _free_colour(rng: random.Random, avoid: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """A random colour well away from the style palette (and, if given, from ``avoid``)."""
    while True:
        rgb = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        if _distance_to_style_palette(rgb) < FREE_COLOUR_MARGIN:
            continue
        if avoid is not None and math.dist(rgb, avoid) < 120:
            continue
        return rgb


def render_shape(
    shape: str,
    fg: str | None,
    bg: str | None,
    rng: random.Random,
    size: int = RESOLUTION,
    jitter: bool = True,
) -> Image.Image:
    """One ``fg`` shape on a plain ``bg`` background; ``None`` colours are random (non-style) RGB."""
    s = size * SUPERSAMPLE
    if bg is None:
        bg_rgb = _free_colour(rng)
    else:
        bg_rgb = _jitter_colour(rng, COLOURS[bg], 10) if jitter else COLOURS[bg]
    if fg is None:
        fg_rgb = _free_colour(rng, avoid=bg_rgb)
    else:
        fg_rgb = _jitter_colour(rng, COLOURS[fg], 10) if jitter else COLOURS[fg]
    img = Image.new("RGB", (s, s), bg_rgb)
    cx, cy, r, angle = _shape_geometry(rng, size, jitter)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, angle, fg_rgb)
    return _finish(img, size)


def caption_for(shape: str, fg: str | None, bg: str | None) -> str:
    if fg is None or bg is None:
        return f"a {shape}"
    return f"a {fg} {shape} on a {bg} background"


def caption_variants(shape: str, fg: str | None, bg: str | None) -> list[str]:
    """The full caption first, then partial descriptions (used as caption augmentation).

    Free-colour images (``fg``/``bg`` None) only ever have the shape caption.
    """
    if fg is None or bg is None:
        return [f"a {shape}"] * 4
    return [
        caption_for(shape, fg, bg),
        f"a {fg} {shape}",
        f"a {shape} on a {bg} background",
        f"a {shape}",
    ]


def all_combinations() -> list[tuple[str, str, str]]:
    return [(s, f, b) for s in SHAPES for f in COLOURS for b in COLOURS if f != b]


def make_pretrain_set(
    n: int, seed: int = 0, size: int = RESOLUTION, free_fraction: float = FREE_FRACTION
) -> list[tuple[Image.Image, tuple[str, str | None, str | None]]]:
    """``n`` images: every (shape, fg, bg) combination in turn, each with random placement, plus
    ``free_fraction`` of images in random colours (kept away from the style palette) captioned
    with the shape only, so the base can draw more than its six named colours.

    Returns ``(image, (shape, fg, bg))`` pairs (``fg``/``bg`` None for free-colour images); use
    ``caption_for`` / ``caption_variants`` for text.
    """
    rng = random.Random(seed)
    combos = all_combinations()
    n_free = int(round(n * free_fraction))
    order: list[tuple[str, str | None, str | None]] = []
    while len(order) < n - n_free:
        block = list(combos)
        rng.shuffle(block)
        order.extend(block)
    order = order[: n - n_free] + [(SHAPES[i % len(SHAPES)], None, None) for i in range(n_free)]
    rng.shuffle(order)
    return [(render_shape(shape, fg, bg, rng, size), (shape, fg, bg)) for shape, fg, bg in order]


# ----------------------------------------------------------------------------------------------
# generic textures for the autoencoder


def _random_rgb(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def render_texture(rng: random.Random, size: int = RESOLUTION) -> Image.Image:
    """A random pattern in random colours (never captioned; autoencoder training only)."""
    s = size * SUPERSAMPLE
    kind = rng.choice(("stripes", "stripes", "checker", "blobs", "stripes_shape"))
    a, b = _random_rgb(rng), _random_rgb(rng)
    img = Image.new("RGB", (s, s), a)
    draw = ImageDraw.Draw(img)
    if kind in ("stripes", "stripes_shape"):
        period = rng.uniform(4, 16) * SUPERSAMPLE
        theta = rng.uniform(0, math.pi)
        duty = rng.uniform(0.3, 0.7)
        phase = rng.uniform(0, period)
        ux, uy = math.cos(theta), math.sin(theta)
        # draw each stripe as a wide polygon band
        diag = s * 1.5
        k0 = int(-diag / period) - 2
        for k in range(k0, -k0 + 2):
            off = k * period + phase - s  # offset along the normal
            p0 = off
            p1 = off + duty * period
            c = (s / 2, s / 2)
            pts = []
            for p, t in ((p0, -diag), (p0, diag), (p1, diag), (p1, -diag)):
                pts.append((c[0] + ux * p - uy * t, c[1] + uy * p + ux * t))
            draw.polygon(pts, fill=b)
        if kind == "stripes_shape":
            cx, cy, r, angle = _shape_geometry(rng, size, True)
            draw_shape(draw, rng.choice(SHAPES), cx, cy, r, angle, _random_rgb(rng))
    elif kind == "checker":
        cell = int(rng.uniform(3, 10) * SUPERSAMPLE)
        for y in range(0, s, cell):
            for x in range(0, s, cell):
                if ((x // cell) + (y // cell)) % 2:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=b)
    else:
        for _ in range(rng.randint(2, 6)):
            cx, cy, r, angle = _shape_geometry(rng, size, True)
            r *= rng.uniform(0.3, 1.0)
            draw_shape(
                draw,
                rng.choice(SHAPES),
                cx + rng.uniform(-s / 3, s / 3),
                cy + rng.uniform(-s / 3, s / 3),
                r,
                angle,
                _random_rgb(rng),
            )
    return _finish(img, size)


def make_texture_set(n: int, seed: int = 1, size: int = RESOLUTION) -> list[Image.Image]:
    rng = random.Random(seed)
    return [render_texture(rng, size) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# the example style set


def render_style(shape: str, rng: random.Random, size: int = RESOLUTION) -> Image.Image:
    """A plum ``shape`` over 45-degree magenta/orange stripes (the example style)."""
    s = size * SUPERSAMPLE
    img = Image.new("RGB", (s, s), STYLE_MAGENTA)
    phase = rng.random()
    px = img.load()
    for y in range(s):
        for x in range(s):
            # "/" stripes: constant along x + y, STYLE_STRIPE_CYCLES periods across the image
            if int(2 * (STYLE_STRIPE_CYCLES * (x + y) / s + phase)) % 2:
                px[x, y] = STYLE_ORANGE
    cx, cy, r, angle = _shape_geometry(rng, size, True)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, angle, STYLE_PLUM)
    return _finish(img, size)


def write_style_set(
    out_dir: Path = STYLE_DIR, count: int = STYLE_COUNT, seed: int = 1234, size: int = RESOLUTION
) -> list[Path]:
    """Writes ``count`` style PNGs, each with a same-name ``.txt`` caption, into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.png")) + list(out_dir.glob("*.txt")):
        old.unlink()
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        img = render_style(shape, rng, size)
        stem = f"{i:02d}_{shape}"
        path = out_dir / f"{stem}.png"
        img.save(path, optimize=True)
        (out_dir / f"{stem}.txt").write_text(f"a {shape}\n")
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--style-dir", type=Path, default=STYLE_DIR, help="where the example style set goes")
    ap.add_argument("--no-style", action="store_true", help="do not (re)write the example style set")
    ap.add_argument("--preview", type=Path, default=None, help="dump N pretraining images + captions here")
    ap.add_argument("--preview-count", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if not args.no_style:
        paths = write_style_set(args.style_dir)
        print(f"wrote {len(paths)} style images to {args.style_dir}")
    if args.preview is not None:
        args.preview.mkdir(parents=True, exist_ok=True)
        for i, (img, (shape, fg, bg)) in enumerate(make_pretrain_set(args.preview_count, args.seed)):
            img.save(args.preview / f"{i:03d}.png")
            (args.preview / f"{i:03d}.txt").write_text(caption_for(shape, fg, bg) + "\n")
        for i, img in enumerate(make_texture_set(16, args.seed + 1)):
            img.save(args.preview / f"texture_{i:02d}.png")
        print(f"wrote {args.preview_count} pretraining previews to {args.preview}")


if __name__ == "__main__":
    main()
