"""diffusers' LoRA files, read into and written from `ImageLora` (see `image_lora`).

diffusers' files, as ``StableDiffusionPipeline.save_lora_weights`` writes them::

    pytorch_lora_weights.safetensors
        unet.<module path>.lora_A.weight / .lora_B.weight
        text_encoder.<module path>.lora_A.weight / ...          (text-encoder LoRA, if trained)
        __metadata__: {"format": "pt", "lora_adapter_metadata": JSON of PEFT LoraConfig fields
                       prefixed by component ("unet.r", "unet.lora_alpha", "unet.target_modules", ...)}
    learned_embeds.safetensors      token -> vector (SDXL: "clip_l" / "clip_g", one row per token),
                                    __metadata__ {"tokens": JSON list in tokenizer order}
    adapter_info.json               rank, alpha, base, tokens, prompt templates (loraforge's own)

so that, in plain diffusers::

    pipe.load_lora_weights(adapter_dir)
    emb = safetensors.torch.load_file(adapter_dir / "learned_embeds.safetensors")
    pipe.load_textual_inversion([{t: emb[t]} for t in info["tokens"]])   # SD 1.x / 2.x

Reading also accepts diffusers' older spellings (``.lora.down.weight``, ``.lora_linear_layer.up.weight``,
attention-processor keys ``...attn1.processor.to_q_lora.down.weight``) and ``.alpha`` keys. Without
alpha information a module's alpha is its rank (scale 1), diffusers' convention.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from loraforge.errors import NotFound, UserError
from loraforge.formats.image_lora import (
    COMPONENTS,
    TEXT_COMPONENTS,
    TEXT_MODEL_PREFIX,
    ImageLora,
    ModuleLora,
    config_for,
)
from loraforge.formats.io import Header, load_tensors, save_json, save_tensors

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
EMBEDS_NAME = "learned_embeds.safetensors"
INFO_NAME = "adapter_info.json"
# Textual-inversion keys for the two CLIP encoders of SDXL (the de-facto format of SDXL embeddings).
CLIP_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
METADATA_KEY = "lora_adapter_metadata"


# -- diffusers' LoRA file ---------------------------------------------------------------------------


def peft_metadata(modules: dict[str, ModuleLora], component: str | None = None) -> dict:
    """PEFT LoraConfig fields for diffusers' ``lora_adapter_metadata`` (it builds the config from them).

    Text-encoder names lose their ``text_model.`` prefix here: PEFT matches target names as suffixes,
    so the shorter names select the same layers in flattened and unflattened CLIP models alike
    (diffusers strips that prefix from the weight keys but not from this metadata)."""
    if component in TEXT_COMPONENTS:
        modules = {n.removeprefix(TEXT_MODEL_PREFIX): m for n, m in modules.items()}
    config = config_for(modules)
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": config.target_modules,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
    }


def save_diffusers(directory: str | Path, lora: ImageLora, info: dict | None = None) -> Path:
    """Writes `lora` as diffusers reads it (see the module docstring); returns the weights file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, metadata = {}, {}
    for component, modules in lora.components.items():
        if not modules:
            continue
        for name, m in modules.items():
            tensors[f"{component}.{name}.lora_A.weight"] = m.down
            tensors[f"{component}.{name}.lora_B.weight"] = m.up
        metadata.update({f"{component}.{k}": v for k, v in peft_metadata(modules, component).items()})
    path = directory / WEIGHTS_NAME
    if tensors:
        save_tensors(
            tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)}
        )
    if lora.tokens:
        save_embeddings(directory / EMBEDS_NAME, lora.tokens, lora.embeddings)
    save_info(directory, lora, info)
    return path


def save_info(directory: Path, lora: ImageLora, info: dict | None) -> None:
    data = dict(lora.info)
    data.update(info or {})
    data["tokens"] = list(lora.tokens)
    data.setdefault("components", {c: len(m) for c, m in lora.components.items() if m})
    save_json(data, Path(directory) / INFO_NAME)


def save_embeddings(path: Path, tokens: list[str], embeddings: dict[str, torch.Tensor]) -> None:
    """Learned token vectors. One text encoder: ``{token: vector}`` (diffusers' textual-inversion
    format, one dict per token); two (SDXL): ``{"clip_l": (n, d), "clip_g": (n, d)}``."""
    meta = {"format": "pt", "tokens": json.dumps(tokens)}
    if set(embeddings) == {"text_encoder"}:
        rows = embeddings["text_encoder"]
        save_tensors({t: rows[i] for i, t in enumerate(tokens)}, path, metadata=meta)
    else:
        save_tensors({CLIP_KEYS[c]: v for c, v in embeddings.items()}, path, metadata=meta)


