"""Adapter algebra: new adapters from weighted combinations."""

import pytest
import torch
from tiny_models import tiny_llama

from loraforge import LoraConfig, get_lora_model


@pytest.fixture
def two_adapters():
    model = get_lora_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.add_adapter(
        "b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    )
    return model


def layer_deltas(model, name):
    return {
        n: m.delta(name) for n, m in model.model.named_modules() if hasattr(m, "lora_A") and name in m.lora_A
    }


def expected_sum(model, weights):
    out = {}
    for adapter, w in weights.items():
        for n, d in layer_deltas(model, adapter).items():
            out[n] = out.get(n, 0) + w * d
    return out


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_exact(two_adapters, method, ids):
    model = two_adapters
    model.add_weighted_adapter(["default", "b"], [0.7, -0.3], "mix", combination_type=method, svd_rank=6)
    got = layer_deltas(model, "mix")
    want = expected_sum(model, {"default": 0.7, "b": -0.3})
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)
    model.set_adapter("mix")
    mixed_out = model(ids).logits
    model.set_adapters(["default", "b"], [0.7, -0.3])
    torch.testing.assert_close(mixed_out, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_cat_rank_is_sum_of_ranks(two_adapters):
    two_adapters.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="cat")
    q = two_adapters.model.get_submodule("model.layers.0.self_attn.q_proj")
    v = two_adapters.model.get_submodule("model.layers.0.self_attn.v_proj")
    assert q.r["mix"] == 6 and v.r["mix"] == 4 and q.scaling["mix"] == 1.0


def test_svd_truncates_to_requested_rank_optimally(two_adapters):
    model = two_adapters
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "low", combination_type="svd", svd_rank=2)
    q = "model.layers.0.self_attn.q_proj"
    full = expected_sum(model, {"default": 1.0, "b": 1.0})[q]
    got = layer_deltas(model, "low")[q]
    S = torch.linalg.svdvals(full)
    # Eckart-Young: the best rank-2 error is the norm of the dropped singular values.
    torch.testing.assert_close(
        torch.linalg.matrix_norm(full - got), S[2:].square().sum().sqrt(), rtol=1e-4, atol=1e-5
    )


def test_linear_needs_equal_ranks(two_adapters):
    with pytest.raises(ValueError, match="one rank"):
        two_adapters.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="linear")


def test_linear_of_one_adapter_is_that_adapter(two_adapters):
    two_adapters.add_weighted_adapter(["default"], [0.6], "scaled", combination_type="linear")
    for n, d in layer_deltas(two_adapters, "default").items():
        torch.testing.assert_close(layer_deltas(two_adapters, "scaled")[n], 0.6 * d, atol=1e-6, rtol=1e-5)


def test_dare_with_full_density_is_the_weighted_sum(two_adapters):
    two_adapters.add_weighted_adapter(
        ["default", "b"], [0.5, 2.0], "dare", combination_type="dare_linear", density=1.0, svd_rank=6
    )
    want = expected_sum(two_adapters, {"default": 0.5, "b": 2.0})
    for n, d in layer_deltas(two_adapters, "dare").items():
        torch.testing.assert_close(d, want[n], atol=1e-5, rtol=1e-4)


def test_dare_drops_and_rescales(two_adapters):
    two_adapters.add_weighted_adapter(
        ["default"], [1.0], "dare", combination_type="dare_linear", density=0.5, svd_rank=32
    )
    q = "model.layers.0.self_attn.q_proj"
    got, full = layer_deltas(two_adapters, "dare")[q], layer_deltas(two_adapters, "default")[q]
    kept = got.abs() > 1e-6
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(got[kept], 2 * full[kept], atol=1e-4, rtol=1e-3)


def test_ties_elects_sign_and_averages_agreeing_entries(two_adapters):
    model = two_adapters
    # Same adapter twice with opposite signs at unequal strength: the elected sign is the stronger one.
    model.add_weighted_adapter(
        ["default", "b"], [1.0, 0.0], "t1", combination_type="ties", density=1.0, svd_rank=32
    )
    v = "model.layers.0.self_attn.v_proj"
    torch.testing.assert_close(
        layer_deltas(model, "t1")[v], layer_deltas(model, "default")[v], atol=1e-5, rtol=1e-4
    )
    model.add_weighted_adapter(
        ["default", "b"], [1.0, 1.0], "t2", combination_type="ties", density=0.2, svd_rank=32
    )
    got = layer_deltas(model, "t2")[v]
    only_default = layer_deltas(model, "default")[v]
    kept = got.abs() > 1e-6
    assert 0.1 < kept.float().mean() < 0.3
    torch.testing.assert_close(got[kept], only_default[kept], atol=1e-4, rtol=1e-3)


def test_bad_combination_arguments(two_adapters):
    with pytest.raises(ValueError, match="combination_type"):
        two_adapters.add_weighted_adapter(["default"], [1], "x", combination_type="magic")
    with pytest.raises(ValueError, match="one weight per adapter"):
        two_adapters.add_weighted_adapter(["default", "b"], [1], "x")
    with pytest.raises(ValueError, match="unknown adapter 'zzz'"):
        two_adapters.add_weighted_adapter(["zzz"], [1], "x")
    with pytest.raises(ValueError, match="already exists"):
        two_adapters.add_weighted_adapter(["default"], [1], "b")
    with pytest.raises(ValueError, match="clashes"):
        two_adapters.add_weighted_adapter(["default"], [1], "half")
