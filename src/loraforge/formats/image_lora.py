"""Stable Diffusion adapters in a form independent of file format, and the bridge to `LoraModel`.

Every image adapter format (diffusers, kohya, cloneofsimo) reads into and writes from `ImageLora`:
per pipeline component (``unet``, ``text_encoder``, ``text_encoder_2``) a map from module path
(diffusers' names, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``) to the
module's down (A: ``(r, in, *kernel)``) and up (B: ``(out, r, *ones)``) matrices and its alpha (the
update is ``alpha / r * B @ A``), plus learned token embeddings (pivotal tuning) in token order.

`extract` takes an adapter off a `LoraModel` in this form and `apply` puts one on; both translate
module names between the model and files (`canonical_name` / `model_name`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from loraforge.config import LoraConfig
from loraforge.errors import UserError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


@dataclass
class ModuleLora:
    """One module's update: ``alpha / r * up @ down`` with r = down.shape[0]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class ImageLora:
    """A Stable Diffusion adapter, independent of file format."""

    components: dict[str, dict[str, ModuleLora]] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # component -> (len(tokens), dim)
    info: dict = field(default_factory=dict)

    def num_modules(self) -> int:
        return sum(len(m) for m in self.components.values())


# -- module names ---------------------------------------------------------------------------------
# transformers 5 flattened `CLIPTextModel` (its modules lost the `text_model.` prefix that
# `CLIPTextModelWithProjection` and every LoRA file in the wild still have). Files always use the
# prefixed ("canonical") names; they are translated to and from the model's own names here.

TEXT_MODEL_PREFIX = "text_model."


def _flat_text_model(component: str | None, model) -> bool:
    model = getattr(model, "model", model) if type(model).__name__ == "LoraModel" else model
    return (
        component in TEXT_COMPONENTS
        and type(model).__name__.startswith("CLIPText")
        and not hasattr(model, "text_model")
    )


def canonical_name(component: str | None, model, name: str) -> str:
    """The module path as files spell it."""
    if _flat_text_model(component, model) and not name.startswith(TEXT_MODEL_PREFIX):
        return TEXT_MODEL_PREFIX + name
    return name


def model_name(component: str | None, model, name: str) -> str:
    """The module path in this model for a name as files spell it."""
    if _flat_text_model(component, model) and name.startswith(TEXT_MODEL_PREFIX):
        return name[len(TEXT_MODEL_PREFIX) :]
    return name


# -- between LoraModel and ImageLora ----------------------------------------------------------------


def extract(lora_model, adapter_name: str, component: str | None = None) -> dict[str, ModuleLora]:
    """The adapter `adapter_name` of a `LoraModel` (pipeline component `component`) as ModuleLora
    entries under the names files use.

    The effective alpha is written (scaling x r), so rsLoRA adapters read back with the same scale."""
    from loraforge.layers import LoraEmbedding

    out = {}
    for name, layer in lora_model.adapter_layers(adapter_name):
        if isinstance(layer, LoraEmbedding):
            raise UserError(
                f"{name}: LoRA on embeddings has no Stable Diffusion file format; train token embeddings instead"
            )
        r = layer.r[adapter_name]
        out[canonical_name(component, lora_model, name)] = ModuleLora(
            down=layer.lora_A[adapter_name].detach(),
            up=layer.lora_B[adapter_name].detach(),
            alpha=float(layer.scaling[adapter_name] * r),
        )
    return out


def config_for(modules: dict[str, ModuleLora]) -> LoraConfig:
    """A LoraConfig selecting exactly these modules, with per-module ranks and alphas."""
    if not modules:
        raise UserError("an adapter component with no modules")
    ranks = {n: m.rank for n, m in modules.items()}
    alphas = {n: float(m.alpha) for n, m in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
    )


def apply(
    lora_model,
    adapter_name: str,
    modules: dict[str, ModuleLora],
    where: str = "adapter",
    component: str | None = None,
) -> None:
    """Adds `modules` (named as files spell them) to a `LoraModel` (pipeline component `component`) as
    adapter `adapter_name` (not active). Everything is checked before the model changes (see
    `LoraModel.add_adapter_with_weights`)."""
    modules = {model_name(component, lora_model, n): m for n, m in modules.items()}
    lora_model.add_adapter_with_weights(
        adapter_name, config_for(modules), {n: (m.down, m.up) for n, m in modules.items()}, where=where
    )
