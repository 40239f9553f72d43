"""PEFT's adapter files: `adapter_config.json` + `adapter_model.safetensors`.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
``.lora_embedding_A`` / ``.lora_embedding_B``, stored without ``.weight``); trained copies of
`modules_to_save` are stored under the module's own path, e.g. ``base_model.model.score.weight``.
The adapter name never appears in a key: one file holds one adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraforge.config import CONFIG_NAME, LoraConfig
from loraforge.errors import NotFound, UserError
from loraforge.formats.io import load_tensors, save_json, save_tensors
from loraforge.layers import LoraEmbedding, LoraLayer, TrainableCopy

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def _keys(layer_name: str, layer: LoraLayer) -> tuple[str, str]:
    if isinstance(layer, LoraEmbedding):
        return f"{PREFIX}{layer_name}.lora_embedding_A", f"{PREFIX}{layer_name}.lora_embedding_B"
    return f"{PREFIX}{layer_name}.lora_A.weight", f"{PREFIX}{layer_name}.lora_B.weight"


def adapter_state_dict(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names."""
    config = model.peft_config[adapter_name]
    out = {}
    for name, module in model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            key_a, key_b = _keys(name, module)
            out[key_a], out[key_b] = module.lora_A[adapter_name], module.lora_B[adapter_name]
            if config.bias != "none" and getattr(module.base_layer, "bias", None) is not None:
                out[f"{PREFIX}{name}.bias"] = module.base_layer.bias
        elif isinstance(module, TrainableCopy) and adapter_name in module.modules_to_save:
            for pname, p in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{name}.{pname}"] = p
    if config.bias == "all":
        for pname, p in model.model.named_parameters():
            if pname.endswith("bias") and "lora_" not in pname and "modules_to_save" not in pname:
                out.setdefault(
                    f"{PREFIX}{pname.replace('.base_layer', '').replace('.original_module', '')}", p
                )
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


def load_adapter(model, directory: str | Path, adapter_name: str, allow_pickle: bool = False) -> None:
    """Loads a PEFT adapter into `model` (a LoraModel). Everything is checked before anything changes,
    and a failure while applying rolls the new adapter back."""
    config, tensors = read_adapter(directory, allow_pickle=allow_pickle)
    if adapter_name in model.peft_config:
        raise UserError(f"an adapter named {adapter_name!r} already exists; pick another name or delete it")
    expected = _expected_shapes(model, config)
    for key, tensor in tensors.items():
        if key not in expected:
            raise UserError(
                f"adapter in {directory} does not fit this model: {key!r} has no matching module "
                f"(is it for a different base model? recorded base: {config.base_model_name_or_path})"
            )
        if tuple(tensor.shape) != expected[key]:
            raise UserError(
                f"adapter in {directory} does not fit this model: {key!r} has shape {tuple(tensor.shape)} "
                f"in the file but the model needs {expected[key]}"
            )
    missing = [k for k in expected if k not in tensors and ("lora_" in k)]
    if missing:
        raise UserError(
            f"adapter in {directory} lacks weights for {missing[0]!r} (and {len(missing) - 1} more)"
        )
    model.add_adapter(adapter_name, config)
    try:
        _apply(model, adapter_name, tensors)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


def _expected_shapes(model, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape the model would give each tensor of an adapter with this config (dry run)."""
    from loraforge.layers import wrap

    shapes = {}
    for name in model.find_targets(config):
        module = model.model.get_submodule(name)
        layer = module if isinstance(module, LoraLayer) else wrap(module)
        r = config.rank_for(name)
        key_a, key_b = _keys(name, layer)
        shapes[key_a], shapes[key_b] = layer.a_shape(r), layer.b_shape(r)
        bias = getattr(layer.base_layer, "bias", None)
        if bias is not None:
            shapes[f"{PREFIX}{name}.bias"] = tuple(bias.shape)
        if isinstance(layer, LoraEmbedding):
            # PEFT also saves targeted embedding matrices in full (they may have been resized).
            shapes[f"{PREFIX}{name}.base_layer.weight"] = tuple(layer.base_layer.weight.shape)
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model.model, getter, lambda: None)()
        for name, m in model._plain_modules():
            if module is not None and m is module and getattr(m, "weight", None) is not None:
                shapes[f"{PREFIX}{name}.weight"] = tuple(m.weight.shape)
    for name in model._find_modules_to_save(config):
        module = model.model.get_submodule(name)
        source = module.original_module if isinstance(module, TrainableCopy) else module
        for pname, p in source.state_dict().items():
            shapes[f"{PREFIX}{name}.{pname}"] = tuple(p.shape)
    if config.bias == "all":
        for pname, p in model.model.named_parameters():
            if pname.endswith("bias") and "lora_" not in pname and "modules_to_save" not in pname:
                shapes.setdefault(
                    f"{PREFIX}{pname.replace('.base_layer', '').replace('.original_module', '')}",
                    tuple(p.shape),
                )
    return shapes


@torch.no_grad()
def _apply(model, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, module in model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            key_a, key_b = _keys(name, module)
            module.lora_A[adapter_name].copy_(tensors[key_a])
            module.lora_B[adapter_name].copy_(tensors[key_b])
        elif isinstance(module, TrainableCopy) and adapter_name in module.modules_to_save:
            copy = module.modules_to_save[adapter_name]
            prefix = f"{PREFIX}{name}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            copy.load_state_dict(state, strict=False)
    # Biases and full embedding matrices are base weights shared by all adapters: they are written
    # only when the file has them (PEFT saves them with bias != "none" or a targeted embedding).
    params = {
        PREFIX + n.replace(".base_layer", "").replace(".original_module", ""): p
        for n, p in model.model.named_parameters()
    }
    copies = [f"{PREFIX}{n}." for n, m in model.model.named_modules() if isinstance(m, TrainableCopy)]
    for key, tensor in tensors.items():
        key = key.replace(".base_layer", "")
        if "lora_" not in key and key in params and not any(key.startswith(c) for c in copies):
            params[key].copy_(tensor)
