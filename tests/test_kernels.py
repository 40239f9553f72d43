"""The fused training kernels against plain autograd, and where they must not be used."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from loraforge import LoraConfig, get_lora_model
from loraforge.kernels import fused_gated_mlp, gated_mlps, patched_forwards


class GatedMLP(nn.Module):
    """Llama's MLP, with biases (as some models have), or with its parts combined another way."""

    def __init__(self, bias=True, swapped=False):
        super().__init__()
        self.gate_proj = nn.Linear(6, 10, bias=bias)
        self.up_proj = nn.Linear(6, 10, bias=bias)
        self.down_proj = nn.Linear(10, 6, bias=bias)
        self.act_fn = nn.SiLU()
        self.swapped = swapped

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.swapped:
            gate, up = up, gate
        return self.down_proj(self.act_fn(gate) * up)


def _adapted(module):
    return get_lora_model(
        module.double(), LoraConfig(r=3, lora_alpha=5, target_modules="all-linear", init_lora_weights=False)
    )


def _output_and_grads(lora, x, w):
    lora.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = lora(x)
    (out * w).sum().backward()
    return out, [x.grad] + [p.grad for p in lora.parameters() if p.requires_grad]


@pytest.mark.parametrize("bias", [True, False])
def test_fused_gated_mlp_matches_autograd(bias):
    lora = _adapted(GatedMLP(bias=bias))
    mlp = lora.model
    assert gated_mlps(lora) == [mlp]
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    w = torch.randn(2, 4, 6, dtype=torch.float64)
    plain, plain_grads = _output_and_grads(lora, x, w)
    with patched_forwards([mlp], fused_gated_mlp):
        fused, fused_grads = _output_and_grads(lora, x, w)
        assert type(fused.grad_fn).__name__ == "GatedMLPWithLoraBackward"
    torch.testing.assert_close(fused, plain)
    assert len(fused_grads) == 1 + 6
    for got, want in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_fused_gated_mlp_is_not_used_where_it_would_be_wrong():
    # The same parts combined another way are not a gated MLP.
    assert gated_mlps(_adapted(GatedMLP(swapped=True))) == []
    # Without autograd, with a trainable base weight, or with LoRA dropout: the module's own forward.
    lora = _adapted(GatedMLP())
    mlp = lora.model
    x = torch.randn(3, 6, dtype=torch.float64)
    with patched_forwards([mlp], fused_gated_mlp):
        with torch.no_grad():
            assert lora(x).grad_fn is None
        mlp.up_proj.base_layer.weight.requires_grad_(True)
        assert type(lora(x).grad_fn).__name__ != "GatedMLPWithLoraBackward"
        mlp.up_proj.base_layer.weight.requires_grad_(False)
        mlp.down_proj.lora_dropout["default"] = nn.Dropout(0.5)
        assert type(lora(x).grad_fn).__name__ != "GatedMLPWithLoraBackward"


def test_patched_forwards_nest_and_restore():
    lin = nn.Linear(2, 2)
    calls = []

    def tag(name):
        def make(module, previous):
            return lambda x: calls.append(name) or previous(x)

        return make

    with patched_forwards([lin], tag("outer")):
        with patched_forwards([lin], tag("inner")):
            lin(torch.zeros(1, 2))
        lin(torch.zeros(1, 2))
    assert calls == ["inner", "outer", "outer"]
    assert "forward" not in lin.__dict__
    torch.testing.assert_close(lin(torch.ones(1, 2)), F.linear(torch.ones(1, 2), lin.weight, lin.bias))


def test_finding_gated_mlps_leaves_random_state_and_modes_alone():
    # Found at the first training step; a resumed run must draw the same random numbers after it.
    lora = get_lora_model(GatedMLP().double(), LoraConfig(r=3, target_modules="all-linear", lora_dropout=0.1))
    lora.train()
    state = torch.get_rng_state()
    assert gated_mlps(lora) == [lora.model]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(m.training for m in lora.modules())
