"""Which adapters a request asks for, as a `Mix` of (name, weight) pairs (``()`` is the bare base).

A request selects adapters in up to three places, all combined into one Mix:

* ``model``: the base's name (no adapter), an adapter name (weight 1), or a weighted mix written
  ``"style:0.7+tone:0.3"`` (a name without ``:weight`` has weight 1). A string that is itself a known
  adapter name is always that adapter, so names holding ``+`` or ``:`` keep working.
* ``adapters``: ``[{"name": "style", "weight": 0.7}, ...]`` (weight 1 if left out).
* for images, ``<lora:name:weight>`` tags in the prompt (AUTOMATIC1111's syntax, weight 1 if left out),
  which are cut out of the prompt.

Combining: the same adapter named twice gets the sum of its weights; weight-0 entries are dropped
(a weight-0 adapter changes nothing), so ``"a:0"`` is the base. Order is first mention: it decides
which adapter's ``modules_to_save`` copy a row uses when several have one (the first, as
`set_adapters` does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Container

from loraforge.errors import UserError

Mix = tuple[tuple[str, float], ...]

MAX_WEIGHT = 100.0  # |weight| above this is a typo, not a mix
LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^<>]*))?>")


class BadField(UserError):
    """A request field that cannot be used; `param` names it (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_weight(value, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadField(f"{param} must be a number, got {type(value).__name__}", param)
    weight = float(value)
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise BadField(
            f"{param} must be a finite number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {value}", param
        )
    return weight


def parse_weight(text: str, param: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadField(f"{param}: the weight after ':' must be a number, got {text!r}", param) from None
    return check_weight(value, param)


def parse_model(model: str, is_adapter: Container[str], base_names: Container[str]) -> Mix:
    """The `model` field as a Mix (before checking that its adapters exist)."""
    if model in base_names:
        return ()
    if model in is_adapter:
        return ((model, 1.0),)
    pairs = []
    for part in model.split("+"):
        part = part.strip()
        name, sep, weight = part.rpartition(":")
        if not sep or part in is_adapter:
            name, weight = part, "1"
        if not name:
            raise BadField(f"model {model!r}: an empty adapter name in the mix", "model")
        pairs.append((name, parse_weight(weight, "model")))
    return tuple(pairs)


def parse_adapters(value) -> Mix:
    """The `adapters` field: a list of {"name": str, "weight": number (default 1)}."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadField(
            f"adapters must be a list of {{name, weight}} objects, got {type(value).__name__}", "adapters"
        )
    pairs = []
    for i, item in enumerate(value):
        where = f"adapters[{i}]"
        if not isinstance(item, dict):
            raise BadField(f"{where} must be an object with name and weight", where)
        unknown = set(item) - {"name", "weight"}
        if unknown:
            raise BadField(
                f"{where} has an unknown field {sorted(unknown)[0]!r} (fields: name, weight)", where
            )
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise BadField(f"{where}.name must be a non-empty string", f"{where}.name")
        pairs.append((name, check_weight(item.get("weight", 1.0), f"{where}.weight")))
    return tuple(pairs)


def extract_prompt_loras(prompt: str) -> tuple[str, Mix]:
    """Cuts ``<lora:name>`` / ``<lora:name:weight>`` tags out of an image prompt: (clean prompt, Mix).
    Spaces left around a removed tag are collapsed."""
    pairs = []
    for m in LORA_TAG.finditer(prompt):
        weight = m.group(2)
        pairs.append((m.group(1).strip(), 1.0 if weight in (None, "") else parse_weight(weight, "prompt")))
    clean = re.sub(r"\s{2,}", " ", LORA_TAG.sub(" ", prompt)).strip() if pairs else prompt
    return clean, tuple(pairs)


def combine(*mixes: Mix) -> Mix:
    """One Mix from several: weights of the same name add up; zero weights are dropped."""
    total: dict[str, float] = {}
    for mix in mixes:
        for name, weight in mix:
            total[name] = total.get(name, 0.0) + weight
    return tuple((name, weight) for name, weight in total.items() if weight != 0)


def describe(mix: Mix) -> str:
    """A mix written as the `model` field takes it ("a:0.7+b:0.3"); "" for the base."""
    return "+".join(name if weight == 1 else f"{name}:{weight:g}" for name, weight in mix)


def check_known(
    mix: Mix, known: Callable[[str], bool], names: Callable[[], list[str]], limit: int = 20
) -> None:
    """NotFound-style `UnknownAdapter` for the first name of `mix` that `known` refuses."""
    for name, _ in mix:
        if not known(name):
            raise UnknownAdapter(name, names(), limit)


class UnknownAdapter(UserError):
    """An adapter name no one registered (HTTP 404). The message lists the known names, at most `limit`."""

    def __init__(self, name: str, available: list[str], limit: int = 20):
        shown = ", ".join(sorted(available)[:limit]) or "none"
        more = (
            f" (and {len(available) - limit} more; GET /v1/models lists all)"
            if len(available) > limit
            else ""
        )
        super().__init__(f"unknown adapter {name!r}; the server has: {shown}{more}")
        self.name = name
