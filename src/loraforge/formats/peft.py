"""PEFT's adapter files: `adapter_config.json` + `adapter_model.safetensors`.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
``.lora_embedding_A`` / ``.lora_embedding_B``, stored without ``.weight``); a DoRA adapter adds
``<module path>.lora_magnitude_vector`` (out,) (a convolution's is (1, out, 1, ...)); trained copies of
`modules_to_save` are stored under the module's own path, e.g. ``base_model.model.score.weight``;
trained biases (``bias="lora_only"``/``"all"``) under the parameter's path in a PEFT model, so an
adapted layer's bias is ``base_model.model.<module path>.base_layer.bias`` (``<module path>.bias`` is
read too: older loraforge versions wrote it so).
The adapter name never appears in a key: one file holds one adapter.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from loraforge.config import CONFIG_NAME, LoraConfig
from loraforge.errors import NotFound, UserError
from loraforge.formats.io import Header, load_tensors, save_json, save_tensors
from loraforge.layers import LoraEmbedding, LoraLayer

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


WRAPPER_COPY = re.compile(r"\.(original_module|modules_to_save)\.")
LORA_SUFFIXES = {
    ".lora_A.weight": 0,
    ".lora_B.weight": 1,
    ".lora_embedding_A": 0,
    ".lora_embedding_B": 1,
    ".lora_magnitude_vector": 2,
}
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")


def _keys(layer_name: str, layer: LoraLayer) -> tuple[str, str]:
    if isinstance(layer, LoraEmbedding):
        return f"{PREFIX}{layer_name}.lora_embedding_A", f"{PREFIX}{layer_name}.lora_embedding_B"
    return f"{PREFIX}{layer_name}.lora_A.weight", f"{PREFIX}{layer_name}.lora_B.weight"


def adapter_state_dict(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    config = model.peft_config[adapter_name]
    out = {}
    layers = model.adapter_layers(adapter_name)
    for name, layer in layers:
        key_a, key_b = _keys(name, layer)
        out[key_a], out[key_b] = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if layer.is_dora(adapter_name):
            m = layer.lora_magnitude_vector[adapter_name]
            # PEFT's shape: (out,) for linear layers, (1, out, 1, ...) for convolutions
            shape = (1, -1, *[1] * len(layer.kernel_size)) if layer.channels_first else (-1,)
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = m.reshape(shape)
    for name, copy in model.adapter_copies(adapter_name):
        for pname, p in copy.state_dict().items():
            out[f"{PREFIX}{name}.{pname}"] = p
    for key, p in model.trained_biases(config, [n for n, _ in layers]).items():
        out[f"{PREFIX}{key}"] = p
    return out


def save_adapter(model, adapter_name: str, directory: str | Path) -> None:
    """Writes one adapter. Weights first, config last: a directory with a config is a whole adapter."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[adapter_name]
    save_tensors(adapter_state_dict(model, adapter_name), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    data = config.to_dict()
    data["inference_mode"] = True
    save_json(data, directory / CONFIG_NAME)


def read_adapter(
    directory: str | Path, allow_pickle: bool = False
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise NotFound(f"adapter directory not found: {directory}")
    config = LoraConfig.from_pretrained(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists() and (directory / PICKLE_WEIGHTS_NAME).exists():
        weights = directory / PICKLE_WEIGHTS_NAME
    tensors = load_tensors(weights, allow_pickle=allow_pickle)
    # Files from other tools sometimes omit PEFT's prefix; accept both spellings.
    tensors = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in tensors.items()}
    return config, tensors


def split_tensors(
    tensors: dict[str, torch.Tensor], where: str = "adapter"
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """PEFT's keys -> ({module path: (A, B) or (A, B, DoRA magnitude)}, {path: other tensor}), without the
    ``base_model.model.`` prefix.

    With ``bias="all"`` PEFT also saves a modules_to_save module's biases under its wrapper's names
    (``<module>.original_module.bias``: the untouched original; ``<module>.modules_to_save.bias``: a
    second copy of ``<module>.bias``); those are skipped."""
    pairs: dict[str, list] = {}
    others = {}
    for key, tensor in tensors.items():
        key = key.removeprefix(PREFIX)
        if WRAPPER_COPY.search(key):
            continue
        if key.endswith(".lora_magnitude_vector.weight"):  # as PEFT names the parameter in a model
            key = key.removesuffix(".weight")
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            others[key] = tensor
            continue
        pairs.setdefault(key[: -len(suffix)], [None, None, None])[LORA_SUFFIXES[suffix]] = tensor
    for module, (A, B, _) in pairs.items():
        if A is None or B is None:
            raise UserError(f"{where} has only one of {module}'s two LoRA matrices (lora_A, lora_B)")
    return {m: (A, B) if mag is None else (A, B, mag) for m, (A, B, mag) in pairs.items()}, others


def load_adapter(model, directory: str | Path, adapter_name: str, allow_pickle: bool = False) -> None:
    """Loads a PEFT adapter into `model` (a LoraModel). Everything is checked before anything changes,
    and a failure while applying rolls the new adapter back."""
    config, tensors = read_adapter(directory, allow_pickle=allow_pickle)
    where = f"adapter in {directory}"
    if config.base_model_name_or_path:
        where += f" (recorded base: {config.base_model_name_or_path})"
    lora, others = split_tensors(tensors, where)
    model.add_adapter_with_weights(adapter_name, config, lora, others, where=where)


# -- detection and inspection ----------------------------------------------------------------------


def detect(header: Header) -> bool:
    """PEFT's weights file: its keys carry PEFT's prefix, or it sits next to an ``adapter_config.json``,
    or every key is PEFT-shaped (LoRA matrices, plus whole weights/biases) though the prefix is missing.
    (Checked after the image formats, whose files the last rule would also accept.)"""
    keys = header.keys
    if not keys:
        return False
    if any(k.startswith(PREFIX) for k in keys) or (header.path.parent / CONFIG_NAME).is_file():
        return True
    lora = [k for k in keys if k.endswith(tuple(LORA_SUFFIXES))]
    return bool(lora) and all(k.endswith((*LORA_SUFFIXES, ".weight", ".bias")) for k in keys)


def header_modules(header: Header) -> dict[str, int]:
    """Module path -> rank, from the header."""
    out = {}
    for key, shape in header.shapes.items():
        for suffix, index in LORA_SUFFIXES.items():
            if index == 0 and key.endswith(suffix):
                out[key.removeprefix(PREFIX)[: -len(suffix)]] = int(shape[0])
    return out
