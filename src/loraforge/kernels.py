"""Fused LoRA training kernels: hand-written backward passes for the blocks training spends its time in.

Autograd's generic backward is correct but, for a frozen layer plus a rank-r adapter, wasteful:

* it takes the A gradient as ``xᵀ @ g``, a skinny product CPUs run 3-4x slower than the same numbers
  as ``gᵀ @ x``;
* in a gated MLP (``down(silu(gate(x)) * up(x))``, Llama, Mistral, Qwen) it keeps four
  (tokens x intermediate) activations per layer alive until the backward pass.

`LoraUpdate` computes one adapter's update with every product in the fast orientation; the layer then
adds the frozen product last (why last: `LoraLayer._adapters_then_base`). `GatedMLPWithLora` runs a whole
gated MLP whose three projections carry adapters, keeping only ``gate`` and ``up`` and recomputing
the rest (elementwise) in the backward pass: half the MLP's activation memory, and no slower. Both
are used only while autograd is recording, for plain float `nn.Linear` bases (not quantized ones, not
DoRA adapters) where they give exactly the generic path's result (see `LoraLinear.fused_args`,
`fused_gated_mlp` and `LoraModel._training_kernels`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def lora_linear(x, weight, bias, A, B, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(x Wᵀ + b + scale·(x Aᵀ) Bᵀ, x Aᵀ) for a 2-D x."""
    xa = x @ A.T
    return F.linear(x, weight, bias).addmm_(xa, B.T, alpha=scale), xa


def lora_linear_grads(grad, h, xa, weight, A, B, scale, need_dx=True, dx=None):
    """(input gradient, A gradient, B gradient) of `lora_linear` for a 2-D output gradient, where the
    adapter's input h is x itself; the input gradient is added into `dx` when given. With weight None
    the input gradient is the adapter's part alone (the gradient reaching h: `LoraUpdate`)."""
    gb = (grad @ B).mul_(scale)  # (N, r): the gradient reaching h Aᵀ
    dA = gb.T @ h  # not h.T @ gb: the skinny orientation is 3-4x slower on CPUs
    dB = ((xa.T * scale) @ grad).T
    if need_dx:
        if weight is not None:
            dx = torch.addmm(dx, grad, weight) if dx is not None else grad @ weight
            dx.addmm_(gb, A)
        else:
            dx = gb @ A
    return dx, dA, dB


class LoraUpdate(torch.autograd.Function):
    """``scale·(h Aᵀ) Bᵀ + b`` for a 2-D h (b: the frozen base bias, or None); gradients for h, A and B.

    The scale goes on the (N, r) product, where it costs nothing. Only h Aᵀ is kept besides the inputs."""

    @staticmethod
    def forward(ctx, h, A, B, scale, bias):  # h: (N, in) -> (N, out)
        xa = h @ A.T  # (N, r)
        xs = xa * scale
        out = xs @ B.T if bias is None else torch.addmm(bias, xs, B.T)
        ctx.save_for_backward(h, xa, A, B)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):  # grad: (N, out)
        h, xa, A, B = ctx.saved_tensors
        dh, dA, dB = lora_linear_grads(grad, h, xa, None, A, B, ctx.scale, ctx.needs_input_grad[0])
        return dh, dA, dB, None, None


