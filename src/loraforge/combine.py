"""Adapter algebra: a new adapter from a weighted combination of existing ones.

Methods (`combination_type`):
    cat          exact: stack the ranks, new r = sum of ranks; delta = sum_i w_i * delta_i.
    linear       PEFT's cheap mix for equal ranks: A = sum sqrt(|w_i| s_i) A_i, B = sum sign(w_i) sqrt(|w_i| s_i) B_i.
                 Not exact (cross terms B_i A_j appear), but keeps the rank.
    svd          exact weighted sum of the full deltas, truncated to `svd_rank` by SVD.
    ties         TIES-merging on the full deltas (trim to `density`, elect sign, disjoint mean), then SVD.
    dare_linear  DARE on the full deltas (random drop with keep prob `density`, rescale), weighted sum, SVD.

Every new adapter gets lora_alpha = r, i.e. scaling 1, with the old scalings folded into its weights.
"""

from __future__ import annotations

import copy

import torch

from loraforge.config import LoraConfig
from loraforge.errors import UserError
from loraforge.layers import LoraLayer

METHODS = ("cat", "linear", "svd", "ties", "dare_linear")


def add_weighted_adapter(
    model,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
) -> None:
    if combination_type not in METHODS:
        raise UserError(f"combination_type must be one of {METHODS}, got {combination_type!r}")
    if len(adapters) != len(weights) or not adapters:
        raise UserError(
            f"add_weighted_adapter needs one weight per adapter (got {len(adapters)} adapters, {len(weights)} weights)"
        )
    for name in adapters:
        model._check_exists(name)
    if adapter_name in model.peft_config:
        raise UserError(f"an adapter named {adapter_name!r} already exists")
    if not 0 < density <= 1:
        raise UserError(f"density must be in (0, 1], got {density}")
    layers = [
        (n, m)
        for n, m in model.model.named_modules()
        if isinstance(m, LoraLayer) and any(a in m.lora_A for a in adapters)
    ]
    if any(m.merged for _, m in layers):
        raise RuntimeError("unmerge adapters before combining them")
    dora = [a for a in adapters if model.peft_config[a].use_dora]
    if dora:
        raise UserError(
            f"add_weighted_adapter is not defined for DoRA adapters ({', '.join(dora)}): a DoRA layer rescales "
            "each output channel of W + ΔW by its own magnitude, so a weighted mix of DoRA adapters is not "
            "another DoRA adapter (nor a LoRA one). Merge them into the base instead"
        )
    if combination_type == "linear":
        ranks = {m.r[a] for _, m in layers for a in adapters if a in m.lora_A}
        if len(ranks) > 1:
            raise UserError(
                f"combination_type='linear' needs adapters of one rank, got ranks {sorted(ranks)}; use 'cat' or 'svd'"
            )
    generator = torch.Generator().manual_seed(seed)

    new_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for name, layer in layers:
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
            if combination_type == "cat":
                A = torch.cat([layer.lora_A[a] for a, _ in present], 0)
                B = torch.cat([layer.lora_B[a] * (w * layer.scaling[a]) for a, w in present], 1)
            elif combination_type == "linear":
                A = sum(layer.lora_A[a] * (abs(w) * layer.scaling[a]) ** 0.5 for a, w in present)
                B = sum(
                    layer.lora_B[a] * (abs(w) * layer.scaling[a]) ** 0.5 * (1 if w >= 0 else -1)
                    for a, w in present
                )
            else:
                deltas = [layer.delta(a).float() * w for a, w in present]
                if combination_type == "ties":
                    delta = _ties(deltas, density)
                elif combination_type == "dare_linear":
                    delta = sum(_dare(d, density, generator) for d in deltas)
                else:
                    delta = sum(deltas)
                rank = svd_rank or max(layer.r[a] for a in adapters if a in layer.lora_A)
                A, B = _low_rank(delta, rank, layer)
            new_tensors[name] = (A, B)

    ranks = {name: A.shape[0] for name, (A, _) in new_tensors.items()}
    r = max(ranks.values())
    base = model.peft_config[adapters[0]]
    config = copy.deepcopy(base)
    config.r, config.lora_alpha = r, r
    config.rank_pattern = {name: k for name, k in ranks.items() if k != r}
    config.alpha_pattern = dict(config.rank_pattern)
    config.target_modules = sorted(new_tensors)
    config.layers_to_transform = config.layers_pattern = None
    config.exclude_modules = None
    config.use_rslora = False
    config.init_lora_weights = True
    config.modules_to_save = None
    model.add_adapter(adapter_name, LoraConfig.from_dict(config.to_dict()))
    with torch.no_grad():
        for name, (A, B) in new_tensors.items():
            layer = model.model.get_submodule(name)
            layer.lora_A[adapter_name].copy_(A)
            layer.lora_B[adapter_name].copy_(B)


def _low_rank(delta: torch.Tensor, rank: int, layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of `delta` (out, in*k): B = U * S, A = Vh."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, S.numel())
    B = (U[:, :rank] * S[:rank]).reshape(layer.b_shape(rank))
    A = Vh[:rank].reshape(layer.a_shape(rank))
    return A, B


def _ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    trimmed = []
    for d in deltas:
        k = max(1, int(density * d.numel()))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (stacked * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    # Disjoint mean over the adapters that agree with the elected sign; the user's weights were
    # applied before trimming, so an adapter's strength still counts.
    return total / count


def _dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))
