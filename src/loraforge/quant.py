"""Quantized frozen bases (QLoRA): bitsandbytes' 4-bit (nf4, fp4) and 8-bit linear layers.

The base is loaded through transformers' `BitsAndBytesConfig`, so its linear layers are
bitsandbytes' `Linear4bit` / `Linear8bitLt`. Both subclass `nn.Linear`, but their ``weight`` is packed
integers, so nothing may read it as a float matrix: this module is the one place that tells a quantized
layer apart (`is_quantized`) and turns one back into floats (`dequantize_weight`, `dequantized_linear`).
LoRA layers wrap them like any linear layer; the adapter itself stays float32.

bitsandbytes (>= 0.50) runs on CPU as well as CUDA. It is an optional dependency: ``pip install
loraforge[quant]``.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.errors import UserError

QUANTIZE_CHOICES = ("none", "nf4", "fp4", "int8")
QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt")


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(
            "a quantized base needs bitsandbytes: pip install 'loraforge[quant]' (or bitsandbytes>=0.50)"
        ) from None
    return bitsandbytes


def quantization_config(quantize: str, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True):
    """transformers' `BitsAndBytesConfig` for `quantize` ("nf4", "fp4" or "int8"); None for "none".

    4-bit layers compute in `compute_dtype` (their weights are dequantized to it tile by tile) and
    quantize their quantization constants too (`double_quant`, QLoRA's default: ~0.4 bit/parameter less).
    """
    if quantize in (None, "none"):
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"quantize {quantize!r}: choose from {', '.join(QUANTIZE_CHOICES)}")
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def is_quantized(module: nn.Module) -> bool:
    """bitsandbytes' 4-bit or 8-bit linear layer (checked by class, without importing bitsandbytes)."""
    return any(
        cls.__name__ in QUANTIZED_CLASSES and "bitsandbytes" in cls.__module__ for cls in type(module).__mro__
    )


def avoid_broken_cpu_repack(module: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit weight for its AVX512-BF16 CPU inference kernel at the first
    eval-mode forward without autograd, and fails there when the layer's output size is not a multiple
    of 32 or its input size not a multiple of the quantization block (e.g. tiny-llama's 688-wide MLP).
    Such layers keep the regular kernel."""
    if quant_kind(module) != "4bit":
        return
    blocksize = getattr(module.weight.quant_state, "blocksize", 64) or 64
    if module.out_features % 32 or module.in_features % blocksize:
        module.support_avx512bf16_for_cpu = False


def repacked_for_cpu_inference(module: nn.Module) -> bool:
    """Whether bitsandbytes has repacked this 4-bit layer for its AVX512-BF16 CPU inference kernel, which
    it then uses for every call, with autograd on or not: that kernel has no backward pass, so no
    gradient reaches the layer's input through it."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_4bit_training_kernel(model: nn.Module) -> None:
    """Stops bitsandbytes from repacking `model`'s 4-bit layers for its CPU inference kernel (which it
    does at the first eval-mode forward, such as a training run's evaluation), so that training keeps
    a kernel with a backward pass (`repacked_for_cpu_inference`)."""
    for module in model.modules():
        if quant_kind(module) == "4bit":
            module.support_avx512bf16_for_cpu = False


def quant_kind(module: nn.Module) -> str | None:
    """ "4bit", "8bit" or None."""
    if not is_quantized(module):
        return None
    return "4bit" if type(module.weight).__name__ == "Params4bit" else "8bit"


@torch.no_grad()
def dequantize_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) float matrix a quantized linear layer multiplies by; its plain weight otherwise."""
    kind = quant_kind(module)
    if kind is None:
        return module.weight.to(dtype)
    bnb = require_bitsandbytes()
    weight = module.weight
    if kind == "4bit" and getattr(weight.quant_state, "packing_format_for_cpu", False):
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel at the
        # first eval-mode forward without autograd, and dequantize_4bit does not read that layout.
        # The layer's own kernel does: its response to the identity matrix is W^T (plus the bias).
        eye = torch.eye(module.in_features, device=weight.device, dtype=compute_dtype(module))
        W = module(eye).T
        if module.bias is not None:
            W = W - module.bias.to(W.dtype)[:, None]
    elif kind == "4bit":
        W = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        W = bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    return W.to(dtype)


def reusing_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``x @ W.T + b`` of a frozen bitsandbytes layer during CPU training, with W dequantized into one
    buffer per thread and dtype that every call reuses (sized for the largest weight: each call has
    used its W before the next one writes there); None where this does not apply (the caller then
    runs the layer itself).

    bitsandbytes' own training paths allocate a fresh dequantized W (up to tens of MB) at every call,
    three times per layer and step under checkpointing (forward, recompute, backward). glibc keeps such
    freed blocks in its fragmented heap (fine-tuning a 1B Llama on nf4 held about 1 GB more than it
    used), and writing fresh pages took a third of a 1B int8 step. The values are bitsandbytes' own,
    bit for bit (`_reusing_4bit`, `_reusing_8bit`)."""
    kind = quant_kind(module)
    if (
        kind is None
        or not torch.is_grad_enabled()
        or x.device.type != "cpu"
        or module.weight.requires_grad
        or (module.bias is not None and module.bias.requires_grad)
        or module._forward_hooks
        or module._forward_pre_hooks
        or torch.is_autocast_enabled("cpu")
    ):
        return None
    return _reusing_4bit(module, x) if kind == "4bit" else _reusing_8bit(module, x)


def _reusing_4bit(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """A 4-bit layer: bitsandbytes' own CPU kernel writes W, in the layer's compute dtype."""
    state = getattr(module.weight, "quant_state", None)
    dtype = getattr(module, "compute_dtype", None)
    if (
        state is None
        or state.dtype != dtype  # bitsandbytes' backward dequantizes to state.dtype first: keep its rounding
        or getattr(state, "packing_format_for_cpu", False)
        or state.blocksize >= 2048  # bitsandbytes itself avoids its AVX512 kernel there
        or state.shape[-1] % 2
        or _dequantize_kernel(state.quant_type, dtype) is None
    ):
        return None
    return _ReusingLinear.apply(x.to(dtype), module, _dequantize_into_scratch).to(x.dtype)


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.cache  # looked up at every 4-bit layer call in training
def _dequantize_kernel(quant_type: str, dtype: torch.dtype):
    """bitsandbytes' C function that dequantizes a 4-bit CPU weight into a given output, or None."""
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{_DTYPE_NAMES.get(dtype)}", None)


class _Scratch(threading.local):
    def __init__(self):
        self.buffers: dict[torch.dtype, torch.Tensor] = {}  # flat, as long as the largest weight yet


_SCRATCH = _Scratch()


def _scratch(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, cols) view of this thread's buffer for `dtype`, grown to fit."""
    flat = _SCRATCH.buffers.get(dtype)
    if flat is None or flat.numel() < rows * cols:
        flat = _SCRATCH.buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
    return flat[: rows * cols].view(rows, cols)


def _dequantize_into_scratch(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's (out, in) weight in `dtype`, written into this thread's buffer for that dtype."""
    bnb = require_bitsandbytes()
    weight = module.weight
    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float().contiguous()
    rows, cols = state.shape
    out = _scratch(rows, cols, dtype)
    packed = weight.data.view(torch.uint8).reshape(rows, cols // 2).contiguous()
    _dequantize_kernel(state.quant_type, dtype)(
        ctypes.c_void_p(packed.data_ptr()),
        ctypes.c_void_p(absmax.data_ptr()),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_longlong(state.blocksize),
        ctypes.c_longlong(rows),
        ctypes.c_longlong(cols),
    )
    return out


class _ReusingLinear(torch.autograd.Function):
    """y = x W^T + b with W written by `fill(module, dtype)` into the scratch buffer, in forward and
    again in backward (for the input gradient; the base is frozen)."""

    @staticmethod
    def forward(ctx, x, module, fill):  # x: (..., in) -> (..., out), in x's dtype
        ctx.module, ctx.fill, ctx.shape, ctx.dtype = module, fill, x.shape, x.dtype
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(x, fill(module, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):  # grad: (..., out) -> (..., in)
        if not ctx.needs_input_grad[0]:
            return None, None, None
        g = grad.reshape(-1, grad.shape[-1]).contiguous().to(ctx.dtype)
        return (g @ ctx.fill(ctx.module, ctx.dtype)).view(ctx.shape), None, None


def _reusing_8bit(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """An 8-bit layer, computed as bitsandbytes' training path does (`MatMul8bitFp`: the int8 rows in
    x's dtype times SCB / 127, then a float matmul, in forward and again for the input gradient)."""
    state = getattr(module, "state", None)
    if (
        state is None
        or not module.training  # bitsandbytes' eval path is another kernel (int8 matmul)
        or state.has_fp16_weights
        or state.CB is None
        or state.SCB is None
        or getattr(module.weight, "CB", None) is not None  # not yet moved into the state: let bitsandbytes
        or not x.dtype.is_floating_point
    ):
        return None
    return _ReusingLinear.apply(x, module, _int8_into_scratch)


_INT8_CHUNK = 1 << 20  # elements of float32 per chunk (4 MiB: stays in cache)


def _int8_into_scratch(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W = CB * SCB / 127 rounded once to `dtype`, as bitsandbytes computes it, written into this thread's
    buffer. The product goes through float32 a few rows at a time: the values are the same (a bfloat16
    multiply computes in float32 and rounds), but PyTorch's bfloat16 row-broadcast multiply is ~10x slower."""
    CB, SCB = module.state.CB, module.state.SCB
    rows, cols = CB.shape
    out, scale = _scratch(rows, cols, dtype), SCB.unsqueeze(1).mul(1.0 / 127.0)
    if dtype == torch.float32:
        return out.copy_(CB).mul_(scale)
    step = max(1, _INT8_CHUNK // cols)
    chunk = _scratch(step, cols, torch.float32)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        part = chunk[: stop - start]
        part.copy_(CB[start:stop]).mul_(scale[start:stop])
        out[start:stop].copy_(part)
    return out


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in (its output dtype for float32 input)."""
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def dequantized_linear(module: nn.Module, dtype: torch.dtype = torch.float32, delta=None) -> nn.Linear:
    """A plain `nn.Linear` holding a quantized layer's dequantized weight (plus `delta`, (out, in))."""
    W = dequantize_weight(module, torch.float32)
    if delta is not None:
        W += delta.to(W.dtype)
    bias = module.bias
    out = nn.Linear(
        module.in_features, module.out_features, bias=bias is not None, device=W.device, dtype=dtype
    )
    with torch.no_grad():
        out.weight.copy_(W)
        if bias is not None:
            out.bias.copy_(bias)
    out.requires_grad_(False)
    return out


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replaces every quantized linear layer of `model` by a plain one in `dtype`, drops transformers'
    record of the quantization (so `save_pretrained` writes a plain model), and returns how many."""
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dequantized_linear(getattr(parent, child), dtype))
    forget_quantization(model)
    return len(names)


def forget_quantization(model: nn.Module) -> None:
    """Removes transformers' quantization attributes from a model that no longer has quantized layers."""
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if attr in model.__dict__:
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def model_quantization(model: nn.Module) -> str | None:
    """ "4bit" / "8bit" when `model` holds quantized linear layers, else None."""
    for m in model.modules():
        kind = quant_kind(m)
        if kind:
            return kind
    return None


def quiet_int8_casts():
    """bitsandbytes warns at every 8-bit matmul of float32 input that it casts to float16 (on CPU too);
    said once per layer per call, it floods the output. The cast is how int8 layers work: silenced."""
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
