"""Each layer kind against reference values computed by hand, and exact merges."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from loraforge.layers import LoraConv, LoraEmbedding, LoraLinear


def make(layer_cls, base, r=4, alpha=8, rslora=False):
    layer = layer_cls(base)
    layer.add_adapter("a", r=r, lora_alpha=alpha, lora_dropout=0.0, init=False, use_rslora=rslora)
    layer.active = [("a", 1.0)]
    return layer


def test_linear_matches_formula():
    base = nn.Linear(6, 5)
    layer = make(LoraLinear, base)
    x = torch.randn(2, 3, 6)
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    expected = base(x) + (8 / 4) * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_linear_without_autograd_matches_formula_and_keeps_weights(mode):
    # Without autograd the update is added in place into the base output; that must not touch W or x.
    base = nn.Linear(6, 5)
    layer = make(LoraLinear, base)
    x = torch.randn(2, 3, 6)
    weight, x_before = base.weight.clone(), x.clone()
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    with torch.no_grad():
        expected = base(x) + (8 / 4) * x @ A.T @ B.T
    with getattr(torch, mode)():
        out = layer(x)
    torch.testing.assert_close(out, expected)
    assert torch.equal(base.weight, weight) and torch.equal(x, x_before)


class _StridedLinear(nn.Linear):
    """A linear layer whose output is a non-contiguous view (same values), as some kernels return."""

    def forward(self, x):
        return super().forward(x).transpose(0, 1).contiguous().transpose(0, 1)


def test_linear_without_autograd_handles_a_non_contiguous_base_output():
    base = _StridedLinear(6, 5)
    layer = make(LoraLinear, base)
    x = torch.randn(2, 3, 6)
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    with torch.no_grad():
        assert not base(x).is_contiguous()
        torch.testing.assert_close(layer(x), base(x) + (8 / 4) * x @ A.T @ B.T)


def runs_fused_update(out: torch.Tensor) -> bool:
    """Whether `out`'s autograd graph holds the fused adapter update (`kernels.LoraUpdate`)."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "LoraUpdateBackward":
            return True
        todo.extend(next_node for next_node, _ in node.next_functions)
    return False


def _training_reference(layer, x, weight, p=0.0, seed=1):
    """Output and gradients (x, A, B) of the formula, by plain autograd on copies of the parameters
    (with LoRA dropout p, its mask drawn after seeding the global generator with `seed`)."""
    base = layer.base_layer
    A = layer.lora_A["a"].detach().clone().requires_grad_(True)
    B = layer.lora_B["a"].detach().clone().requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    h = F.dropout(x, p) if p else x
    out = F.linear(x, base.weight, base.bias) + weight * layer.scaling["a"] * (h @ A.T) @ B.T
    out.pow(2).sum().backward()
    return out, x.grad, A.grad, B.grad


@pytest.mark.parametrize("bias,dropout", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_linear_training_path_matches_autograd_reference(bias, dropout):
    # While training a frozen nn.Linear, the adapter runs its own backward (LoraUpdate): output and
    # all three gradients must equal plain autograd on the formula, LoRA dropout included.
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=bias).double().requires_grad_(False)
    layer = make(LoraLinear, base).double()
    if dropout:
        layer.lora_dropout["a"] = nn.Dropout(dropout)
    layer.active = [("a", 0.25)]
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    out = layer(x)
    assert runs_fused_update(out)
    out.pow(2).sum().backward()
    ref_out, ref_dx, ref_dA, ref_dB = _training_reference(layer, x, 0.25, dropout)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(x.grad, ref_dx)
    torch.testing.assert_close(layer.lora_A["a"].grad, ref_dA)
    torch.testing.assert_close(layer.lora_B["a"].grad, ref_dB)
    assert base.weight.grad is None


def test_linear_training_path_is_skipped_where_it_would_be_wrong():
    # A trainable base weight must get its gradient, and a hook on the base layer must run: both
    # use the generic path.
    base = nn.Linear(6, 5)
    layer = make(LoraLinear, base)
    x = torch.randn(2, 3, 6)
    layer(x).sum().backward()
    assert base.weight.grad is not None
    base.requires_grad_(False)
    assert runs_fused_update(layer(x))
    base.register_forward_hook(lambda module, args, output: output * 2)
    out = layer(x)
    assert not runs_fused_update(out)
    torch.testing.assert_close(
        out, 2 * base.forward(x) + layer.scaling["a"] * x @ layer.lora_A["a"].T @ layer.lora_B["a"].T
    )


