"""One command-line dialect, and one rule for errors, checked on every command.

- `--out` (long name `--output-dir`) for every output location;
- every flag spelled with dashes, the underscore spelling accepted too; no abbreviations;
- `--adapter SOURCE[:WEIGHT]` wherever adapters go in;
- `--json` prints JSON (and nothing else) on stdout;
- numbers out of range are refused before anything loads;
- bad input: one line, exit status 2; a bug: its traceback, exit status 1;
- generate and merge choose the base by the same rule (the one the adapter records).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_text import make_base
from transformers import AutoModelForCausalLM

from loraforge import LoraConfig, get_lora_model
from loraforge.cli import COMMANDS, _load, dash_spellings

WRITES_OUTPUT = ["train", "train-image", "merge", "mix", "generate-image", "eval-text", "eval-style"]
TAKES_ADAPTERS = ["generate", "generate-image", "merge", "mix", "eval-text", "eval-style"]


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "loraforge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def parser_for(command: str) -> argparse.ArgumentParser:
    add_arguments, _ = _load(command)
    parser = argparse.ArgumentParser(prog=command, allow_abbrev=False)
    add_arguments(parser)
    return parser


def long_flags(parser) -> set[str]:
    return {s for s in parser._option_string_actions if s.startswith("--")}


@pytest.fixture(scope="module")
def text_env(tmp_path_factory):
    """A tiny base directory with tokenizer, and an adapter that records it as its base."""
    root = tmp_path_factory.mktemp("dialect")
    base = make_base(root / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = get_lora_model(
        model,
        LoraConfig(
            r=2, target_modules=["q_proj"], init_lora_weights=False, base_model_name_or_path=str(base)
        ),
    )
    lora.save_pretrained(root / "adapter")
    return {"root": root, "base": base, "adapter": root / "adapter"}


@pytest.mark.parametrize("command", WRITES_OUTPUT)
def test_every_output_location_is_out(command):
    flags = long_flags(parser_for(command))
    assert {"--out", "--output-dir"} <= flags
    assert parser_for(command)._option_string_actions["--out"].dest in ("out", "output_dir")


@pytest.mark.parametrize("command", TAKES_ADAPTERS)
def test_adapters_go_in_with_adapter(command):
    action = parser_for(command)._option_string_actions["--adapter"]
    assert "WEIGHT" in action.metavar


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_dashes_and_takes_the_underscore_spelling(command):
    parser = parser_for(command)
    for flag in long_flags(parser):
        name = flag[2:]
        if "_" in name:  # an underscore spelling registered on its own must have its dashed twin
            assert "--" + name.replace("_", "-") in long_flags(parser), flag
            continue
        underscored = "--" + name.replace("-", "_")
        assert dash_spellings(parser, [underscored]) in ([flag], [underscored])
        assert dash_spellings(parser, [underscored + "=1"])[0] in (flag + "=1", underscored + "=1")


def test_underscore_and_dash_spellings_give_the_same_arguments():
    parser = parser_for("generate")
    a = parser.parse_args(dash_spellings(parser, ["--max_new_tokens", "7", "--top_p=0.5", "--prompt", "x"]))
    b = parser.parse_args(["--max-new-tokens", "7", "--top-p", "0.5", "--prompt", "x"])
    assert vars(a) == vars(b)
    # Values are never rewritten, only flags.
    assert dash_spellings(parser, ["--prompt", "--a_b"]) == ["--prompt", "--a_b"]


def test_no_abbreviations():
    proc = cli("generate", "--max-new", "3", "--prompt", "x")
    assert proc.returncode == 2 and "unrecognized arguments: --max-new" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--top-p", "5", "--prompt", "x"], "argument --top-p: must be in (0, 1], got 5"),
        (["generate", "--top_p", "0", "--prompt", "x"], "argument --top-p: must be in (0, 1], got 0"),
        (["generate", "--temperature", "-1", "--prompt", "x"], "argument --temperature: must be > 0"),
        (["generate", "--max-new-tokens", "0", "--prompt", "x"], "argument --max-new-tokens: must be > 0"),
        (["generate-image", "--steps", "0", "--prompt", "x"], "argument --steps: must be > 0"),
        (["generate-image", "--num-images", "x", "--prompt", "x"], "expected an integer, got 'x'"),
        (["mix", "a", "--density", "1.5", "--out", "o"], "argument --density: must be in [0, 1]"),
        (["eval-text", "--batch-size", "0"], "argument --batch-size: must be > 0"),
        (["eval-style", "--guidance", "nan"], "argument --guidance: must be >= 0"),
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_flag(args, message):
    from loraforge.cli import main

    proc = cli(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    with pytest.raises(SystemExit) as exc:  # argparse's usage error, in process too
        main(args)
    assert exc.value.code == 2


def test_json_is_printed_on_stdout(text_env, tmp_path):
    inspected = cli("inspect", text_env["adapter"], "--json")
    assert inspected.returncode == 0 and json.loads(inspected.stdout)["rank"] == 2
    listed = cli("bases", "--json")
    assert {row["name"] for row in json.loads(listed.stdout)} >= {"tiny-llama", "tiny-sd"}
    generated = cli(
        "generate",
        "--adapter",
        text_env["adapter"],
        "--prompt",
        "hello",
        "--greedy",
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert generated.returncode == 0, generated.stderr
    result = json.loads(generated.stdout)
    assert result["base"] == str(text_env["base"]) and result["generations"][0]["prompt"] == "hello"
    merged = cli("merge", "--adapter", text_env["adapter"], "--out", tmp_path / "merged", "--json")
    assert merged.returncode == 0 and json.loads(merged.stdout)["out"] == str(tmp_path / "merged")
    mixed = cli("mix", "--adapter", f"{text_env['adapter']}:0.5", "--out", tmp_path / "mixed", "--json")
    assert mixed.returncode == 0 and json.loads(mixed.stdout)["adapters"][0]["weight"] == 0.5
    evaluated = cli(
        "eval-text",
        "--adapter",
        text_env["adapter"],
        "--max-examples",
        "2",
        "--max-new-tokens",
        "2",
        "--json",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert set(json.loads(evaluated.stdout)) >= {"base", "adapter", "loss_drop_percent"}


def test_generate_and_merge_use_the_base_the_adapter_records(text_env, tmp_path):
    """One rule for both: no --base means the recorded base, here a local directory that is not the
    embedded default (the tokenizer of tiny-llama could not even encode with this base's vocabulary)."""
    generated = cli(
        "generate", "--adapter", text_env["adapter"], "--prompt", "hi", "--greedy", "--max-new-tokens", "2"
    )
    assert generated.returncode == 0, generated.stderr
    assert f"base: {text_env['base']};" in generated.stderr
    merged = cli("merge", "--adapter", text_env["adapter"], "--out", tmp_path / "m", "--json")
    assert merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout)["base"] == str(text_env["base"])
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(text_env["base"])
    assert saved.config.vocab_size == base.config.vocab_size  # the recorded base's shape, not tiny-llama's


