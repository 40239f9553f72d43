"""Random image adapters for a pipeline (LoRA on UNet attention and convolutions, on the text encoder's
attention, learned tokens), written in a real file format, for the image engine's tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loraforge.formats import write_image_lora
from loraforge.formats.image_lora import ImageLora, ModuleLora, canonical_name
from loraforge.model import base_modules

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1")
TEXT_TARGETS = ("q_proj", "v_proj", "out_proj")


def random_lora(
    pipe,
    seed: int,
    tokens: tuple[str, ...] = (),
    unet: tuple[str, ...] = UNET_TARGETS,
    text: tuple[str, ...] = TEXT_TARGETS,
    rank: int = 4,
    strength: float = 0.5,
) -> ImageLora:
    """An ImageLora for `pipe` with random (seeded) matrices large enough to change the image."""
    g = torch.Generator().manual_seed(seed)
    lora = ImageLora()
    targets = {"unet": unet, "text_encoder": text}
    targets.update({"text_encoder_2": text} if getattr(pipe, "text_encoder_2", None) is not None else {})
    for component, suffixes in targets.items():
        model = getattr(pipe, component)
        modules = {}
        for name, m in base_modules(model):
            if not any(name == s or name.endswith("." + s) for s in suffixes):
                continue
            if isinstance(m, nn.Linear):
                down, up = (rank, m.in_features), (m.out_features, rank)
            elif isinstance(m, nn.Conv2d):
                down, up = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
            else:
                continue
            fan_in = down[1] * (down[2] * down[3] if len(down) == 4 else 1)
            modules[canonical_name(component, model, name)] = ModuleLora(
                down=torch.randn(down, generator=g) / fan_in**0.5,
                up=torch.randn(up, generator=g) * strength / rank**0.5,
                alpha=float(rank),
            )
        if modules:
            lora.components[component] = modules
    if tokens:
        lora.tokens = list(tokens)
        for component in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, component, None)
            if encoder is not None:
                dim = encoder.get_input_embeddings().weight.shape[1]
                lora.embeddings[component] = torch.randn((len(tokens), dim), generator=g) * 0.5
    return lora


def write_adapter(directory: Path, lora: ImageLora, format: str = "diffusers") -> Path:
    """Writes `lora` in `format`; returns the directory (what engines and `--adapter` take)."""
    write_image_lora(directory, lora, format)
    return directory