def test_training_forward_leaves_an_output_a_base_hook_kept_unchanged():
    # The update is added into the base output in place only where nothing else can hold that
    # output: a forward hook that keeps it must see the base layer's own result.
    base = nn.Linear(6, 5, bias=False).to(torch.bfloat16).requires_grad_(False)  # float32 adapter
    layer = make(LoraLinear, base)
    kept = []
    base.register_forward_hook(lambda module, args, output: kept.append(output))
    x = torch.randn(2, 3, 6, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    with torch.no_grad():
        assert torch.equal(kept[0], F.linear(x, base.weight))
        assert not torch.equal(out, kept[0])


class _Ops(TorchDispatchMode):
    """The aten ops run while active, each as (name, args, output)."""

    def __init__(self):
        super().__init__()
        self.ran = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ran.append((func.overloadpacket.__name__, args, out))
        return out

    def casts(self) -> list[tuple]:
        """(shape, from dtype, to dtype) of each dtype conversion."""
        return [(tuple(a[0].shape), a[0].dtype, out.dtype) for name, a, out in self.ran if name == "_to_copy"]

    def products(self) -> list[tuple[int, int, int]]:
        """(rows, inner, columns) of each matrix product."""
        return [
            (a[-2].shape[0], a[-2].shape[1], a[-1].shape[1])
            for name, a, _ in self.ran
            if name in ("mm", "addmm", "addmm_")
        ]


def test_layers_reading_one_input_cast_it_once_with_the_same_gradients():
    # q, k and v read one bf16 input; their float32 adapters share one cast of it (forward and
    # backward), and outputs and gradients are those of a cast per layer. An input changed in place
    # in between is cast anew.
    torch.manual_seed(0)
    layers = [
        make(LoraLinear, nn.Linear(6, n, bias=False).to(torch.bfloat16).requires_grad_(False))
        for n in (5, 3, 3)
    ]
    x = torch.randn(2, 4, 6, dtype=torch.bfloat16, requires_grad=True)
    with _Ops() as seen:
        outs = [layer(x) for layer in layers]
    assert seen.casts().count(((2, 4, 6), torch.bfloat16, torch.float32)) == 1
    sum(o.float().pow(2).sum() for o in outs).backward()

    def reference(shared: bool):
        ref_x = x.detach().clone().requires_grad_(True)
        h = ref_x.to(torch.float32)
        refs = []
        for layer in layers:
            A = layer.lora_A["a"].detach().clone().requires_grad_(True)
            B = layer.lora_B["a"].detach().clone().requires_grad_(True)
            update = ((h if shared else ref_x.to(torch.float32)) @ A.T * layer.scaling["a"]) @ B.T
            refs.append((F.linear(ref_x, layer.base_layer.weight) + update.to(torch.bfloat16), A, B))
        sum(o.float().pow(2).sum() for o, _, _ in refs).backward()
        return refs, ref_x.grad

    refs, ref_dx = reference(shared=True)
    for layer, out, (ref_out, A, B) in zip(layers, outs, refs):
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(layer.lora_A["a"].grad, A.grad)
        torch.testing.assert_close(layer.lora_B["a"].grad, B.grad)
    torch.testing.assert_close(x.grad, ref_dx)
    # A cast per layer adds the three input gradients in bfloat16 instead: the same within its rounding.
    _, separate_dx = reference(shared=False)
    torch.testing.assert_close(x.grad, separate_dx, atol=2**-6 * separate_dx.abs().max().item(), rtol=0)

    y = torch.randn(2, 4, 6, dtype=torch.bfloat16)
    first = layers[0](y)
    y.mul_(2)
    with torch.no_grad():
        expected = layers[1].base_layer(y) + (
            (y.float() @ layers[1].lora_A["a"].T * layers[1].scaling["a"]) @ layers[1].lora_B["a"].T
        ).to(torch.bfloat16)
    torch.testing.assert_close(layers[1](y), expected)
    assert first.shape == (2, 4, 5)


class _SubclassedLinear(nn.Linear):
    """Not exactly `nn.Linear`: its layers take the generic training path, not the fused update."""


@pytest.mark.parametrize("linear", [nn.Linear, _SubclassedLinear])
def test_checkpoint_recompute_skips_the_blocks_last_frozen_product(linear):
    # Adapters go first and the frozen product last, so a checkpointed block's recomputation stops
    # before its final projection (whose output no gradient needs): the up projection's frozen
    # product (6 x 5 times 5 x 10) is recomputed in the backward pass, the down projection's
    # (6 x 10 times 10 x 7) never. The
    # gradients are those of the same block without checkpointing.
    torch.manual_seed(0)
    up = make(LoraLinear, linear(5, 10).requires_grad_(False))
    down = make(LoraLinear, linear(10, 7).requires_grad_(False))
    assert runs_fused_update(down(torch.randn(6, 10))) == (linear is nn.Linear)

    def block(x):
        return down(F.silu(up(x)))

    x = torch.randn(2, 3, 5, requires_grad=True)
    plain = block(x)
    plain.pow(2).sum().backward()
    expected = [t.grad.clone() for t in (x, up.lora_A["a"], up.lora_B["a"], down.lora_A["a"])]
    for t in (x, up.lora_A["a"], up.lora_B["a"], down.lora_A["a"]):
        t.grad = None
    out = checkpoint(block, x, use_reentrant=False)
    torch.testing.assert_close(out, plain)
    loss = out.pow(2).sum()
    with _Ops() as seen:
        loss.backward()
    assert (6, 5, 10) in seen.products()  # the recomputation ran
    assert (6, 10, 7) not in seen.products()
    got = [t.grad for t in (x, up.lora_A["a"], up.lora_B["a"], down.lora_A["a"])]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_rslora_scaling():
    layer = make(LoraLinear, nn.Linear(6, 5), r=4, alpha=8, rslora=True)
    assert layer.scaling["a"] == pytest.approx(8 / math.sqrt(4))


def test_default_init_is_a_no_op():
    base = nn.Linear(6, 5)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=4, lora_alpha=8, lora_dropout=0.0, init=True, use_rslora=False)
    layer.active = [("a", 1.0)]
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A["a"].abs().sum() > 0 and layer.lora_B["a"].abs().sum() == 0


