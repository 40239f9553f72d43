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

A content measure sits beside it, because a style adapter must not paint over what the prompt asks
for: ``shape_iou`` is the intersection over union of two images' shape silhouettes.  A silhouette
(``shape_mask``) is every pixel whose RGB distance to *all* the colours of the image's outer ring of
pixels exceeds 60, so it is the shape in front of a plain or striped background, whatever its colour.
`eval-style` compares each adapter image with the base's image of the same seed and the same prompt
without the tokens (for the default phrasings: the bare caption, "a circle"), so it measures whether
the shape the base draws there -- its place, size and outline -- survives under the style. The
tiny-sd base draws its shapes as rough blobs whose place depends on the seed more than on the shape
word, so the figure is about keeping the base's content, not about drawing a cleaner star.  The same
IoU between images of *different* seeds is reported as ``chance`` (what unrelated shapes score).
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


SHAPE_THRESHOLD = 60.0


def shape_mask(image, threshold: float = SHAPE_THRESHOLD) -> np.ndarray:
    """Boolean silhouette (``ANALYSIS_SIZE`` square) of the shape in front of the image's background: the
    pixels farther than `threshold` (RGB, 0-255) from every colour of the outer ring of pixels."""
    a = _as_array(image)
    ring = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    d = np.linalg.norm(a[:, :, None, :] - ring[None, None, :, :], axis=-1).min(axis=-1)
    return d > threshold


def shape_iou(a, b) -> float:
    """Intersection over union of the silhouettes of images `a` and `b` (1 when both have none)."""
    ma, mb = shape_mask(a), shape_mask(b)
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 1.0


_TEMPLATES: dict[str, list[np.ndarray]] = {}
TEMPLATE_RADII = (0.26, 0.3, 0.34)  # fractions of the image: the sizes the image examples draw


def shape_templates() -> dict[str, list[np.ndarray]]:
    """Silhouettes of each example shape (`loraforge.examples.shapes`) at ``ANALYSIS_SIZE``, centred,
    one per radius in ``TEMPLATE_RADII``."""
    if not _TEMPLATES:
        from PIL import Image, ImageDraw

        from loraforge.examples.shapes import SHAPES, draw_shape

        supersample = 4
        s = ANALYSIS_SIZE * supersample
        for shape in SHAPES:
            _TEMPLATES[shape] = []
            for radius in TEMPLATE_RADII:
                image = Image.new("RGB", (s, s), (0, 0, 0))
                draw_shape(ImageDraw.Draw(image), shape, s / 2, s / 2, radius * s, 0.0, (255, 255, 255))
                _TEMPLATES[shape].append(shape_mask(image.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.BOX)))
    return _TEMPLATES


def recognised_shape(image) -> str | None:
    """Which example shape the image shows: the shape whose template (any size), moved onto the
    silhouette's centroid, overlaps the image's silhouette most (IoU); None without a silhouette."""
    mask = shape_mask(image)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    shift = (int(round(ys.mean() - (ANALYSIS_SIZE - 1) / 2)), int(round(xs.mean() - (ANALYSIS_SIZE - 1) / 2)))

    def iou(template):
        t = np.roll(template, shift, axis=(0, 1))
        return np.logical_and(mask, t).sum() / np.logical_or(mask, t).sum()

    best = {name: max(iou(t) for t in templates) for name, templates in shape_templates().items()}
    return max(best, key=best.get)


def named_shape(prompt: str) -> str | None:
    """The example shape a prompt names (its first shape word), if any."""
    from loraforge.examples.shapes import SHAPES

    words = [w.strip(".,:;!?'\"") for w in prompt.lower().split()]
    return next((w for w in words if w in SHAPES), None)


def shape_right(images: list, prompts: list[str]) -> float | None:
    """Share of `images` recognised as the shape their prompt names (None if no prompt names one)."""
    judged = [recognised_shape(im) == named_shape(p) for im, p in zip(images, prompts) if named_shape(p)]
    return float(np.mean(judged)) if judged else None


def style_score(images: list) -> float:
    """How much ``images`` (PIL images or HxWx3 uint8 arrays) look like the example style, in [0, 1].

    ``0.75 * palette + 0.25 * stripes`` averaged over the images; see the module docstring.
    """
    return style_components(images)["score"]


