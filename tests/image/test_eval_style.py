"""`loraforge eval-style`: scores base, adapter and style images and reports how far the adapter moved."""

import json

from loraforge.cli import main
from loraforge.eval.style import style_score


def test_scores_a_folder(style_dir, capsys):
    assert main(["eval-style", "--images", str(style_dir), "--style-dir", str(style_dir), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["images"] == figures["style"]
    assert 0 <= figures["style"]["score"] <= 1


def test_base_versus_adapter(trained, tiny_sd, style_dir, tmp_path, capsys):
    args = [
        "eval-style",
        "--base",
        tiny_sd,
        "--adapter",
        f"{trained}:1.0",
        "--style-dir",
        str(style_dir),
        "--num-images",
        "1",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "images"),
    ]
    assert main(args + ["--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["prompts"] == ["a circle, in the style of <s1><s2>", "a square, in the style of <s1><s2>"]
    assert figures["num_images"] == 2
    gap = figures["style"]["score"] - figures["base"]["score"]
    expected = (figures["adapter"]["score"] - figures["base"]["score"]) / gap
    assert abs(figures["moved"] - expected) < 1e-12
    # The figures are style_score of the saved images.
    from PIL import Image

    saved = [Image.open(p) for p in sorted((tmp_path / "images" / "adapter").iterdir())]
    assert abs(style_score(saved) - figures["adapter"]["score"]) < 1e-9

    assert main(args) == 0
    text = capsys.readouterr().out
    assert "moved the style score" in text and "base" in text and "style" in text
