"""`loraforge generate-image`: weights, reproducibility, PNG metadata, several adapters, SDXL."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from loraforge.cli import main
from loraforge.infer.image import parse_size
from loraforge.runtime import apply_adapters, load_pipeline

PROMPT = "a circle, in the style of <s1><s2>"


def _generate(tmp_path, name, base, *extra):
    out = tmp_path / name
    rc = main(
        [
            "generate-image",
            "--base",
            base,
            "--prompt",
            PROMPT,
            "--seed",
            "5",
            "--steps",
            "3",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    return out


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_weight_zero_is_exactly_the_base(trained, tiny_sd, tmp_path):
    bare = _generate(tmp_path, "bare", tiny_sd)
    zero = _generate(tmp_path, "zero", tiny_sd, "--adapter", f"{trained}:0")
    full = _generate(tmp_path, "full", tiny_sd, "--adapter", f"{trained}:1.0")
    assert np.array_equal(_pixels(bare / "5.png"), _pixels(zero / "5.png"))
    assert not np.array_equal(_pixels(bare / "5.png"), _pixels(full / "5.png"))


def test_same_seed_same_image_and_png_metadata(trained, tiny_sd, tmp_path):
    settings = [
        "--adapter",
        f"{trained}:0.8",
        "--num-images",
        "2",
        "--size",
        "16x16",
        "--negative-prompt",
        "blurry",
        "--guidance",
        "4",
        "--scheduler",
        "euler",
    ]
    a = _generate(tmp_path, "a", tiny_sd, *settings)
    b = _generate(tmp_path, "b", tiny_sd, *settings)
    assert sorted(p.name for p in a.iterdir()) == ["5.png", "6.png"]
    assert np.array_equal(_pixels(a / "5.png"), _pixels(b / "5.png"))
    assert np.array_equal(_pixels(a / "6.png"), _pixels(b / "6.png"))
    assert not np.array_equal(_pixels(a / "5.png"), _pixels(a / "6.png"))  # seed 6 differs from seed 5

    text = Image.open(a / "6.png").text
    assert text["prompt"] == PROMPT and text["seed"] == "6"
    assert json.loads(text["adapters"]) == [{"path": str(trained), "weight": 0.8}]
    data = json.loads(text["loraforge"])
    assert data["negative_prompt"] == "blurry" and data["scheduler"] == "euler" and data["guidance"] == 4.0
    assert data["steps"] == 3 and (data["width"], data["height"]) == (16, 16) and data["base"] == tiny_sd
    assert "Seed: 6" in text["parameters"] and "adapter:0.8" in text["parameters"]


def test_several_adapters_add_up_by_weight(trained, tiny_sd):
    def image(specs):
        pipe = load_pipeline(tiny_sd)
        apply_adapters(pipe, specs)
        result = pipe(
            PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="np"
        )
        return result.images[0]

    halves = image([(str(trained), 0.5), (str(trained), 0.5)])
    whole = image([(str(trained), 1.0)])
    np.testing.assert_allclose(halves, whole, atol=1e-5)
    quarter = image([(str(trained), 0.25)])
    assert np.abs(quarter - whole).max() > 1e-4


def test_cli_errors(tiny_sd, tmp_path, capsys):
    assert (
        main(["generate-image", "--base", tiny_sd, "--prompt", "x", "--adapter", str(tmp_path / "missing")])
        == 2
    )
    assert "adapter not found" in capsys.readouterr().err
    assert (
        main(["generate-image", "--base", tiny_sd, "--prompt", "x", "--size", "15", "--out", str(tmp_path)])
        == 2
    )
    assert "multiples of 4" in capsys.readouterr().err
    assert parse_size("768x512") == (768, 512) and parse_size("64") == (64, 64)
    with pytest.raises(ValueError):
        parse_size("big")


def test_sdxl_train_then_generate_like_diffusers(tiny_sdxl, tmp_path):
    """SDXL: train (two text encoders, learned tokens in both), then loraforge's image equals diffusers'."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file
    from tiny_pipelines import make_style_images, train_adapter

    data = make_style_images(tmp_path / "data")
    result, task = train_adapter(tiny_sdxl, data, tmp_path / "run", max_steps=3, learning_rate=3e-2)
    adapter = result.adapter_dir
    embeds = load_file(adapter / "learned_embeds.safetensors")
    assert set(embeds) == {"clip_l", "clip_g"} and embeds["clip_l"].shape == (2, 32)

    ours = load_pipeline(tiny_sdxl)
    apply_adapters(ours, [(str(adapter), 1.0)])
    theirs = DiffusionPipeline.from_pretrained(tiny_sdxl)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(adapter))
    tokens = ["<s1>", "<s2>"]
    theirs.load_textual_inversion(
        embeds["clip_l"], token=tokens, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer
    )
    theirs.load_textual_inversion(
        embeds["clip_g"], token=tokens, text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2
    )

    def image(pipe):
        return pipe(
            PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="np"
        ).images[0]

    np.testing.assert_allclose(image(ours), image(theirs), atol=1e-5)


def test_generate_images_api_matches_the_command_line(trained, tiny_sd, tmp_path):
    from loraforge import generate_images

    out = _generate(tmp_path, "cli", tiny_sd, "--adapter", f"{trained}:0.7", "--num-images", "2")
    made = generate_images(PROMPT, base=tiny_sd, adapters=[f"{trained}:0.7"], seed=5, steps=3, num_images=2)
    assert [g.seed for g in made] == [5, 6]
    for g in made:
        assert np.array_equal(np.asarray(g.image.convert("RGB")), _pixels(out / f"{g.seed}.png"))


def test_image_commands_use_the_base_the_adapter_records(trained, tiny_sd, tmp_path):
    """The same rule as the text commands: no --base means the base the adapter records."""
    from loraforge.runtime import load_image

    info = json.loads((trained / "adapter_info.json").read_text())
    assert info["base"] == tiny_sd
    assert load_image(adapters=[trained]).base == tiny_sd


def test_image_commands_print_no_warnings_a_user_cannot_act_on(tiny_sd, tmp_path):
    import subprocess
    import sys

    argv = ["generate-image", "--base", tiny_sd, "--prompt", "a circle", "--steps", "2", "--out", tmp_path]
    proc = subprocess.run(
        [sys.executable, "-m", "loraforge.cli", *map(str, argv)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr and "Loading" not in proc.stderr
    assert "wrote 1 image(s)" in proc.stdout