# -- `loraforge eval-style` ------------------------------------------------------------------------
# The command line around `style_score`: generate with and without an adapter, score both and the
# reference style images, and report how far the adapter moved the score from the base toward the style
# -- for each of several phrasings of the prompt, and beside it the content measure `shape_iou`.

# The default phrasings ({caption}: each caption of the style set, {tokens}: the adapter's tokens).
# The first is the README's; the first two are among train-image's default training templates
# (caption_template and the first of caption_templates), the other three are not.
EVAL_PHRASINGS = [
    "{caption} in the style of {tokens}",
    "{caption}, in the style of {tokens}",
    "a painting of {caption} in the style of {tokens}",
    "{caption} drawn in {tokens} style",
    "{tokens} art: {caption}",
]
NO_TOKENS = "{caption}"


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
        help="prompt (repeatable; each is measured and reported on its own). Default: each of five "
        "phrasings (EVAL_PHRASINGS in loraforge/eval/style.py) of every caption of the style set with "
        "the adapter's tokens, and the bare captions without tokens",
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


def _adapter_info(adapter_path) -> dict:
    import json
    from pathlib import Path

    from loraforge.formats.diffusers import INFO_NAME

    if adapter_path is None:
        return {}
    path = Path(adapter_path)
    info_path = (path if path.is_dir() else path.parent) / INFO_NAME
    if info_path.is_file():
        return json.loads(info_path.read_text(encoding="utf-8"))
    return {}


def _clean(text: str) -> str:
    return " ".join(text.split()).strip(" ,")


def _captions(records) -> list[str]:
    captions = []
    for record in records:
        caption = record.caption or "a picture"
        if caption not in captions:
            captions.append(caption)
    return captions


def default_phrasings(records, tokens: list[str]) -> list[dict]:
    """The measured phrasings: each of `EVAL_PHRASINGS` over the style set's captions with the tokens
    (``with_tokens``), then the bare captions; without tokens only the bare captions."""
    captions = _captions(records)
    token_string = "".join(tokens)
    rows = []
    for template in EVAL_PHRASINGS if tokens else []:
        prompts = [_clean(template.format(caption=c, tokens=token_string)) for c in captions]
        rows.append({"template": template, "with_tokens": True, "prompts": prompts, "references": captions})
    rows.append({"template": NO_TOKENS, "with_tokens": False, "prompts": captions, "references": captions})
    return rows


def prompt_phrasings(prompts: list[str], tokens: list[str]) -> list[dict]:
    """One row per --prompt; its content reference is the same prompt without the adapter's tokens."""
    rows = []
    for prompt in prompts:
        bare = prompt
        for token in tokens:
            bare = bare.replace(token, " ")
        bare = _clean(bare)
        with_tokens = any(token in prompt for token in tokens)
        rows.append(
            {"template": prompt, "with_tokens": with_tokens, "prompts": [prompt], "references": [bare]}
        )
    return rows


