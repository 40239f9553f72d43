"""`loraforge eval-style`: scores base, adapter and style images and reports how far the adapter moved,
for each of several phrasings, with the shape-silhouette content measure beside it."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from loraforge.cli import main
from loraforge.eval.style import (
    EVAL_PHRASINGS,
    named_shape,
    recognised_shape,
    shape_iou,
    shape_mask,
    shape_right,
    style_score,
)
from loraforge.examples.shapes import SHAPES, draw_shape

README_PHRASING = "{caption} in the style of {tokens}"  # README: --prompt "a circle in the style of <s1><s2>"


def test_scores_a_folder(style_dir, capsys):
    assert main(["eval-style", "--images", str(style_dir), "--style-dir", str(style_dir), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["images"] == figures["style"]
    assert 0 <= figures["style"]["score"] <= 1


def _square(background, top=8, left=8, size=12, colour=(85, 10, 105)) -> Image.Image:
    a = np.array(background, dtype=np.uint8).copy()
    a[top : top + size, left : left + size] = colour
    return Image.fromarray(a)


def test_shape_silhouettes_ignore_the_background():
    plain = np.full((32, 32, 3), (30, 90, 220), dtype=np.uint8)
    yy, xx = np.mgrid[0:32, 0:32]
    stripes = np.where((((xx + yy) // 8) % 2 == 1)[..., None], [235, 20, 185], [255, 145, 20]).astype(
        np.uint8
    )
    on_plain, on_stripes = _square(plain, colour=(220, 30, 30)), _square(stripes)
    assert shape_mask(on_plain).sum() == 144 and shape_mask(on_stripes).sum() == 144
    assert shape_iou(on_plain, on_stripes) == 1.0  # the same square, other colours and background
    assert shape_iou(on_plain, _square(plain, top=18, left=18)) < 0.1  # another place
    assert shape_iou(Image.fromarray(plain), Image.fromarray(plain)) == 1.0  # no shape in either


def _drawn(shape, cx, cy, r, angle, fg, bg):
    from PIL import ImageDraw

    image = Image.new("RGB", (128, 128), bg)
    draw_shape(ImageDraw.Draw(image), shape, cx * 4, cy * 4, r * 4, angle, fg)
    return image.resize((32, 32), Image.BOX)


def test_shapes_are_recognised_wherever_and_however_drawn():
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for _ in range(10):  # off-centre, in several sizes and small turns, any colours
            cx, cy = 16 + rng.uniform(-2, 2, size=2)
            r, angle = rng.uniform(8.6, 11.2), rng.uniform(-0.15, 0.15)
            colours = rng.integers(0, 256, size=(2, 3))
            while np.linalg.norm(colours[0] - colours[1]) < 150:
                colours = rng.integers(0, 256, size=(2, 3))
            image = _drawn(shape, cx, cy, r, angle, tuple(map(int, colours[0])), tuple(map(int, colours[1])))
            assert recognised_shape(image) == shape
    # The shipped style set: plum shapes on stripes, named in their captions.
    from loraforge.examples import __file__ as examples_init

    images = sorted((Path(examples_init).parent / "style").glob("*.png"))
    assert len(images) == 16
    prompts = [p.with_suffix(".txt").read_text() for p in images]
    assert shape_right([Image.open(p) for p in images], prompts) == 1.0
    assert recognised_shape(Image.new("RGB", (32, 32), (9, 9, 9))) is None  # nothing drawn
    assert named_shape("A Star, in the style of <s1>") == "star" and named_shape("a dog") is None
    blank = [Image.new("RGB", (32, 32), (9, 9, 9))] * 2
    assert shape_right(blank, ["a circle", "a dog"]) == 0.0 and shape_right(blank, ["a dog"] * 2) is None


def test_base_versus_adapter_in_several_phrasings(trained, tiny_sd, style_dir, tmp_path, capsys):
    args = [
        "eval-style",
        "--base",
        tiny_sd,
        "--adapter",
        f"{trained}:1.0",
        "--style-dir",
        str(style_dir),
        "--num-images",
        "2",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "images"),
    ]
    assert main(args + ["--json"]) == 0
    captured = capsys.readouterr()
    figures = json.loads(captured.out)  # stdout is the JSON only; progress goes to stderr
    assert "eval-style: 48/48 images" in captured.err and "images/s" in captured.err and "ETA" in captured.err
    rows = figures["phrasings"]
    with_tokens = [r for r in rows if r["with_tokens"]]
    assert len(with_tokens) >= 5 and [r["template"] for r in with_tokens] == EVAL_PHRASINGS
    assert README_PHRASING in EVAL_PHRASINGS
    readme = next(r for r in rows if r["template"] == README_PHRASING)
    assert readme["prompts"] == ["a circle in the style of <s1><s2>", "a square in the style of <s1><s2>"]
    bare = [r for r in rows if not r["with_tokens"]]
    assert len(bare) == 1 and bare[0]["prompts"] == ["a circle", "a square"]
    style = figures["style"]["score"]
    for row in rows:
        expected = (row["adapter"]["score"] - row["base"]["score"]) / (style - row["base"]["score"])
        assert abs(row["moved"] - expected) < 1e-12
        assert 0 <= row["shape_iou"] <= 1 and 0 <= row["shape_iou_chance"] <= 1
        assert row["shape_right"] in (0, 0.25, 0.5, 0.75, 1) and row["base_shape_right"] in (
            0,
            0.25,
            0.5,
            0.75,
            1,
        )
    # The overall figures are those of all the phrasings with the tokens.
    assert figures["prompts"] == [p for r in with_tokens for p in r["prompts"]]
    assert figures["num_images"] == 2 * 10
    gap = style - figures["base"]["score"]
    assert abs(figures["moved"] - (figures["adapter"]["score"] - figures["base"]["score"]) / gap) < 1e-12
    assert figures["moved_min"] == min(r["moved"] for r in with_tokens)
    assert abs(figures["shape_iou"] - np.mean([r["shape_iou"] for r in with_tokens])) < 1e-12
    # The figures are style_score of the saved images (the with-token prompts come first).
    saved = [Image.open(p) for p in sorted((tmp_path / "images" / "adapter").iterdir())]
    assert len(saved) == 2 * 12
    assert abs(style_score(saved[:20]) - figures["adapter"]["score"]) < 1e-9
    # shape right: the saved images' recognised shapes against the shapes their prompts name
    prompts = [p for p in figures["prompts"] for _ in range(2)]
    assert abs(shape_right(saved[:20], prompts) - figures["shape_right"]) < 1e-12

    assert main(args) == 0
    text = capsys.readouterr().out
    assert "moved the style score" in text and "base" in text and "style" in text
    assert "a painting of {caption} in the style of {tokens}" in text and "(no tokens)" in text
    assert "shape IoU" in text and "shape right" in text


def test_each_given_prompt_is_a_row(trained, tiny_sd, style_dir, capsys):
    prompts = ["a circle in the style of <s1><s2>", "a star"]
    args = ["eval-style", "--base", tiny_sd, "--adapter", str(trained), "--style-dir", str(style_dir)]
    args += ["--num-images", "1", "--steps", "2", "--json"]
    assert main(args + [f"--prompt={p}" for p in prompts]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert [r["prompts"] for r in figures["phrasings"]] == [[p] for p in prompts]
    assert [r["with_tokens"] for r in figures["phrasings"]] == [True, False]
    assert figures["prompts"] == prompts[:1]
