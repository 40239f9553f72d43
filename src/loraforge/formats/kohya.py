"""kohya-ss / A1111 / ComfyUI / civitai LoRA files (one ``.safetensors``).

Keys are the module path with every ``.`` turned into ``_``, behind a component prefix::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   (r, in)
    lora_unet_..._to_q.lora_up.weight                                                         (out, r)
    lora_unet_..._to_q.alpha                                                                  () scalar
    lora_te_text_model_encoder_layers_0_self_attn_q_proj....     text encoder (SD 1.x / 2.x)
    lora_te1_... / lora_te2_...                                  SDXL's two text encoders
    lora_te1_encoder_layers_0_self_attn_q_proj....               no ``text_model_`` (read only): diffusers'
                                                                 converter on transformers 5's CLIPTextModel

The update is ``alpha / r * up @ down``; a missing alpha means alpha = r. Convolutions keep their
kernel in ``lora_down`` (``(r, in, kh, kw)``) and a 1x1 ``lora_up``.

Writing uses diffusers' module paths for the UNet (what kohya's trainer writes for SD 1.x, and what
ComfyUI and A1111 map for SDXL too). Reading also accepts the original Stable Diffusion ("SGM")
paths that kohya's SDXL trainer writes (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
``lora_unet_middle_block_1_...``, ``lora_unet_output_blocks_...``): names are resolved against the actual
model, so no guessing where underscores were dots. Embeddings bundled into the file
(``bundle_emb.<token>.string_to_param.*`` or ``.clip_l``/``.clip_g``) are read as learned tokens.
LyCORIS variants (LoHa, LoKr, DoRA) are reported as unsupported.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from loraforge.errors import UserError
from loraforge.formats.image_lora import (
    TEXT_COMPONENTS,
    TEXT_MODEL_PREFIX,
    ImageLora,
    ModuleLora,
    canonical_name,
)
from loraforge.formats.io import Header, load_tensors, save_tensors

KOHYA_NAME = "lora.safetensors"
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_TE1_PREFIX = "lora_te1_"


def kohya_name(component: str, module: str, sdxl: bool = False) -> str:
    prefix = SDXL_TE1_PREFIX if (sdxl and component == "text_encoder") else PREFIXES[component]
    return prefix + module.replace(".", "_")


def save_kohya(path: str | Path, lora: ImageLora, metadata: dict[str, str] | None = None) -> Path:
    """Writes the LoRA modules of `lora` as one kohya-format file (learned tokens are not part of it)."""
    sdxl = "text_encoder_2" in lora.components or "text_encoder_2" in lora.embeddings
    tensors = {}
    ranks, alphas = set(), set()
    for component, modules in lora.components.items():
        for module, m in modules.items():
            key = kohya_name(component, module, sdxl)
            tensors[f"{key}.lora_down.weight"] = m.down
            tensors[f"{key}.lora_up.weight"] = m.up
            tensors[f"{key}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
            ranks.add(m.rank)
            alphas.add(m.alpha)
    if not tensors:
        raise UserError("nothing to write: the adapter has no LoRA modules (only learned tokens?)")
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": str(max(alphas)),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_training_comment": "trained with loraforge",
    }
    meta.update(metadata or {})
    path = Path(path)
    save_tensors(tensors, path, metadata=meta)
    return path


# -- reading ---------------------------------------------------------------------------------------


def _adaptable_names(model: nn.Module) -> list[str]:
    """Module paths of `model` as the user knows them (LoRA wrappers count as their base layer)."""
    from loraforge.layers import supported
    from loraforge.model import base_modules

    return [name for name, m in base_modules(model) if supported(m)]


def sgm_unet_names(unet: nn.Module) -> dict[str, str]:
    """diffusers module path -> original Stable Diffusion ("SGM"/LDM) path, for the UNet's blocks."""
    config = getattr(unet, "config", None)
    if config is None or not hasattr(unet, "down_blocks"):
        return {}
    lpb = config.layers_per_block
    if not isinstance(lpb, int):
        return {}  # per-block layer counts: not a layout SGM files exist for
    prefix: dict[str, tuple[str, bool]] = {}  # diffusers prefix -> (sgm prefix, is a resnet)

    def put(diffusers_prefix, sgm_prefix, resnet=False):
        prefix[diffusers_prefix] = (sgm_prefix, resnet)

    put("conv_in", "input_blocks.0.0")
    put("time_embedding.linear_1", "time_embed.0")
    put("time_embedding.linear_2", "time_embed.2")
    put("add_embedding.linear_1", "label_emb.0.0")
    put("add_embedding.linear_2", "label_emb.0.2")
    put("conv_norm_out", "out.0")
    put("conv_out", "out.2")
    for b, block in enumerate(unet.down_blocks):
        for i in range(len(block.resnets)):
            index = 1 + b * (lpb + 1) + i
            put(f"down_blocks.{b}.resnets.{i}", f"input_blocks.{index}.0", resnet=True)
            if getattr(block, "attentions", None) is not None and i < len(block.attentions):
                put(f"down_blocks.{b}.attentions.{i}", f"input_blocks.{index}.1")
        if getattr(block, "downsamplers", None):
            put(f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op")
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        put("mid_block.resnets.0", "middle_block.0", resnet=True)
        if getattr(mid, "attentions", None):
            put("mid_block.attentions.0", "middle_block.1")
            put("mid_block.resnets.1", "middle_block.2", resnet=True)
    for b, block in enumerate(unet.up_blocks):
        has_attention = getattr(block, "attentions", None) is not None
        for i in range(len(block.resnets)):
            index = b * (lpb + 1) + i
            put(f"up_blocks.{b}.resnets.{i}", f"output_blocks.{index}.0", resnet=True)
            if has_attention and i < len(block.attentions):
                put(f"up_blocks.{b}.attentions.{i}", f"output_blocks.{index}.1")
        if getattr(block, "upsamplers", None):
            last = b * (lpb + 1) + len(block.resnets) - 1
            put(f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{last}.{2 if has_attention else 1}.conv")
    resnet_inner = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    out = {}
    for name in _adaptable_names(unet):
        for p in sorted(prefix, key=len, reverse=True):
            if name == p or name.startswith(p + "."):
                sgm, resnet = prefix[p]
                rest = name[len(p) + 1 :] if name != p else ""
                if resnet and rest:
                    rest = resnet_inner.get(rest, rest)
                out[name] = f"{sgm}.{rest}" if rest else sgm
                break
    return out


def key_map(components: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """kohya module key (without suffix) -> (component, module path as files spell it), for these models."""
    mapping: dict[str, tuple[str, str]] = {}
    for component, model in components.items():
        if component not in PREFIXES or model is None:
            continue
        inner = getattr(model, "model", model)  # a LoraModel's wrapped model
        names = [canonical_name(component, inner, n) for n in _adaptable_names(inner)]
        prefixes = [PREFIXES[component]] + ([SDXL_TE1_PREFIX] if component == "text_encoder" else [])
        for name in names:
            # Text encoders: also without `text_model.`, as files converted from transformers 5's
            # flattened CLIPTextModel spell them (diffusers' convert_state_dict_to_kohya).
            spellings = (
                {name, name.removeprefix(TEXT_MODEL_PREFIX)} if component in TEXT_COMPONENTS else {name}
            )
            for spelling in spellings:
                for prefix in prefixes:
                    mapping[prefix + spelling.replace(".", "_")] = (component, name)
        if component == "unet":
            for name, sgm in sgm_unet_names(inner).items():
                mapping.setdefault(PREFIXES["unet"] + sgm.replace(".", "_"), (component, name))
    return mapping


_UNSUPPORTED = ("hada_", "lokr_", "dora_scale", ".diff", "lora_mid", ".w_norm", ".b_norm", "oft_")


def read_kohya(path: str | Path, components: dict[str, nn.Module]) -> ImageLora:
    """Reads a kohya-format file onto these pipeline models (name -> nn.Module or LoraModel)."""
    path = Path(path)
    tensors = load_tensors(path)
    unsupported = sorted({k for k in tensors if any(s in k for s in _UNSUPPORTED)})
    if unsupported:
        raise UserError(
            f"{path}: LyCORIS/DoRA weights ({unsupported[0]}, ...) are not plain LoRA; loraforge reads LoRA only"
        )
    mapping = key_map(components)
    lora = ImageLora()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bundle: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("bundle_emb."):
            token, _, kind = key[len("bundle_emb.") :].partition(".")
            bundle.setdefault(token, {})[kind] = tensor
            continue
        base, _, suffix = key.partition(".")
        groups.setdefault(base, {})[suffix] = tensor
    unknown = sorted(base for base in groups if base not in mapping)
    if unknown:
        raise UserError(
            f"{path} does not fit this pipeline: no module for {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + "; is it for another base model?"
        )
    for base, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise UserError(f"{path}: {base} lacks lora_down.weight or lora_up.weight (has {sorted(parts)})")
        extra = set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"}
        if extra:
            raise UserError(f"{path}: {base} has keys loraforge does not read: {sorted(extra)}")
        component, module = mapping[base]
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        if module in lora.components.get(component, {}):
            raise UserError(f"{path}: {component}.{module} appears twice (under two spellings)")
        lora.components.setdefault(component, {})[module] = ModuleLora(down, up, alpha)
    if bundle:
        lora.tokens = list(bundle)
        rows: dict[str, list[torch.Tensor]] = {}
        for token, kinds in bundle.items():
            for kind, tensor in kinds.items():
                component = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}.get(kind, "text_encoder")
                if tensor.dim() > 1 and tensor.shape[0] != 1:
                    raise UserError(
                        f"{path}: bundled embedding {token!r} has {tensor.shape[0]} vectors; one per token is supported"
                    )
                rows.setdefault(component, []).append(tensor.reshape(-1))
        lora.embeddings = {c: torch.stack(v) for c, v in rows.items()}
    return lora


# -- detection and inspection ----------------------------------------------------------------------

_KEY = re.compile(r"^(lora_unet_|lora_te\d?_|bundle_emb\.)")


def detect(header: Header) -> bool:
    """A kohya file: every key has one of kohya's prefixes."""
    return bool(header.keys) and all(_KEY.match(k) for k in header.keys)


def header_modules(header: Header) -> dict[str, int]:
    """kohya module key (``lora_unet_..._to_q``) -> rank, from the header."""
    return {
        k.split(".", 1)[0]: int(shape[0])
        for k, shape in header.shapes.items()
        if k.endswith(".lora_down.weight")
    }


def header_tokens(header: Header) -> list[str]:
    """Tokens whose embeddings are bundled into the file (``bundle_emb.<token>.*``), in file order."""
    return list(dict.fromkeys(k.split(".")[1] for k in header.keys if k.startswith("bundle_emb.")))
