"""LoRA layers: a frozen base layer plus any number of named low-rank adapters.

Each wrapper computes ``base(x) + sum_i weight_i * scaling_i * B_i(A_i(dropout(x)))`` where
``scaling_i = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA). Adapter weights are kept as
plain parameters, ``lora_A[name]`` of shape (r, in, *kernel) and ``lora_B[name]`` of shape
(out, r, *ones), so every layer kind shares the same adapter algebra: the update in "adapter space" is
always ``B.flatten(1) @ A.flatten(1)``.

Mixed batches (a different adapter per row, as in S-LoRA / Punica) gather each row's A and B from
stacked, zero-padded weights and run two batched matmuls, so adapters of different ranks share one
pass and the cost does not grow with the number of adapters in the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.errors import UserError
from loraforge.kernels import LinearWithLora


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D` (a linear layer whose weight is stored (in, out))."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
    )


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
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active: list[tuple[str, float]] = []  # (adapter, user weight) applied in forward
        self.merged: dict[str, float] = {}  # adapter -> weight it was merged with
        self.disabled = False
        # Set by LoraModel for the duration of a mixed-batch forward.
        self.batch_slots: list[str | None] | None = None
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

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float, init, use_rslora: bool):
        weight = self.base_weight()
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        factory = dict(device=weight.device, dtype=dtype)
        self.lora_A[name] = nn.Parameter(torch.empty(self.a_shape(r), **factory))
        self.lora_B[name] = nn.Parameter(torch.empty(self.b_shape(r), **factory))
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._stack_cache = None
        if weight.device.type != "meta":
            self.reset_adapter(name, init)

    @torch.no_grad()
    def reset_adapter(self, name: str, init):
        A, B = self.lora_A[name], self.lora_B[name]
        if init == "pissa":
            self._pissa_init(name)
            return
        if init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[name])
        else:
            # The same initialisation nn.Linear uses for its weight, as in the LoRA paper's code.
            nn.init.kaiming_uniform_(A.view(A.shape[0], -1), a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B.view(B.shape[0], -1), a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    def _pissa_init(self, name: str):
        raise UserError(
            f"init_lora_weights='pissa' supports linear layers only, not {type(self.base_layer).__name__}"
        )

    def delete_adapter(self, name: str):
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before deleting")
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        for store in (self.r, self.lora_alpha, self.scaling):
            del store[name]
        self.active = [(n, w) for n, w in self.active if n != name]
        self._stack_cache = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

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

    @torch.no_grad()
    def merge(self, adapters: list[tuple[str, float]]):
        weight = self.base_weight()
        for name, w in adapters:
            if name in self.lora_A and name not in self.merged:
                weight += self.delta_weight(name, w).to(weight.dtype)
                self.merged[name] = w

    @torch.no_grad()
    def unmerge(self):
        weight = self.base_weight()
        # Reverse order, and the very delta that was added, so merge/unmerge cycles do not drift.
        for name, w in reversed(list(self.merged.items())):
            weight -= self.delta_weight(name, w).to(weight.dtype)
        self.merged.clear()

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.batch_index is not None:
            return self._add_mixed(x, result)
        for name, weight in self.active:
            if name not in self.merged:
                result = self._lora_forward(x, name, self.scaling[name] * weight, result)
        return result

    def _lora_forward(self, x, name, scale, result):  # pragma: no cover - abstract
        raise NotImplementedError

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of every batch slot stacked and zero-padded to the largest rank; B carries scaling.

        Slot ``None`` (the base model) and adapters this layer does not have are all-zero. Cached
        while no gradient is being recorded and no weight has changed.
        """
        slots = self.batch_slots
        cache = self._stack_cache
        # Checked on every forward of every layer, so it avoids the ParameterDict lookups: the cached
        # Parameter objects (replaced only by add/delete_adapter, which drop the cache) must still have
        # the same storage and version, i.e. no optimizer step, load or device move since.
        if cache is not None and cache[0] == slots and not torch.is_grad_enabled():
            if all(p._version == v and p.data_ptr() == d for p, v, d in cache[1]):
                return cache[2]
        params = [p for n in slots if n in self.lora_A for p in (self.lora_A[n], self.lora_B[n])]
        r_max = max([self.r[n] for n in slots if n in self.lora_A], default=1)
        ref = self.lora_A[next(n for n in slots if n in self.lora_A)] if params else self.base_weight()
        A = ref.new_zeros((len(slots), *self.a_shape(r_max)))
        B = ref.new_zeros((len(slots), *self.b_shape(r_max)))
        As, Bs = [], []
        for i, n in enumerate(slots):
            if n in self.lora_A:
                As.append(
                    F.pad(self.lora_A[n].flatten(1), (0, 0, 0, r_max - self.r[n])).view(self.a_shape(r_max))
                )
                Bs.append(
                    F.pad(self.lora_B[n].flatten(1) * self.scaling[n], (0, r_max - self.r[n])).view(
                        self.b_shape(r_max)
                    )
                )
            else:
                As.append(A[i])
                Bs.append(B[i])
        result = (torch.stack(As), torch.stack(Bs))
        if not torch.is_grad_enabled():
            self._stack_cache = (list(slots), [(p, p._version, p.data_ptr()) for p in params], result)
        return result

    def _add_mixed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` plus each batch row's own adapter update."""
        return result + self._mixed_forward(x).to(result.dtype)

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Generic fallback for layer kinds without a gathered kernel: one pass per distinct adapter.
        out = None
        for slot, name in enumerate(self.batch_slots):
            rows = (self.batch_index == slot).nonzero().flatten()
            if name not in self.lora_A or rows.numel() == 0:
                continue
            part = self._lora_forward(x[rows], name, self.scaling[name], 0)
            if out is None:
                out = x.new_zeros((x.shape[0], *part.shape[1:]), dtype=part.dtype)
            out = out.index_add(0, rows, part)
        return out if out is not None else torch.zeros((), dtype=x.dtype, device=x.device)


def _may_add_in_place(result: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the LoRA update may be added into the base layer's output itself: only without autograd
    (the output is then a fresh tensor nobody else holds) and when a flat view of it exists."""
    return not torch.is_grad_enabled() and result.dtype == dtype and result.is_contiguous()


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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = None if args or kwargs else self.fused_args(x, dropout_ok=True)
        if fused is None:
            return super().forward(x, *args, **kwargs)
        dropout = self.lora_dropout[self.active[0][0]]
        h = None if type(dropout) is nn.Identity else dropout(x)
        return LinearWithLora.apply(x, h, *fused)

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

    def _lora_forward(self, x, name, scale, result):
        A, B = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        h = x if x.dtype == A.dtype else x.to(A.dtype)
        if type(dropout) is not nn.Identity:  # p = 0 is the common case: skip a module call per layer
            h = dropout(h)
        if isinstance(result, torch.Tensor) and result.dtype == A.dtype:
            # One fused multiply-add of the rank-r product into the base output (no extra kernels for
            # scaling and addition, no copy of x). Without autograd it adds in place: the base output
            # is a fresh tensor, and copying it would cost as much as the rank-r product itself.
            xa = h.reshape(-1, self.in_features) @ A.T
            if _may_add_in_place(result, A.dtype):
                result.view(-1, self.out_features).addmm_(xa, B.T, alpha=scale)
                return result
            flat = result.reshape(-1, self.out_features)
            return torch.addmm(flat, xa, B.T, alpha=scale).view(result.shape)
        return result + ((h @ A.T) @ B.T * scale).to(
            result.dtype if isinstance(result, torch.Tensor) else B.dtype
        )

    def _add_mixed(self, x, result):
        A, B = self.stacked()  # (slots, r, in), (slots, out, r)
        idx = self.batch_index
        h = x.to(A.dtype).reshape(x.shape[0], -1, self.in_features)
        # Dropout is a training-time regulariser; mixed batches are for serving, so it is not applied.
        xa, Bt = torch.bmm(h, A[idx].transpose(1, 2)), B[idx].transpose(1, 2)
        if _may_add_in_place(result, A.dtype):
            result.view(x.shape[0], -1, self.out_features).baddbmm_(xa, Bt)
            return result
        return result + torch.bmm(xa, Bt).view(result.shape).to(result.dtype)

    def _pissa_init(self, name):
        # PiSSA: the adapter starts as the top-r singular directions of W, and W keeps the residual,
        # so the model's output is unchanged at step 0 but training moves the principal components.
        weight = self.base_weight()
        W = self._to_base_weight(weight.float())  # (out, in)
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

    def _lora_forward(self, x, name, scale, result):
        A, B = self.lora_A[name], self.lora_B[name]
        conv = self.base_layer
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        h = self._conv(self.lora_dropout[name](x.to(A.dtype)), A, None, conv.stride, padding, conv.dilation)
        out = self._conv(h, B) * scale
        return result + (out.to(result.dtype) if isinstance(result, torch.Tensor) else out)


class LoraEmbedding(LoraLayer):
    """LoRA on `nn.Embedding`: A is (r, num_embeddings) looked up by token id, B is (embedding_dim, r)."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def _to_base_weight(self, delta):
        return delta.T

    def _lookup(self, ids, A_T):
        e = self.base_layer
        return F.embedding(ids, A_T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)

    def _lora_forward(self, x, name, scale, result):
        # No dropout on token ids; PEFT does the same for embeddings.
        A, B = self.lora_A[name], self.lora_B[name]
        out = self._lookup(x, A.T) @ B.T * scale
        return result + (out.to(result.dtype) if isinstance(result, torch.Tensor) else out)

    def _mixed_forward(self, x):
        A, B = self.stacked()  # (slots, r, vocab), (slots, dim, r)
        idx = self.batch_index
        rows = idx.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
        h = A.transpose(1, 2)[rows, x]  # each token's column of its row's A: (..., r)
        out = torch.bmm(h.reshape(x.shape[0], -1, h.shape[-1]), B[idx].transpose(1, 2))
        return out.view(*x.shape, self.out_features)


def wrap(module: nn.Module) -> LoraLayer:
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return LoraConv(module)
    return LoraLinear(module)


class TrainableCopy(nn.Module):
    """A module trained in full (PEFT's `modules_to_save`): one copy per adapter, the original kept."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add_adapter(self, name: str):
        import copy

        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str):
        del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def forward(self, *args, **kwargs):
        if self.disabled or self.active not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)
