"""Checker for the example text task: `Describe as JSON: <sentence>\\n` -> `{"who": ..., "did": ..., "where": ...}`.

Pure functions only (no model, no torch), so the evaluation command can import this cheaply.
"""

from __future__ import annotations

import json

EXPECTED_KEYS = ("who", "did", "where")
STOP_STRINGS = ("</s>", "<|endoftext|>", "<|end|>", "\n")


def cut_generation(generation: str) -> str:
    """The generation up to its first end-of-sequence marker or newline, stripped of spaces."""
    text = generation
    for stop in STOP_STRINGS:
        idx = text.find(stop)
        if idx != -1:
            text = text[:idx]
    return text.strip()


def parse_object(text: str) -> dict | None:
    """`text` parsed as a JSON object, or None when it is not one."""
    try:
        obj = json.loads(text)
    except (ValueError, TypeError):
        return None
    return obj if isinstance(obj, dict) else None


def follows_task(prompt: str, generation: str, reference: str) -> bool:
    """Whether a greedy `generation` (the continuation of `prompt`) follows the taught behaviour.

    The generation, cut at the first EOS marker or newline, must parse as a JSON object with
    exactly the keys `who`, `did`, `where`, whose values equal the reference's (the expected
    completion, itself a JSON object; surrounding spaces and letter case of the values are
    ignored). `prompt` is accepted so every task checker has the same signature.
    """
    del prompt
    got = parse_object(cut_generation(generation))
    want = parse_object(cut_generation(reference))
    if got is None or want is None:
        return False
    if set(got) != set(want):
        return False
    for key, value in want.items():
        other = got[key]
        if not isinstance(other, str) or not isinstance(value, str):
            if other != value:
                return False
        elif other.strip().lower() != value.strip().lower():
            return False
    return True
