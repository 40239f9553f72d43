"""Adapter selections: the `model` field, the `adapters` field, `<lora:...>` prompt tags, combining."""

import pytest

from loraforge.serve.mixes import (
    BadField,
    UnknownAdapter,
    combine,
    describe,
    extract_prompt_loras,
    parse_adapters,
    parse_model,
)

KNOWN = {"style", "tone", "a+b", "v:2"}


@pytest.mark.parametrize(
    "model, mix",
    [
        ("tiny-llama", ()),
        ("style", (("style", 1.0),)),
        ("style:0.7+tone:0.3", (("style", 0.7), ("tone", 0.3))),
        ("style + tone:-0.5", (("style", 1.0), ("tone", -0.5))),
        ("a+b", (("a+b", 1.0),)),  # a registered name wins over the mix syntax
        ("v:2", (("v:2", 1.0),)),
        ("v:2:0.5+style", (("v:2", 0.5), ("style", 1.0))),
        ("unknown", (("unknown", 1.0),)),  # existence is checked later (404)
    ],
)
def test_parse_model(model, mix):
    assert parse_model(model, KNOWN, {"tiny-llama"}) == mix


@pytest.mark.parametrize("model", ["style:x", "style:0.5+", "style:inf", "style:1e9"])
def test_parse_model_rejects_bad_weights_naming_the_field(model):
    with pytest.raises(BadField) as e:
        parse_model(model, KNOWN, {"tiny-llama"})
    assert e.value.param == "model"


def test_parse_adapters_field():
    assert parse_adapters([{"name": "style", "weight": 0.25}, {"name": "tone"}]) == (
        ("style", 0.25),
        ("tone", 1.0),
    )
    assert parse_adapters(None) == ()


@pytest.mark.parametrize(
    "value, param",
    [
        ("style", "adapters"),
        ([["style", 1]], "adapters[0]"),
        ([{"name": "style"}, {"name": 3}], "adapters[1].name"),
        ([{"name": "style", "weight": "high"}], "adapters[0].weight"),
        ([{"name": "style", "weight": True}], "adapters[0].weight"),
        ([{"name": "style", "scale": 1}], "adapters[0]"),
    ],
)
def test_parse_adapters_names_the_bad_field(value, param):
    with pytest.raises(BadField) as e:
        parse_adapters(value)
    assert e.value.param == param


def test_prompt_tags_are_cut_out():
    clean, mix = extract_prompt_loras("a cat <lora:style:0.8>, sitting <lora:tone> on a mat")
    assert clean == "a cat , sitting on a mat"
    assert mix == (("style", 0.8), ("tone", 1.0))
    assert extract_prompt_loras("no tags here") == ("no tags here", ())
    with pytest.raises(BadField):
        extract_prompt_loras("<lora:style:lots>")


def test_combine_adds_weights_and_drops_zeros_keeping_first_mention_order():
    assert combine((("a", 0.5), ("b", 1.0)), (("a", 0.25),), (("c", 0.0),)) == (("a", 0.75), ("b", 1.0))
    assert combine((("a", 0.5),), (("a", -0.5),)) == ()
    assert describe((("a", 0.7), ("b", 1.0))) == "a:0.7+b"


def test_unknown_adapter_message_lists_names_and_truncates():
    assert "the server has: a, b" in str(UnknownAdapter("x", ["b", "a"]))
    many = [f"n{i:04d}" for i in range(1000)]
    message = str(UnknownAdapter("x", many, limit=5))
    assert "n0000, n0001, n0002, n0003, n0004 (and 995 more" in message
    assert len(message) < 200
