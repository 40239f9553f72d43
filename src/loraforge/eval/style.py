"""A style measure for the example style set shipped in ``loraforge/examples/style``.

The example style (drawn by ``scripts/make_image_data.py``) is a solid plum shape over 45-degree
diagonal stripes of magenta and orange.  The embedded ``tiny-sd`` base was pretrained only on plain
red / green / blue / yellow / white / black shapes on plain backgrounds, so it never draws either
that palette or that texture.  ``style_score`` measures both:

* **palette** (weight 0.75): each pixel's Euclidean RGB distance ``d`` (0-255 scale) to the *triangle*
  spanned by the three style colours (magenta, orange, plum) -- the triangle, not just its corners,
  so that anti-aliased edges and blurry or blended generations of the palette still count -- scored
  ``exp(-(d / 40)^2 / 2)`` and averaged over pixels.  It is 1 for a pixel in the palette and falls
  smoothly (no hard threshold, so the score moves monotonically as colours drift towards the
  palette).  The base colours all sit more than ~90 RGB units from the triangle (membership < 0.1).
* **stripes** (weight 0.25): the image (resized to 32x32, RGB power spectra summed) is
  Fourier-transformed; the energy within one bin of the stripes' fundamental (2 cycles per image
  along x and y, the "/" diagonal) *minus* the energy at the mirrored "\\" frequency, as a fraction
  of all non-DC energy, divided by 0.45 (what clean style images reach) and clipped to [0, 1].
  Plain shapes are close to mirror-symmetric, so their two diagonal bands cancel and they score
  about 0, while the style's one-directional stripes score about 1; it rewards the texture in any
  colours.

The score of a list is the mean of the per-image scores, in [0, 1].  On the shipped set the
style images score about 0.9 and plain base outputs about 0.05 (see the base's ``TRAINING.md``).
``style_components`` returns the two parts separately.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from loraforge import flags
from loraforge.errors import UserError

STYLE_PALETTE = np.array(
    [(235, 20, 185), (255, 145, 20), (85, 10, 105)], dtype=np.float64
)  # magenta, orange, plum
PALETTE_SIGMA = 40.0
ANALYSIS_SIZE = 32
STRIPE_BIN = (2, 2)  # (ky, kx) cycles per image at ANALYSIS_SIZE: "/" stripes, 2 periods across each axis
STRIPE_REFERENCE = (
    0.45  # excess stripe energy of a clean style image (0.42-0.64 on the shipped set) maps to ~1
)
PALETTE_WEIGHT = 0.75
STRIPE_WEIGHT = 0.25


def _as_array(image) -> np.ndarray:
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    if image.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
        image = image.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.BOX)
    return np.asarray(image, dtype=np.float64)


def _distance_to_segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


def distance_to_palette(pixels: np.ndarray, palette: np.ndarray = STYLE_PALETTE) -> np.ndarray:
    """Euclidean distance of each RGB pixel (``[..., 3]``, 0-255) to the triangle spanned by ``palette``."""
    shape = pixels.shape[:-1]
    p = pixels.reshape(-1, 3).astype(np.float64)
    a, b, c = palette
    e1, e2 = b - a, c - a
    normal = np.cross(e1, e2)
    normal /= np.linalg.norm(normal)
    rel = p - a
    height = rel @ normal
    proj = rel - height[:, None] * normal
    # barycentric coordinates of the projection inside the triangle's plane
    d11, d12, d22 = e1 @ e1, e1 @ e2, e2 @ e2
    r1, r2 = proj @ e1, proj @ e2
    det = d11 * d22 - d12 * d12
    u = (d22 * r1 - d12 * r2) / det
    v = (d11 * r2 - d12 * r1) / det
    inside = (u >= 0) & (v >= 0) & (u + v <= 1)
    edges = np.minimum(
        np.minimum(_distance_to_segment(p, a, b), _distance_to_segment(p, b, c)),
        _distance_to_segment(p, a, c),
    )
    dist = np.where(inside, np.abs(height), edges)
    return dist.reshape(shape)


def palette_score(image) -> float:
    """Mean soft membership of the image's pixels in the style palette (0..1)."""
    d = distance_to_palette(_as_array(image))
    return float(np.mean(np.exp(-0.5 * (d / PALETTE_SIGMA) ** 2)))


def _band_energy(power: np.ndarray, ky: int, kx: int) -> float:
    """Energy within one bin of frequency (ky, kx) and of its conjugate (-ky, -kx)."""
    n = power.shape[0]
    total = 0.0
    for sy, sx in ((ky, kx), (-ky, -kx)):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                total += power[(sy + dy) % n, (sx + dx) % n]
    return float(total)


def stripe_score(image) -> float:
    """Excess "/"-stripe energy over the mirrored "\\" direction, normalised to a style image (0..1)."""
    a = _as_array(image)
    a = a - a.mean(axis=(0, 1), keepdims=True)
    power = (np.abs(np.fft.fft2(a, axes=(0, 1))) ** 2).sum(axis=-1)
    total = power.sum()
    if total <= 1e-6:
        return 0.0
    ky, kx = STRIPE_BIN
    excess = _band_energy(power, ky, kx) - _band_energy(power, ky, -kx)
    return float(np.clip((excess / total) / STRIPE_REFERENCE, 0.0, 1.0))


