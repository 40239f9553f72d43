"""The command-line dialect, defined once: the flags several commands share and checked number types.

Every command writes its output where `--out` says, takes adapters as `--adapter SOURCE[:WEIGHT]`
(repeatable), and prints machine-readable JSON to stdout with `--json`. Flags are spelled with
dashes; `loraforge.cli` also accepts the underscore spelling of every flag. A number outside its
range is refused by the parser with the flag's name (exit status 2), before anything loads.
"""

from __future__ import annotations

import argparse
import math


def add_adapter(
    parser: argparse.ArgumentParser,
    help: str | None = None,
    required: bool = False,
    metavar: str = "SOURCE[:WEIGHT]",
) -> None:
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        required=required,
        metavar=metavar,
        help=help
        or "adapter directory or .safetensors file, with an optional weight (default 1); repeat to mix",
    )


def add_out(parser: argparse.ArgumentParser, help: str, required: bool = False, default=None) -> None:
    parser.add_argument("--out", "--output-dir", dest="out", required=required, default=default, help=help)


def add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def _number(kind, text: str, check, why: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if isinstance(value, float) and not math.isfinite(value) or not check(value):
        raise argparse.ArgumentTypeError(f"must be {why}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "> 0")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, ">= 0")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, ">= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "> 0")


def probability(text: str) -> float:
    """A value in (0, 1], such as top_p."""
    return _number(float, text, lambda v: 0 < v <= 1, "in (0, 1]")


def fraction(text: str) -> float:
    """A value in [0, 1], such as a density."""
    return _number(float, text, lambda v: 0 <= v <= 1, "in [0, 1]")