def test_gpt2_conv1d_matches_formula_and_merges():
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs, weight stored (6, 5)
    nn.init.normal_(base.weight)
    layer = make(LoraLinear, base)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (6, 5)
    x = torch.randn(2, 3, 6)
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    expected = x @ base.weight + base.bias + 2 * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)
    before = layer(x)
    layer.merge([("a", 1.0)])
    torch.testing.assert_close(base(x), before, atol=1e-5, rtol=1e-5)


def test_conv2d_matches_formula_and_merges():
    base = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    layer = make(LoraConv, base)
    x = torch.randn(2, 3, 9, 9)
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    assert A.shape == (4, 3, 3, 3) and B.shape == (8, 4, 1, 1)
    expected = base(x) + 2 * F.conv2d(F.conv2d(x, A, stride=2, padding=1), B)
    torch.testing.assert_close(layer(x), expected)
    unmerged = layer(x)
    layer.merge([("a", 1.0)])
    layer.active = []
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_conv1d_merges():
    base = nn.Conv1d(3, 5, kernel_size=3, padding=1)
    layer = make(LoraConv, base)
    x = torch.randn(2, 3, 10)
    unmerged = layer(x)
    layer.merge([("a", 1.0)])
    layer.active = []
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_embedding_matches_formula_and_merges():
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = make(LoraEmbedding, base)
    ids = torch.tensor([[1, 2, 0], [19, 5, 5]])
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    assert A.shape == (4, 20) and B.shape == (6, 4)
    expected = base(ids) + 2 * (A.T[ids] @ B.T)
    torch.testing.assert_close(layer(ids), expected)
    unmerged = layer(ids)
    layer.merge([("a", 1.0)])
    layer.active = []
    torch.testing.assert_close(layer(ids), unmerged, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    base = nn.Linear(6, 5)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=4, lora_alpha=4, lora_dropout=0.5, init=False, use_rslora=False)
    layer.active = [("a", 1.0)]
    x = torch.randn(16, 6)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_merge_unmerge_cycles_do_not_drift():
    base = nn.Linear(64, 64)
    layer = make(LoraLinear, base)
    original = base.weight.detach().clone()
    errors = []
    for _ in range(50):
        layer.merge([("a", 0.7)])
        layer.unmerge()
        errors.append((base.weight - original).abs().max().item())
    assert errors[-1] <= 1e-6
    # Rounding may cost one ulp on the first cycle; later cycles must not add to it.
    assert errors[-1] <= errors[0] + 1e-7
