"""Checkers for the example text task: `Describe as JSON: <sentence>\\n` -> `{"who": ..., "did": ..., "where": ...}`.

Pure functions only (no model, no torch), so the evaluation command can import this cheaply.

`follows_task` is the behaviour the fine-tune teaches: answer with one compact JSON object with
exactly the reference's keys, in order, whose values are plain words, and stop (EOS or newline)
right after it. It does not require the values to be the right words; `values_right` counts the
values equal to the reference's one by one and `matches_reference` requires all of them (taking
words out of the prompt needs a base that copies in context: the embedded base does, see its
`TRAINING.md`).
"""

from __future__ import annotations

import json
import re

from loraforge.errors import UserError

EXPECTED_KEYS = ("who", "did", "where")
STOP_STRINGS = ("</s>", "<|endoftext|>", "<|end|>", "<|im_end|>", "<|eot_id|>", "\n")
_WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")


def cut_generation(generation: str) -> str:
    """The generation up to its first end-of-sequence marker or newline, stripped of spaces."""
    text = generation
    for stop in STOP_STRINGS:
        idx = text.find(stop)
        if idx != -1:
            text = text[:idx]
    return text.strip()


def parse_object(text: str) -> dict | None:
    """`text` parsed as a JSON object, or None when it is not exactly one."""
    try:
        obj = json.loads(text)
    except (ValueError, TypeError):
        return None
    return obj if isinstance(obj, dict) else None


def _expected(reference: str) -> dict:
    want = parse_object(cut_generation(reference))
    if want is None:
        raise UserError(f"reference is not a JSON object: {reference!r}")
    return want


def follows_task(prompt: str, generation: str, reference: str) -> bool:
    """Whether a greedy `generation` (the continuation of `prompt`) follows the taught format.

    The generation, cut at the first EOS marker or newline, must be exactly one JSON object
    (nothing before or after it) with the same keys as the reference completion, in the same
    order, each value a non-empty string of plain words (letters separated by single spaces).
    `prompt` is accepted so every task checker has the same signature.
    """
    del prompt
    want = _expected(reference)
    got = parse_object(cut_generation(generation))
    if got is None or list(got) != list(want):
        return False
    return all(isinstance(v, str) and _WORDS.fullmatch(v) is not None for v in got.values())


def values_right(prompt: str, generation: str, reference: str) -> tuple[int, int]:
    """(values equal to the reference's, values in the reference): each value compared on its own,
    ignoring letter case and outer spaces; a generation that does not follow the format gets none."""
    want = _expected(reference)
    if not follows_task(prompt, generation, reference):
        return 0, len(want)
    got = parse_object(cut_generation(generation))
    return sum(got[k].strip().lower() == str(v).strip().lower() for k, v in want.items()), len(want)


def matches_reference(prompt: str, generation: str, reference: str) -> bool:
    """`follows_task` and every value equal to the reference's (ignoring letter case and outer spaces)."""
    right, total = values_right(prompt, generation, reference)
    return right == total