def test_a_recorded_hub_base_is_never_swapped_for_the_default(text_env, tmp_path):
    """An adapter that records a hub id: both commands try that id (offline here: a clear error
    naming it and the way out), neither falls back to the embedded tiny-llama."""
    adapter = tmp_path / "hub-adapter"
    adapter.mkdir()
    for f in text_env["adapter"].iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "example-org/not-a-real-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    offline = {"HF_HUB_OFFLINE": "1"}
    for args in (["generate", "--prompt", "x"], ["merge", "--out", tmp_path / "m"]):
        proc = cli(*args, "--adapter", adapter, env=offline)
        assert proc.returncode == 2, proc.stderr
        assert "example-org/not-a-real-model" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_user_error_is_one_line_with_status_2(tmp_path):
    proc = cli("merge", "--adapter", tmp_path / "nope", "--out", tmp_path / "m")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert (
        proc.stderr.startswith("loraforge merge: error: adapter not found") and "Traceback" not in proc.stderr
    )


def test_a_library_bug_shows_its_traceback_with_status_1():
    """An exception that is not a UserError is a bug: it is not dressed up as a user error."""
    code = (
        "import sys, loraforge.tools as t\n"
        "def broken(args):\n"
        "    raise ValueError('internal invariant broken')\n"
        "t.bases_run = broken\n"
        "from loraforge.cli import main\n"
        "sys.exit(main(['bases']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: internal invariant broken" in proc.stderr


def test_user_errors_from_the_library_are_value_errors():
    """Code written against PEFT-style APIs that catches ValueError / FileNotFoundError keeps working."""
    from loraforge.errors import NotFound, UserError
    from loraforge.runtime import parse_adapter_specs

    with pytest.raises(NotFound) as caught:
        parse_adapter_specs(["/no/such/adapter"])
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, UserError)
    with pytest.raises(ValueError, match="LoraConfig.r"):
        LoraConfig(r=0)
    assert torch.is_tensor(torch.zeros(1))