def load_embeddings(path: Path, tokens: list[str] | None = None) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(tokens in order, component -> (n, dim)) from a learned_embeds file written by `save_embeddings`
    (or diffusers' single-token textual-inversion file)."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("tokens"):
        tokens = json.loads(meta["tokens"])
    if any(k in tensors for k in CLIP_KEYS.values()):
        if not tokens:
            raise UserError(
                f"{path}: SDXL embeddings without a token list (metadata 'tokens' or adapter_info.json)"
            )
        found = {c: tensors[k].reshape(len(tokens), -1) for c, k in CLIP_KEYS.items() if k in tensors}
        return list(tokens), found
    order = list(tokens) if tokens else list(tensors)
    missing = [t for t in order if t not in tensors]
    if missing:
        raise UserError(f"{path}: no vector for token(s) {missing}")
    return order, {"text_encoder": torch.stack([tensors[t].reshape(-1) for t in order])}


_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),  # attention-processor era: ...attn1.processor.to_q_lora.down.weight
    ("_lora.up.weight", "up"),
)
_OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(component, module path, "down"/"up"/"alpha") of a diffusers key, or None."""
    component = next((c for c in COMPONENTS if key.startswith(c + ".")), None)
    rest = key[len(component) + 1 :] if component else key
    component = component or "unet"
    if rest.endswith(".alpha"):
        return component, rest[: -len(".alpha")].replace(".processor.", "."), "alpha"
    for suffix, kind in _SUFFIXES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)].replace(".processor.", ".")
            if suffix.startswith("_lora"):
                parent, _, leaf = module.rpartition(".")
                if component in TEXT_COMPONENTS:
                    leaf = _OLD_TEXT.get(leaf, leaf)
                elif leaf == "to_out":
                    leaf = "to_out.0"
                module = f"{parent}.{leaf}" if parent else leaf
            return component, module, kind
    return None


def parse_diffusers_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict | None, where: str
) -> dict[str, dict[str, ModuleLora]]:
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            raise UserError(f"{where}: unrecognised key {key!r} (not a diffusers LoRA weight)")
        component, module, kind = split
        if component in TEXT_COMPONENTS and module.split(".")[0] in (
            "encoder",
            "embeddings",
            "final_layer_norm",
        ):
            module = TEXT_MODEL_PREFIX + module  # written from a flattened CLIPTextModel: canonical spelling
        parts.setdefault((component, module), {})[kind] = tensor
    components: dict[str, dict[str, ModuleLora]] = {}
    for (component, module), got in parts.items():
        if "down" not in got or "up" not in got:
            raise UserError(
                f"{where}: {component}.{module} has {sorted(got)} but needs both down and up weights"
            )
        r = int(got["down"].shape[0])
        alpha = float(got["alpha"]) if "alpha" in got else _metadata_alpha(metadata, component, module, r)
        components.setdefault(component, {})[module] = ModuleLora(got["down"], got["up"], alpha)
    return components


def _metadata_alpha(metadata: dict | None, component: str, module: str, r: int) -> float:
    if not metadata or f"{component}.r" not in metadata:
        return float(r)
    from loraforge.config import name_matches

    alpha = float(metadata.get(f"{component}.lora_alpha", metadata[f"{component}.r"]))
    for key, value in (metadata.get(f"{component}.alpha_pattern") or {}).items():
        if name_matches(module, key):
            alpha = float(value)
            break
    if metadata.get(f"{component}.use_rslora"):
        return alpha / math.sqrt(r) * r
    return alpha


def read_diffusers(path: str | Path) -> ImageLora:
    """Reads a diffusers LoRA directory (or its weights file), with learned embeddings and info if present."""
    from safetensors import safe_open

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    info = read_info(directory)
    lora = ImageLora(info=info)
    if weights.is_file():
        tensors = load_tensors(weights)
        with safe_open(str(weights), framework="pt") as f:
            file_meta = f.metadata() or {}
        raw = file_meta.get(METADATA_KEY)
        try:
            metadata = json.loads(raw) if raw else None
        except json.JSONDecodeError as e:
            raise UserError(f"{weights}: unreadable {METADATA_KEY}: {e}") from e
        lora.components = parse_diffusers_tensors(tensors, metadata, str(weights))
    embeds = directory / EMBEDS_NAME
    if embeds.is_file():
        lora.tokens, lora.embeddings = load_embeddings(embeds, info.get("tokens"))
    if not lora.components and not lora.tokens:
        raise NotFound(f"{path}: no {WEIGHTS_NAME} or {EMBEDS_NAME}")
    return lora


def read_info(directory: Path) -> dict:
    """loraforge's ``adapter_info.json`` next to an image adapter's weights (any format), or {}."""
    info_path = Path(directory) / INFO_NAME
    if not info_path.is_file():
        return {}
    try:
        return json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{info_path} is not valid JSON: {e}") from e


_DIFFUSERS_ONLY = tuple(suffix for suffix, _ in _SUFFIXES[2:]) + (".alpha",)


def detect(header: Header) -> bool:
    """A diffusers LoRA file: every key is a diffusers LoRA weight, and something marks it as diffusers'
    rather than PEFT's (a component prefix, one of diffusers' own spellings, or its metadata)."""
    keys = header.keys
    if not keys or not all(_split_key(k) for k in keys):
        return False
    return (
        METADATA_KEY in header.metadata
        or any(k.startswith(tuple(c + "." for c in COMPONENTS)) for k in keys)
        or any(k.endswith(_DIFFUSERS_ONLY) or ".processor." in k for k in keys)
    )


def header_modules(header: Header) -> dict[str, int]:
    """``component.module path`` -> rank, of the LoRA modules in a diffusers file (from its header)."""
    out = {}
    for key, shape in header.shapes.items():
        split = _split_key(key)
        if split and split[2] == "down":
            out[f"{split[0]}.{split[1]}"] = int(shape[0])
    return out
