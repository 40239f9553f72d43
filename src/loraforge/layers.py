"""LoRA layers: a frozen base layer plus any number of named low-rank adapters.

Each wrapper computes ``base(x) + sum_i weight_i * scaling_i * B_i(A_i(dropout(x)))`` where
``scaling_i = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA). Adapter weights are kept as
plain parameters, ``lora_A[name]`` of shape (r, in, *kernel) and ``lora_B[name]`` of shape
(out, r, *ones), so every layer kind shares the same adapter algebra: the update in "adapter space" is
always ``B.flatten(1) @ A.flatten(1)``.

DoRA (``use_dora``) splits the adapted weight into a magnitude per output channel and a direction, as
PEFT does: ``W' = m * (W + ΔW) / ||W + ΔW||`` row-wise (the norm treated as a constant in the backward
pass), so the adapter adds ``(m/||W + ΔW|| - 1) * W x + m/||W + ΔW|| * ΔW x`` to the base output.

A quantized base layer (bitsandbytes' `Linear4bit` / `Linear8bitLt`, see `loraforge.quant`) is wrapped
like a linear layer; wherever its weight is read as a matrix (DoRA's norm, PiSSA) it is dequantized,
and merging into it in place is refused (`LoraModel.merge_and_unload` writes dequantized layers).

Mixed batches (a different adapter per row, as in S-LoRA / Punica) gather each row's A and B from
stacked, zero-padded weights and run two batched matmuls, so adapters of different ranks share one
pass and the cost does not grow with the number of adapters in the batch.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.errors import UserError
from loraforge.kernels import LoraUpdate
from loraforge.quant import (
    avoid_broken_cpu_repack,
    dequantize_weight,
    is_quantized,
    repacked_for_cpu_inference,
    reusing_linear,
)


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D` (a linear layer whose weight is stored (in, out))."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
    )


def float_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype adapter tensors get beside this base weight: float32 unless the base is float64."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Embedding) or is_gpt2_conv1d(module)


class LoraLayer(nn.Module):
    """Base class: adapter bookkeeping, merging and the shared forward.

    Subclasses say how x meets A and B (`_lora_forward`), how the adapter-space update maps onto the
    base weight (`_to_base_weight`), and how rows of a mixed batch are computed (`_add_mixed`, or
    just the update in `_mixed_forward`).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        # DoRA adapters only: the magnitude of each output channel, (out,).
        self.lora_magnitude_vector = nn.ParameterDict()
        self.quantized = is_quantized(base_layer)
        if self.quantized:
            avoid_broken_cpu_repack(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active: list[tuple[str, float]] = []  # (adapter, user weight) applied in forward
        self.merged: dict[str, float] = {}  # adapter -> weight it was merged with
        self._dora_factors: dict[str, torch.Tensor] = {}  # merged DoRA adapter -> m / ||W + ΔW||
        self.disabled = False
        # Set by LoraModel for the duration of a mixed-batch forward.
        # Slots are the distinct mixes in the batch, each a tuple of (adapter, weight); batch_index gives
        # each row's slot.
        self.batch_slots: list[tuple[tuple[str, float], ...]] | None = None
        self.batch_index: torch.Tensor | None = None
        self._stack_cache: tuple | None = None

    # -- shapes, supplied by subclasses ------------------------------------------------------------
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.in_features, *self.kernel_size)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_features, r, *(1 for _ in self.kernel_size))

    # -- adapters ----------------------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init,
        use_rslora: bool,
        use_dora: bool = False,
    ):
        weight = self.base_weight()
        factory = dict(device=weight.device, dtype=float_dtype(weight))
        if use_dora and not self.dora_supported:
            raise UserError(
                f"DoRA (use_dora=True) is not supported on {type(self.base_layer).__name__} layers"
            )
        self.lora_A[name] = nn.Parameter(torch.empty(self.a_shape(r), **factory))
        self.lora_B[name] = nn.Parameter(torch.empty(self.b_shape(r), **factory))
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(torch.empty(self.out_features, **factory))
        self._stack_cache = None
        if weight.device.type != "meta":
            self.reset_adapter(name, init)

    @torch.no_grad()
    def reset_adapter(self, name: str, init):
        A, B = self.lora_A[name], self.lora_B[name]
        if init == "pissa":
            self._pissa_init(name)
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[name])
        else:
            # The same initialisation nn.Linear uses for its weight, as in the LoRA paper's code.
            nn.init.kaiming_uniform_(A.view(A.shape[0], -1), a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B.view(B.shape[0], -1), a=math.sqrt(5))
        elif init != "pissa":
            nn.init.zeros_(B)
        if name in self.lora_magnitude_vector:
            # DoRA starts at the adapted weight's own row norms: the layer's output is unchanged.
            self.lora_magnitude_vector[name].copy_(self.weight_norm(name))

    def _pissa_init(self, name: str):
        raise UserError(
            f"init_lora_weights='pissa' supports linear layers only, not {type(self.base_layer).__name__}"
        )

    def delete_adapter(self, name: str):
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before deleting")
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for store in (self.r, self.lora_alpha, self.scaling):
            del store[name]
        self.active = [(n, w) for n, w in self.active if n != name]
        self._stack_cache = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight tensor as stored (packed integers for a quantized layer)."""
        return self.base_layer.weight

    def weight_matrix(self) -> torch.Tensor:
        """The base weight in adapter space, (out, in * prod(kernel)), as floats (dequantized for a
        quantized layer). The tensor itself for a float32 layer that is not transposed: do not modify."""
        if self.quantized:
            return dequantize_weight(self.base_layer, torch.float32)
        return self._from_base_weight(self.base_weight())

    def _from_base_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `_to_base_weight`: a weight-shaped tensor in adapter space."""
        return weight.reshape(self.out_features, -1)

    # -- DoRA --------------------------------------------------------------------------------------

    dora_supported = True

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    @torch.no_grad()
    def weight_norm(self, name: str, W0: torch.Tensor | None = None) -> torch.Tensor:
        """||W + ΔW|| per output channel, (out,), W the unmerged base weight (default: the current one,
        right while nothing is merged). No gradient flows through it (DoRA paper, section 4.3)."""
        W = self.unmerged_matrix() if W0 is None else W0
        A = self.lora_A[name]
        return torch.linalg.norm(W.to(A.dtype) + self.delta(name), dim=1)

    def dora_factor(self, name: str, W0: torch.Tensor | None = None) -> torch.Tensor:
        """m / ||W + ΔW||, (out,): what DoRA multiplies the adapted weight's rows by."""
        return self.lora_magnitude_vector[name] / self.weight_norm(name, W0)

    # -- merging -----------------------------------------------------------------------------------

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's update in adapter space, (out, in * prod(kernel)), scaling included."""
        A, B = self.lora_A[name], self.lora_B[name]
        return (B.flatten(1) @ A.flatten(1)) * self.scaling[name]

    def delta_weight(self, name: str, weight: float = 1.0) -> torch.Tensor:
        """The update as it adds onto the base layer's weight tensor."""
        return self._to_base_weight(self.delta(name) * weight)

    def _to_base_weight(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(self.base_weight().shape)

    def _check_mergeable(self):
        if self.quantized:
            raise UserError(
                f"cannot merge into a quantized {type(self.base_layer).__name__} in place: the sum would be "
                "re-quantized and the update mostly lost. Use merge_and_unload(), which writes dequantized "
                "full-precision layers, or load the adapter on the full-precision base"
            )

    @torch.no_grad()
    def merge(self, adapters: list[tuple[str, float]]):
        """Adds the adapters' updates into the base weight. A DoRA adapter at weight w adds
        ``w * (f * (W + ΔW) - W)`` with ``f = m / ||W + ΔW||`` row-wise, W the unmerged weight."""
        todo = [(n, w) for n, w in adapters if n in self.lora_A and n not in self.merged]
        if not todo:
            return
        self._check_mergeable()
        weight = self.base_weight()
        for name, w in todo:
            if self.is_dora(name):
                W0 = self.unmerged_matrix()
                f = self.dora_factor(name, W0)
                update = ((f - 1)[:, None] * W0 + f[:, None] * self.delta(name)) * w
                weight += self._to_base_weight(update).to(weight.dtype)
                self._dora_factors[name] = f
            else:
                weight += self.delta_weight(name, w).to(weight.dtype)
            self.merged[name] = w

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        weight = self.base_weight()
        if self._dora_factors:
            weight.copy_(self._to_base_weight(self.unmerged_matrix()).to(weight.dtype))
        else:
            # Reverse order, and the very delta that was added, so merge/unmerge cycles do not drift.
            for name, w in reversed(list(self.merged.items())):
                weight -= self.delta_weight(name, w).to(weight.dtype)
        self.merged.clear()
        self._dora_factors.clear()

    def unmerged_matrix(self) -> torch.Tensor:
        """The base weight without the merged adapters, in adapter space. The merged weight is linear in
        it, ``W' = W * (1 + sum_dora w (f - 1)) + sum w ΔW'`` (ΔW' = f ΔW for DoRA) row-wise, so it is
        solved for exactly rather than replaying the merges."""
        current = self.weight_matrix()
        current = current.to(float_dtype(current))
        if not self.merged:
            return current
        gain = torch.ones(self.out_features, device=current.device, dtype=current.dtype)
        added = torch.zeros_like(current)
        for name, w in self.merged.items():
            delta = self.delta(name).to(current.dtype) * w
            if name in self._dora_factors:
                f = self._dora_factors[name].to(current.dtype)
                gain += w * (f - 1)
                delta = f[:, None] * delta
            added += delta
        return (current - added) / gain[:, None]

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self._base_forward(x, *args, **kwargs)
        if self.batch_index is not None:
            return self._add_mixed(x, self._base_forward(x, *args, **kwargs))
        adapters = [(name, weight) for name, weight in self.active if name not in self.merged]
        if torch.is_grad_enabled() and not any(self.is_dora(name) for name, _ in adapters):
            return self._adapters_then_base(x, adapters, *args, **kwargs)
        result = self._base_forward(x, *args, **kwargs)
        base = result
        if len(adapters) > 1 and self.lora_magnitude_vector:
            base = result.clone()  # DoRA reads the base output; other adapters may add into result in place
        for name, weight in adapters:
            if self.is_dora(name):
                result = self._dora_forward(x, name, weight, result, base)
            else:
                result = self._lora_forward(x, name, self.scaling[name] * weight, result)
        return result

    def _adapters_then_base(self, x, adapters, *args, **kwargs):
        """Training: the adapters' update first, the frozen base product last. Activation checkpointing
        recomputes a block in the backward pass only up to the last tensor its backward saved, and a
        frozen product saves (its weight, at most) before it runs: so a block's final projection (an
        MLP's down projection: a quarter of a Llama block's arithmetic), whose output no gradient
        needs, is not recomputed at all."""
        update = None
        for name, weight in adapters:
            part = self._lora_forward(x, name, self.scaling[name] * weight)
            update = part if update is None else update + part
        result, fresh = self._fresh_base_forward(x, *args, **kwargs)
        if update is None:
            return result
        update = update.to(result.dtype)
        return result.add_(update) if fresh else result + update  # in place: one allocation fewer

    def _base_forward(self, x, *args, **kwargs):
        return self._fresh_base_forward(x, *args, **kwargs)[0]

    def _fresh_base_forward(self, x, *args, **kwargs) -> tuple[torch.Tensor, bool]:
        """The base layer's output, and whether it is new memory that nothing else holds (so that an
        update may be added into it): a quantized base in CPU training reuses one dequantization
        buffer (`quant.reusing_linear`), and a plain `nn.Linear` without hooks (which could keep the
        output) returns a fresh tensor."""
        base = self.base_layer
        if self.quantized and not args and not kwargs:
            reused = reusing_linear(base, x)
            if reused is not None:
                return reused, True
        if (
            self.quantized
            and torch.is_grad_enabled()
            and x.requires_grad
            and repacked_for_cpu_inference(base)
        ):
            raise UserError(
                "a 4-bit layer was repacked by bitsandbytes for its CPU inference kernel (at an eval-mode "
                "forward), which has no backward pass: gradients through it would be silently wrong. "
                "Call loraforge.quant.keep_4bit_training_kernel(model) right after loading a model you "
                "will train (`loraforge train` does), or reload it"
            )
        hooked = base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook")
        return base(x, *args, **kwargs), type(base) is nn.Linear and not hooked

    def _dora_forward(self, x, name, weight, result, base):
        """`result` plus DoRA adapter `name`'s part at user weight `weight` (which scales the whole part:
        0 gives the base model): ``(f - 1) * W x + f * scale * B A x`` with f = m / ||W + ΔW||."""
        A = self.lora_A[name]
        f = self.dora_factor(name)
        if self.channels_first:
            f = f.view(1, -1, *([1] * (x.dim() - 2)))
        dropout = self.lora_dropout[name]
        h = x if x.dtype == A.dtype else x.to(A.dtype)
        if type(dropout) is nn.Identity or not self.training:
            plain = self._without_bias(base).to(A.dtype)
        else:
            h = dropout(h)
            plain = self._base_no_bias(h)  # as PEFT: W x on the dropped-out input
        lora = self._lora_forward(h, name, self.scaling[name], dropout=False)
        part = (f - 1) * plain + f * lora
        if weight != 1:
            part = part * weight
        return result + part.to(result.dtype)

    channels_first = False  # whether outputs are (batch, channels, ...) (convolutions)

    def _without_bias(self, out: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return out
        return out - (bias.view(-1, *([1] * (out.dim() - 2))) if self.channels_first else bias)

    def _base_no_bias(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - per layer kind
        raise NotImplementedError

    def _lora_forward(self, x, name, scale, result=None, dropout=True):  # pragma: no cover - abstract
        """`result` plus adapter `name`'s update ``scale·B A dropout(x)``; the update alone (in the adapter's
        dtype) when `result` is None."""
        raise NotImplementedError

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A.T and B.T of every batch slot stacked and zero-padded to the largest rank, (slots, in, r) and
        (slots, r, out) (for convolutions, A flattened); B carries scaling.

        A slot that mixes adapters concatenates their ranks: ``[w1 s1 B1 | w2 s2 B2] @ [A1; A2] =
        w1 s1 B1 A1 + w2 s2 B2 A2``, so a weighted mix costs one gathered product like a single adapter.
        The base slot ``()`` and adapters this layer does not have contribute zeros. Cached while no
        gradient is being recorded and no weight has changed.
        """
        slots = self.batch_slots
        cache = self._stack_cache
        # Checked on every forward of every layer, so it avoids the ParameterDict lookups: the cached
        # Parameter objects (replaced only by add/delete_adapter, which drop the cache) must still have
        # the same storage and version, i.e. no optimizer step, load or device move since.
        if cache is not None and cache[0] == slots and not torch.is_grad_enabled():
            if all(p._version == v and p.data_ptr() == d for p, v, d in cache[1]):
                return cache[2]
        members = [[(n, w) for n, w in mix if n in self.lora_A] for mix in slots]
        for part in members:
            for n, _ in part:
                if self.is_dora(n):
                    raise UserError(dora_mixed_error(n))
        names = list(dict.fromkeys(n for part in members for n, _ in part))
        params = [p for n in names for p in (self.lora_A[n], self.lora_B[n])]
        r_max = max([sum(self.r[n] for n, _ in part) for part in members], default=0) or 1
        if names:
            ref = self.lora_A[names[0]]
        else:
            weight = self.base_weight()
            ref = weight.new_empty((), dtype=float_dtype(weight))
        As, Bs = [], []
        for part in members:
            rank = sum(self.r[n] for n, _ in part)
            A = [self.lora_A[n].flatten(1) for n, _ in part] + [ref.new_zeros(r_max - rank, self.a_columns)]
            B = [self.lora_B[n].flatten(1) * (self.scaling[n] * w) for n, w in part]
            B.append(ref.new_zeros(self.out_features, r_max - rank))
            As.append(torch.cat(A).view(self.a_shape(r_max)))
            Bs.append(torch.cat(B, dim=1).view(self.b_shape(r_max)))
        # Stored transposed and contiguous, (slots, in, r) and (slots, r, out): each forward then gathers
        # its rows' weights with `index_select` on whole blocks, about 3x faster than fancy indexing.
        result = (torch.stack(As).transpose(1, 2).contiguous(), torch.stack(Bs).transpose(1, 2).contiguous())
        if not torch.is_grad_enabled():
            self._stack_cache = (list(slots), [(p, p._version, p.data_ptr()) for p in params], result)
        return result

    @property
    def a_columns(self) -> int:
        """Columns of A flattened to a matrix: in_features times the kernel's size."""
        return math.prod(self.a_shape(1))

    def _add_mixed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` plus each batch row's own adapter update."""
        return result + self._mixed_forward(x).to(result.dtype)

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Generic fallback for layer kinds without a gathered kernel: one pass per adapter per mix.
        out = None
        for slot, mix in enumerate(self.batch_slots):
            rows = (self.batch_index == slot).nonzero().flatten()
            if rows.numel() == 0:
                continue
            for name, weight in mix:
                if name not in self.lora_A:
                    continue
                if self.is_dora(name):
                    raise UserError(dora_mixed_error(name))
                part = self._lora_forward(x[rows], name, self.scaling[name] * weight)
                if out is None:
                    out = x.new_zeros((x.shape[0], *part.shape[1:]), dtype=part.dtype)
                out = out.index_add(0, rows, part)
        return out if out is not None else torch.zeros((), dtype=x.dtype, device=x.device)


def dora_mixed_error(name: str) -> str:
    return (
        f"adapter {name!r} is a DoRA adapter, which mixed-batch inference does not support (its update is "
        "not a low-rank product that can be gathered per row); run it on its own batches or merge it"
    )


def _may_add_in_place(result: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the LoRA update may be added into the base layer's output itself: only without autograd
    (the output is then a fresh tensor nobody else holds) and when a flat view of it exists."""
    return not torch.is_grad_enabled() and result.dtype == dtype and result.is_contiguous()


class _LastCast(threading.local):
    source = None  # weak reference to the tensor cast last
    version = -1  # its version counter then
    cast: torch.Tensor | None = None


_LAST_CAST = _LastCast()


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the adapter's dtype. While autograd records, the last cast is reused for the same,
    unmodified tensor: the q, k and v projections (gate and up) read one input, which a bf16 or
    quantized base with a float32 adapter would otherwise copy three (two) times forward and again
    backward; the gradients of a shared cast add up in float32 and are cast back once."""
    if x.dtype == dtype:
        return x
    if not torch.is_grad_enabled():
        return x.to(dtype)
    last = _LAST_CAST
    if (
        last.cast is not None
        and last.cast.dtype == dtype
        and last.source() is x
        and last.version == x._version
    ):
        return last.cast
    cast = x.to(dtype)
    last.source, last.version, last.cast = weakref.ref(x), x._version, cast
    return cast


class LoraLinear(LoraLayer):
    """LoRA on `nn.Linear`, or on transformers' GPT-2 `Conv1D` (weight stored (in, out))."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_gpt2_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def _to_base_weight(self, delta):
        return delta.T if self.fan_in_fan_out else delta

    def _from_base_weight(self, weight):
        return weight.T if self.fan_in_fan_out else weight

    def _base_no_bias(self, h):
        return F.linear(h, self.weight_matrix().to(h.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = None if args or kwargs else self.fused_args(x, dropout_ok=True)
        if fused is None:
            return super().forward(x, *args, **kwargs)
        weight, bias, A, B, scale = fused
        dropout = self.lora_dropout[self.active[0][0]]
        h = x if type(dropout) is nn.Identity else dropout(x)
        update = LoraUpdate.apply(h.reshape(-1, self.in_features), A, B, scale, bias)
        # The frozen product last (why: `_adapters_then_base`), added into the update's own memory.
        update.addmm_(x.reshape(-1, self.in_features), weight.T)
        return update.view(*x.shape[:-1], self.out_features)

    def fused_args(self, x: torch.Tensor, dropout_ok: bool = False) -> tuple | None:
        """(W, b, A, B, scale) for the fused training kernels (`loraforge.kernels`), or None where they do
        not apply: they need autograd on, a plain frozen `nn.Linear` without hooks, one unmerged
        adapter (without dropout unless `dropout_ok`), and one dtype throughout (no autocast)."""
        if (
            not torch.is_grad_enabled()
            or len(self.active) != 1
            or self.disabled
            or self.batch_index is not None
        ):
            return None
        name, weight = self.active[0]
        base = self.base_layer
        if (
            type(base) is not nn.Linear
            or name in self.merged
            or self.is_dora(name)
            or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            or base._forward_hooks
            or base._forward_pre_hooks
            or hasattr(base, "_hf_hook")
            or (not dropout_ok and type(self.lora_dropout[name]) is not nn.Identity)
            or torch.is_autocast_enabled(x.device.type)
            or not (x.dtype == base.weight.dtype == self.lora_A[name].dtype)
        ):
            return None
        return base.weight, base.bias, self.lora_A[name], self.lora_B[name], self.scaling[name] * weight

    def _lora_forward(self, x, name, scale, result=None, dropout=True):
        A, B = self.lora_A[name], self.lora_B[name]
        h = adapter_input(x, A.dtype)
        if dropout and type(self.lora_dropout[name]) is not nn.Identity:  # p = 0: skip a module call
            h = self.lora_dropout[name](h)
        if isinstance(result, torch.Tensor) and result.dtype == A.dtype:
            # One fused multiply-add of the rank-r product into the base output (no extra kernels for
            # scaling and addition, no copy of x). Without autograd it adds in place: the base output
            # is a fresh tensor, and copying it would cost as much as the rank-r product itself.
            xa = h.reshape(-1, self.in_features) @ A.T
            if _may_add_in_place(result, A.dtype) and not self.quantized:  # bitsandbytes may reuse outputs
                result.view(-1, self.out_features).addmm_(xa, B.T, alpha=scale)
                return result
            flat = result.reshape(-1, self.out_features)
            return torch.addmm(flat, xa, B.T, alpha=scale).view(result.shape)
        # The scale goes on the rank-r product: on the (tokens x out) one it would cost a pass and a
        # full-size temporary, forward and backward.
        update = ((h @ A.T) * scale) @ B.T
        return update if result is None else result + update.to(result.dtype)

    def _add_mixed(self, x, result):
        A_T, B_T = self.stacked()  # (slots, in, r), (slots, r, out)
        idx = self.batch_index
        h = x.to(A_T.dtype).reshape(x.shape[0], -1, self.in_features)  # (rows, tokens, in)
        # Dropout is a training-time regulariser; mixed batches are for serving, so it is not applied.
        xa = torch.bmm(h, A_T.index_select(0, idx))  # (rows, tokens, r)
        B_rows = B_T.index_select(0, idx)  # (rows, r, out)
        if _may_add_in_place(result, A_T.dtype) and not self.quantized:
            result.view(x.shape[0], -1, self.out_features).baddbmm_(xa, B_rows)
            return result
        return result + torch.bmm(xa, B_rows).view(result.shape).to(result.dtype)

    def _pissa_init(self, name):
        # PiSSA: the adapter starts as the top-r singular directions of W, and W keeps the residual,
        # so the model's output is unchanged at step 0 but training moves the principal components.
        if self.quantized:
            raise UserError(
                "init_lora_weights='pissa' needs the full-precision base: it moves the top singular directions "
                "out of W, which a quantized weight cannot take back without re-quantizing. Initialise on the "
                "full-precision base, then quantize the residual model"
            )
        weight = self.base_weight()
        W = self._from_base_weight(weight.float())  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r, s = self.r[name], self.scaling[name]
        root = S[:r].sqrt()
        self.lora_A[name].copy_(root[:, None] * Vh[:r] / math.sqrt(s))
        self.lora_B[name].copy_(U[:, :r] * root[None, :] / math.sqrt(s))
        weight.copy_(weight - self.delta_weight(name).to(weight.dtype))


class LoraConv(LoraLayer):
    """LoRA on `nn.Conv1d` / `nn.Conv2d`: A is a conv with the base's kernel and stride, B a 1x1 conv."""

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d):
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise UserError("LoRA on grouped convolutions is not supported")
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.kernel_size = tuple(base_layer.kernel_size)
        self._conv = F.conv2d if isinstance(base_layer, nn.Conv2d) else F.conv1d

    channels_first = True

    def _padded(self, x):
        conv = self.base_layer
        if conv.padding_mode != "zeros":
            return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
        return x, conv.padding

    def _base_no_bias(self, h):
        conv = self.base_layer
        h, padding = self._padded(h)
        return self._conv(h, self.base_weight().to(h.dtype), None, conv.stride, padding, conv.dilation)

    def _lora_forward(self, x, name, scale, result=None, dropout=True):
        A, B = self.lora_A[name], self.lora_B[name]
        conv = self.base_layer
        x, padding = self._padded(x)
        h = x.to(A.dtype)
        if dropout:
            h = self.lora_dropout[name](h)
        h = self._conv(h, A, None, conv.stride, padding, conv.dilation)
        out = self._conv(h, B) * scale
        return out if result is None else result + out.to(result.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on `nn.Embedding`: A is (r, num_embeddings) looked up by token id, B is (embedding_dim, r)."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    dora_supported = False

    def _to_base_weight(self, delta):
        return delta.T

    def _from_base_weight(self, weight):
        return weight.T

    def _lookup(self, ids, A_T):
        e = self.base_layer
        return F.embedding(ids, A_T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)

    def _lora_forward(self, x, name, scale, result=None, dropout=True):
        # No dropout on token ids; PEFT does the same for embeddings.
        A, B = self.lora_A[name], self.lora_B[name]
        out = self._lookup(x, A.T) @ B.T * scale
        return out if result is None else result + out.to(result.dtype)

    def _mixed_forward(self, x):
        A_T, B_T = self.stacked()  # (slots, vocab, r), (slots, r, dim)
        idx = self.batch_index
        rows = idx.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
        h = A_T[rows, x]  # each token's column of its row's A: (..., r)
        out = torch.bmm(h.reshape(x.shape[0], -1, h.shape[-1]), B_T.index_select(0, idx))
        return out.view(*x.shape, self.out_features)


def wrap(module: nn.Module) -> LoraLayer:
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return LoraConv(module)
    return LoraLinear(module)


class TrainableCopy(nn.Module):
    """A module trained in full (PEFT's `modules_to_save`): one copy per adapter, the original kept.

    In a mixed batch each row goes through the copy of the first adapter of its mix that has one (at
    full strength, as `LoraModel.set_adapters` does: a copied module has no low-rank update to scale),
    else through the original."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.batch_slots: list[tuple[tuple[str, float], ...]] | None = None  # set by LoraModel, as LoraLayer
        self.batch_index: torch.Tensor | None = None

    def add_adapter(self, name: str):
        import copy

        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str):
        del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def forward(self, *args, **kwargs):
        if self.batch_index is not None and not self.disabled:
            return self._mixed_forward(*args, **kwargs)
        if self.disabled or self.active not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)

    def _row_module(self, mix) -> nn.Module:
        name = next((n for n, _ in mix if n in self.modules_to_save), None)
        return self.original_module if name is None else self.modules_to_save[name]

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        modules = [self._row_module(mix) for mix in self.batch_slots]
        if all(m is modules[0] for m in modules):
            return modules[0](x, *args, **kwargs)
        out = None
        for slot, module in enumerate(modules):
            rows = (self.batch_index == slot).nonzero().flatten()
            if rows.numel() == 0:
                continue
            part = module(x[rows], *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[rows] = part
        return out
