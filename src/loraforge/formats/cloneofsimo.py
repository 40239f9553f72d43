"""cloneofsimo/lora ("lora_diffusion") files, e.g. ``final_lora.safetensors`` from its pivotal-tuning
trainer ``lora_pti`` (which the Lilypad LoRA module runs).

The file does not name modules; it numbers them::

    unet:0:up  unet:0:down  unet:1:up ...                 (up: (out, r), down: (r, in); fp16)
    text_encoder:0:up ...
    <s1>  <s2>                                            learned token vectors, (dim,)
    __metadata__:
        "unet": '["CrossAttention", "Attention", "GEGLU"]'   classes whose layers were adapted
        "text_encoder": '["CLIPAttention"]'
        "unet:0:rank": "4", ...
        "<s1>": "<embed>"                                     marks a token entry

Module i is the i-th ``nn.Linear`` (``nn.Conv2d`` too, when the trainer adapted convolutions) found
by walking the model's modules in registration order and, inside each module whose class name is
listed, its sub-modules in order: that is how lora_diffusion assigned the numbers. The up matrix
already carries the scale, so alpha = r. Shapes are checked against the model, so a file for another
base is an error, not a silent mismatch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from loraforge.errors import UserError
from loraforge.formats.image_lora import ImageLora, ModuleLora, canonical_name
from loraforge.formats.io import Header, load_tensors, save_tensors

EMBED_FLAG = "<embed>"


def _ordered_modules(
    model: nn.Module, ancestor_classes: set[str], kinds: tuple[type, ...]
) -> list[tuple[str, nn.Module]]:
    from loraforge.layers import LoraLayer

    found, seen = [], set()
    for ancestor_name, ancestor in model.named_modules():
        if type(ancestor).__name__ not in ancestor_classes:
            continue
        for sub_name, module in ancestor.named_modules():
            full = ".".join(n for n in (ancestor_name, sub_name) if n)
            if isinstance(module, LoraLayer):
                module = module.base_layer
            elif full.endswith(".base_layer") or ".lora_" in full:
                continue  # inside a loraforge wrapper: already counted as the wrapper
            if isinstance(module, kinds) and full not in seen:
                seen.add(full)
                found.append((full, module))
    return found


def read_cloneofsimo(path: str | Path, components: dict[str, nn.Module]) -> ImageLora:
    from safetensors import safe_open

    path = Path(path)
    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    lora = ImageLora(info={"source_format": "cloneofsimo"})
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        if meta.get(key) == EMBED_FLAG:
            lora.tokens.append(key)
            continue
        parts = key.split(":")
        if len(parts) != 3 or parts[2] not in ("up", "down") or not parts[1].isdigit():
            raise UserError(
                f"{path}: unrecognised key {key!r} (expected '<model>:<index>:up|down' or a token)"
            )
        groups.setdefault(parts[0], {}).setdefault(int(parts[1]), {})[parts[2]] = tensor
    for component, entries in groups.items():
        model = components.get(component)
        if model is None:
            raise UserError(f"{path} has LoRA weights for {component!r}, which this pipeline does not have")
        model = getattr(model, "model", model)  # a LoraModel's wrapped model
        try:
            classes = set(json.loads(meta[component]))
        except (KeyError, json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{path}: metadata lacks the target class list for {component!r}") from e
        indices = sorted(entries)
        if indices != list(range(len(indices))):
            raise UserError(f"{path}: {component} module numbers are not 0..{len(indices) - 1}")
        modules = _ordered_modules(model, classes, (nn.Linear,))
        if len(modules) != len(indices):
            with_conv = _ordered_modules(model, classes, (nn.Linear, nn.Conv2d))
            if len(with_conv) == len(indices):
                modules = with_conv
            else:
                raise UserError(
                    f"{path} does not fit this pipeline: {len(indices)} {component} LoRA modules in the file, "
                    f"{len(modules)} adaptable layers inside {sorted(classes)} in the model"
                )
        out = {}
        for i, (name, module) in zip(indices, modules):
            entry = entries[i]
            if "up" not in entry or "down" not in entry:
                raise UserError(f"{path}: {component}:{i} lacks its up or down weight")
            down, up = entry["down"], entry["up"]
            expected_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            expected_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            if down.shape[1] != expected_in or up.shape[0] != expected_out or up.shape[1] != down.shape[0]:
                raise UserError(
                    f"{path} does not fit this pipeline: {component}:{i} maps to {name} "
                    f"({expected_in}->{expected_out}) but has down {tuple(down.shape)}, up {tuple(up.shape)}"
                )
            rank = int(meta.get(f"{component}:{i}:rank", down.shape[0]))
            if rank != down.shape[0]:
                raise UserError(
                    f"{path}: {component}:{i} rank {rank} in the metadata, {down.shape[0]} in the weights"
                )
            out[canonical_name(component, model, name)] = ModuleLora(down=down, up=up, alpha=float(rank))
        lora.components[component] = out
    if lora.tokens:
        lora.embeddings = {"text_encoder": torch.stack([tensors[t].reshape(-1) for t in lora.tokens])}
    return lora


def save_cloneofsimo(
    path: str | Path, lora: ImageLora, components: dict[str, nn.Module], classes: dict[str, list[str]]
) -> Path:
    """Writes `lora` in lora_diffusion's numbering (used by tests to build files the way lora_pti did).

    `classes` gives each component's ancestor class list, e.g. ``{"unet": ["Attention", "GEGLU"]}``;
    every layer under them must have an update in `lora`."""
    tensors, meta = {}, {}
    for component, modules in lora.components.items():
        model = getattr(components[component], "model", components[component])
        meta[component] = json.dumps(classes[component])
        kinds = (nn.Linear, nn.Conv2d) if any(m.down.dim() == 4 for m in modules.values()) else (nn.Linear,)
        for i, (name, _) in enumerate(_ordered_modules(model, set(classes[component]), kinds)):
            m = modules[canonical_name(component, model, name)]
            scale = m.alpha / m.rank
            tensors[f"{component}:{i}:up"] = (m.up * scale).to(torch.float16)
            tensors[f"{component}:{i}:down"] = m.down.to(torch.float16)
            meta[f"{component}:{i}:rank"] = str(m.rank)
    for i, token in enumerate(lora.tokens):
        tensors[token] = lora.embeddings["text_encoder"][i]
        meta[token] = EMBED_FLAG
    path = Path(path)
    save_tensors(tensors, path, metadata=meta)
    return path


# The classes under which lora_diffusion's lora_pti puts LoRA on every nn.Linear (its defaults).
LORA_PTI_CLASSES = {"unet": ["CrossAttention", "Attention", "GEGLU"], "text_encoder": ["CLIPAttention"]}


def save_lora_pti(
    path: str | Path, lora: ImageLora, components: dict[str, nn.Module]
) -> dict[str, list[str]]:
    """Writes what of `lora` a lora_pti ``final_lora.safetensors`` can hold, so lora_diffusion's
    ``patch_pipe`` (Lilypad's inference module) reads it: for each component, the layers under each of
    lora_pti's classes (``Attention``, ``GEGLU``; ``CLIPAttention``) where every layer of that class is
    adapted, plus the learned tokens. Adapted layers elsewhere (convolutions, ``proj_in``...) have no
    place in such a file and are left out. Returns the classes written per component."""
    kept = ImageLora(tokens=list(lora.tokens), embeddings=dict(lora.embeddings))
    classes: dict[str, list[str]] = {}
    for component, modules in lora.components.items():
        if component not in LORA_PTI_CLASSES or component not in components:
            continue
        model = getattr(components[component], "model", components[component])
        chosen, names = [], []
        for cls in LORA_PTI_CLASSES[component]:
            layers = [
                canonical_name(component, model, n) for n, _ in _ordered_modules(model, {cls}, (nn.Linear,))
            ]
            if layers and all(n in modules and modules[n].down.dim() == 2 for n in layers):
                chosen.append(cls)
                names += layers
        if chosen:
            kept.components[component] = {n: modules[n] for n in names}
            classes[component] = chosen
    if kept.tokens and "text_encoder" not in kept.embeddings:
        kept.tokens, kept.embeddings = [], {}
    save_cloneofsimo(path, kept, components, classes)
    return classes


# -- detection and inspection ----------------------------------------------------------------------

_KEY = re.compile(r"^[A-Za-z_]\w*:\d+:(up|down)$")


def detect(header: Header) -> bool:
    """A lora_diffusion file: numbered ``<model>:<i>:up|down`` keys (or only tokens flagged ``<embed>``)."""
    keys = header.keys
    if any(_KEY.match(k) for k in keys):
        return True
    return bool(keys) and all(header.metadata.get(k) == EMBED_FLAG for k in keys)


def header_modules(header: Header) -> dict[str, int]:
    """``<model>:<i>`` -> rank (the metadata's, else the down matrix's first dimension)."""
    out = {}
    for key, shape in header.shapes.items():
        if _KEY.match(key) and key.endswith(":down"):
            module = key[: -len(":down")]
            out[module] = int(header.metadata.get(f"{module}:rank", shape[0]))
    return out


def header_tokens(header: Header) -> list[str]:
    return [k for k in header.keys if header.metadata.get(k) == EMBED_FLAG]


def header_classes(header: Header) -> list[str]:
    """The class names whose layers were adapted, over all components (from the metadata)."""
    classes = set()
    for component in {k.split(":")[0] for k in header.keys if _KEY.match(k)}:
        try:
            classes.update(json.loads(header.metadata.get(component, "[]")))
        except (json.JSONDecodeError, TypeError):
            continue
    return sorted(classes)