def _moved(adapter: float, base: float, style: float) -> float:
    gap = style - base
    return (adapter - base) / gap if abs(gap) > 1e-9 else float("nan")


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
    tokens = list(_adapter_info(adapter.source if adapter else None).get("tokens") or [])
    rows = prompt_phrasings(args.prompt, tokens) if args.prompt else default_phrasings(records, tokens)

    import dataclasses

    import torch

    from loraforge.infer.progress import Progress
    from loraforge.runtime import GenerationSettings, apply_adapters, load_pipeline, render

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.base, device=device)
    n = args.num_images
    base_prompts, adapter_prompts = [], []
    for row in rows:
        for prompt, reference in zip(row["prompts"], row["references"]):
            for p in (prompt, reference):
                if p not in base_prompts:
                    base_prompts.append(p)
            if adapter and prompt not in adapter_prompts:
                adapter_prompts.append(prompt)
    total = n * (len(base_prompts) + len(adapter_prompts))
    progress = Progress(total, "images", "eval-style")

    def generate(prompts, tag) -> dict[str, list]:
        out = {}
        for i, prompt in enumerate(prompts):
            settings = GenerationSettings(
                prompt=prompt, seed=args.seed, steps=args.steps, guidance=args.guidance
            )
            out[prompt] = []
            for k in range(n):
                out[prompt] += render(pipe, dataclasses.replace(settings, seed=args.seed + k), 1)
                progress.advance()
            if args.out:
                folder = Path(args.out) / tag
                folder.mkdir(parents=True, exist_ok=True)
                for k, image in enumerate(out[prompt]):
                    image.save(folder / f"{i:03d}-{k:02d}.png")
        return out

    with progress:
        # The base first: loading the adapter adds its tokens to this pipeline's tokenizer.
        base_images = generate(base_prompts, "base")
        adapter_images = {}
        if adapter:
            apply_adapters(pipe, [adapter])
            adapter_images = generate(adapter_prompts, "adapter")

    measured = []
    for row in rows:
        entry = {"template": row["template"], "with_tokens": row["with_tokens"], "prompts": row["prompts"]}
        base = [im for p in row["prompts"] for im in base_images[p]]
        entry["base"] = style_components(base)
        if adapter:
            ours = [im for p in row["prompts"] for im in adapter_images[p]]
            refs = [im for r in row["references"] for im in base_images[r]]
            entry["adapter"] = style_components(ours)
            entry["moved"] = _moved(entry["adapter"]["score"], entry["base"]["score"], style["score"])
            entry["shape_iou"] = float(np.mean([shape_iou(a, b) for a, b in zip(ours, refs)]))
            ours_prompts = [p for p in row["prompts"] for _ in range(n)]
            ref_prompts = [r for r in row["references"] for _ in range(n)]
            entry["shape_right"] = shape_right(ours, ours_prompts)
            entry["base_shape_right"] = shape_right(refs, ref_prompts)
            if n > 1:  # the same images against the references of the other seeds
                shifted = [refs[(j // n) * n + (j % n + 1) % n] for j in range(len(refs))]
                entry["shape_iou_chance"] = float(np.mean([shape_iou(a, b) for a, b in zip(ours, shifted)]))
        measured.append(entry)
    figures["phrasings"] = measured
    main_rows = [e for e in measured if e["with_tokens"]] or measured
    prompts = [p for e in main_rows for p in e["prompts"]]
    figures["base"] = style_components([im for p in prompts for im in base_images[p]])
    if adapter:
        figures["adapter"] = style_components([im for p in prompts for im in adapter_images[p]])
        figures["moved"] = _moved(figures["adapter"]["score"], figures["base"]["score"], style["score"])
        figures["moved_min"] = min(e["moved"] for e in main_rows)
        figures["shape_iou"] = float(np.mean([e["shape_iou"] for e in main_rows]))
        for key in ("shape_right", "base_shape_right"):
            judged = [e[key] for e in main_rows if e[key] is not None]
            figures[key] = float(np.mean(judged)) if judged else None
        chance = [e["shape_iou_chance"] for e in main_rows if "shape_iou_chance" in e]
        if chance:
            figures["shape_iou_chance"] = float(np.mean(chance))
        figures["adapter_spec"] = {"path": adapter.source, "weight": adapter.weight}
    figures["prompts"] = prompts
    figures["num_images"] = n * len(prompts)
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
            f"{100 * figures['moved']:.1f}% of the way from the base to the style images "
            f"(all phrasings with its tokens; the lowest phrasing {100 * figures['moved_min']:.1f}%)"
        )
    if "adapter" in figures and figures.get("phrasings"):
        print()
        print(
            f"{'phrasing':<52} {'base':>6} {'adapter':>8} {'moved':>7} {'shape IoU':>10} {'shape right':>16}"
        )

        def percent(value):
            return "-" if value is None else f"{100 * value:.0f}%"

        for e in figures["phrasings"]:
            name = e["template"] if e["with_tokens"] else f"{e['template']}  (no tokens)"
            right = f"{percent(e['base_shape_right'])} -> {percent(e['shape_right'])}"
            print(
                f"{name[:52]:<52} {e['base']['score']:6.3f} {e['adapter']['score']:8.3f} "
                f"{100 * e['moved']:6.1f}% {e['shape_iou']:10.2f} {right:>16}"
            )
        chance = figures.get("shape_iou_chance")
        print(
            f"shape IoU: silhouettes of the adapter's images against the base's for the same prompt without "
            f"the tokens and the same seed (mean {figures['shape_iou']:.2f}"
            + (f"; against other seeds, i.e. chance: {chance:.2f})" if chance is not None else ")")
        )
        if figures.get("shape_right") is not None:
            print(
                f"shape right: images whose silhouette is recognised as the shape the prompt names "
                f"(base without the tokens -> adapter): {percent(figures['base_shape_right'])} -> "
                f"{percent(figures['shape_right'])}, all phrasings with the tokens"
            )