def style_components(images: Iterable) -> dict[str, float]:
    """Mean palette and stripe parts over ``images`` plus the combined ``score``."""
    images = list(images)
    if not images:
        raise UserError("style_score needs at least one image")
    pal = float(np.mean([palette_score(im) for im in images]))
    stripes = float(np.mean([stripe_score(im) for im in images]))
    return {"palette": pal, "stripes": stripes, "score": PALETTE_WEIGHT * pal + STRIPE_WEIGHT * stripes}


def style_score(images: list) -> float:
    """How much ``images`` (PIL images or HxWx3 uint8 arrays) look like the example style, in [0, 1].

    ``0.75 * palette + 0.25 * stripes`` averaged over the images; see the module docstring.
    """
    return style_components(images)["score"]


# -- `loraforge eval-style` ------------------------------------------------------------------------
# The command line around `style_score`: generate with and without an adapter, score both and the
# reference style images, and report how far the adapter moved the score from the base toward the style.


def add_arguments(parser) -> None:
    parser.add_argument(
        "--adapter", default=None, metavar="SOURCE[:WEIGHT]", help="adapter to measure (weight default 1.0)"
    )
    parser.add_argument("--base", default=None, help="pipeline (default: tiny-sd)")
    parser.add_argument(
        "--style-dir", default=None, help="reference style images (default: the packaged example style set)"
    )
    parser.add_argument("--images", default=None, help="only score the images in this folder (no generation)")
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt (repeatable). Default: the style set's captions through the adapter's caption template",
    )
    parser.add_argument(
        "--num-images", type=flags.positive_int, default=2, help="images per prompt (seeds seed, seed+1, ...)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=flags.positive_int, default=20, help="denoising steps")
    parser.add_argument(
        "--guidance", type=flags.non_negative_float, default=5.0, help="classifier-free guidance scale"
    )
    flags.add_out(parser, "also save the generated images here (base/ and adapter/)")
    flags.add_json(parser, "the figures")


def _folder_images(folder):
    from pathlib import Path

    from loraforge.data.images import scan_images

    records, _ = scan_images(Path(folder), min_size=1)
    return [r.load() for r in records], records


def _default_prompts(records, adapter_path) -> list[str]:
    from loraforge.data.images import PromptBuilder
    from loraforge.formats.diffusers import INFO_NAME

    info = {}
    if adapter_path is not None:
        import json
        from pathlib import Path

        path = Path(adapter_path)
        info_path = (path if path.is_dir() else path.parent) / INFO_NAME
        if info_path.is_file():
            info = json.loads(info_path.read_text(encoding="utf-8"))
    tokens = info.get("tokens") or []
    if tokens:
        builder = PromptBuilder(
            tokens,
            info.get("caption_template") or "{caption}, in the style of {tokens}",
            info.get("instance_prompt") or "a picture in the style of {tokens}",
        )
    else:
        builder = PromptBuilder([], "{caption}", "a picture")
    prompts = []
    for record in records:
        prompt = builder(record.caption)
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


def run(args) -> int:
    from pathlib import Path

    from loraforge.runtime import parse_adapter_specs

    style_dir = (
        Path(args.style_dir)
        if args.style_dir
        else Path(__file__).resolve().parent.parent / "examples" / "style"
    )
    style_images, records = _folder_images(style_dir)
    style = style_components(style_images)
    figures = {"style": style}
    if args.images:
        images, _ = _folder_images(args.images)
        figures["images"] = style_components(images)
        _report(figures, args.json)
        return 0
    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num-images and --steps must be at least 1")
    adapter = parse_adapter_specs([args.adapter])[0] if args.adapter else None
    prompts = args.prompt or _default_prompts(records, adapter.source if adapter else None)

    import torch

    from loraforge.runtime import GenerationSettings, apply_adapters, load_pipeline, render

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.base, device=device)

    def images_for(tag):
        images = []
        for prompt in prompts:
            settings = GenerationSettings(
                prompt=prompt, seed=args.seed, steps=args.steps, guidance=args.guidance
            )
            images += render(pipe, settings, args.num_images)
        if args.out:
            folder = Path(args.out) / tag
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(folder / f"{i:03d}.png")
        return images

    # The base first: loading the adapter adds its tokens to this pipeline's tokenizer.
    figures["base"] = style_components(images_for("base"))
    if adapter:
        apply_adapters(pipe, [adapter])
        figures["adapter"] = style_components(images_for("adapter"))
        gap = figures["style"]["score"] - figures["base"]["score"]
        moved = (
            (figures["adapter"]["score"] - figures["base"]["score"]) / gap
            if abs(gap) > 1e-9
            else float("nan")
        )
        figures["moved"] = moved
        figures["adapter_spec"] = {"path": adapter.source, "weight": adapter.weight}
    figures["prompts"] = prompts
    figures["num_images"] = args.num_images * len(prompts)
    _report(figures, args.json)
    return 0


def _report(figures: dict, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{'images':<10} {'score':>7} {'palette':>8} {'stripes':>8}")
    for key in ("base", "adapter", "images", "style"):
        if key in figures:
            f = figures[key]
            print(f"{key:<10} {f['score']:7.3f} {f['palette']:8.3f} {f['stripes']:8.3f}")
    if "moved" in figures:
        spec = figures["adapter_spec"]
        print(
            f"the adapter ({spec['path']} at weight {spec['weight']:g}) moved the style score "
            f"{100 * figures['moved']:.1f}% of the way from the base to the style images"
        )