class GatedMLPWithLora(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` where each projection is `lora_linear` with args (W, b, A, B, scale)."""

    @staticmethod
    def forward(ctx, x, *args):
        gate_args, up_args, down_args = args[0:5], args[5:10], args[10:15]
        x2 = x.reshape(-1, x.shape[-1])
        gate, x_g = lora_linear(x2, *gate_args)
        up, x_u = lora_linear(x2, *up_args)
        out, x_d = lora_linear(F.silu(gate).mul_(up), *down_args)
        ctx.save_for_backward(x2, gate, up, x_g, x_u, x_d, *gate_args[:4], *up_args[:4], *down_args[:4])
        ctx.scales = (gate_args[4], up_args[4], down_args[4])
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, gate, up, x_g, x_u, x_d, *tensors = ctx.saved_tensors
        (Wg, _, Ag, Bg), (Wu, _, Au, Bu), (Wd, _, Ad, Bd) = tensors[0:4], tensors[4:8], tensors[8:12]
        s_g, s_u, s_d = ctx.scales
        g = grad.reshape(-1, grad.shape[-1])
        sig = torch.sigmoid(gate)
        silu = gate * sig
        dh, dAd, dBd = lora_linear_grads(g, silu * up, x_d, Wd, Ad, Bd, s_d)
        d_up = silu.mul_(dh)
        # d silu(z)/dz = sig(z) * (1 + z * (1 - sig(z)))
        d_gate = dh.mul_(up).mul_((1 - sig).mul_(gate).add_(1).mul_(sig))
        need_dx = ctx.needs_input_grad[0]
        dx, dAg, dBg = lora_linear_grads(d_gate, x2, x_g, Wg, Ag, Bg, s_g, need_dx)
        dx, dAu, dBu = lora_linear_grads(d_up, x2, x_u, Wu, Au, Bu, s_u, need_dx, dx)
        grads = [None, None, dAg, dBg, None, None, None, dAu, dBu, None, None, None, dAd, dBd, None]
        return (dx.view(ctx.shape) if dx is not None else None), *grads


# -- where the gated-MLP kernel applies ----------------------------------------------------------------


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` computing ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with LoRA on all
    three projections. Found by their parts, then confirmed numerically (a module with the same parts
    could combine them differently)."""
    found = []
    for module in model.modules():
        children = module._modules  # its own submodules (a LoraModel forwards attribute lookups)
        projections = [children.get(n) for n in ("gate_proj", "up_proj", "down_proj")]
        act = children.get("act_fn")
        if (
            all(hasattr(p, "fused_args") for p in projections)
            # Plain float layers only: a quantized base (bitsandbytes) keeps packed integers in `weight`,
            # which these kernels would multiply as if they were the matrix.
            and all(type(p.base_layer) is nn.Linear for p in projections)
            and type(act).__name__ in ("SiLU", "SiLUActivation")
            and _computes_gated_mlp(module)
        ):
            found.append(module)
    return found


def checkpointing(model: nn.Module) -> bool:
    """Whether `model` (transformers or diffusers) recomputes activations during backward: the patched
    forwards are gone by then, so it must get the plain ones. True where it cannot be told."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 / 4, diffusers
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return True


@torch.no_grad()
def _computes_gated_mlp(mlp: nn.Module) -> bool:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    weight = gate.base_layer.weight
    if weight.device.type == "meta":
        return False
    # Nothing here may draw from the global random generator (a resumed run must draw exactly what an
    # uninterrupted one does), so: its own generator, and eval mode (no dropout) for the comparison.
    generator = torch.Generator(weight.device).manual_seed(0)
    x = torch.randn(2, gate.in_features, generator=generator, device=weight.device).to(weight.dtype)
    modes = [(m, m.training) for m in mlp.modules()]
    mlp.eval()
    try:
        torch.testing.assert_close(mlp(x), down(F.silu(gate(x)) * up(x)))
    except AssertionError:
        return False
    finally:
        for m, training in modes:
            m.training = training
    return True


def fused_gated_mlp(mlp: nn.Module, original):
    """A forward for `mlp` that runs `GatedMLPWithLora` where all three projections allow it."""

    def forward(x, *more, **kwargs):
        args = [p.fused_args(x) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        if more or kwargs or any(a is None for a in args):  # no autograd, dropout, trainable base, ...
            return original(x, *more, **kwargs)
        return GatedMLPWithLora.apply(x, *args[0], *args[1], *args[2])

    return forward


@contextmanager
def patched_forwards(modules: list[nn.Module], make):
    """Within the block, ``module.forward`` is ``make(module, previous_forward)`` for each module; on
    exit each module gets back exactly the forward it had (so patches may nest)."""
    saved = []
    for module in modules:
        saved.append((module, module.__dict__.get("forward")))
        module.forward = make(module, module.forward)
    try:
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = previous
