"""Stable Diffusion adapters: a format-neutral form, and diffusers' LoRA files.

Every image adapter format (diffusers, kohya, cloneofsimo) reads into and writes from `ImageLora`:
per pipeline component (``unet``, ``text_encoder``, ``text_encoder_2``) a map from module path
(diffusers' names, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``) to the
module's down (A: ``(r, in, *kernel)``) and up (B: ``(out, r, *ones)``) matrices and its alpha (the
update is ``alpha / r * B @ A``), plus learned token embeddings (pivotal tuning) in token order.

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
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraforge.config import LoraConfig
from loraforge.errors import NotFound, UserError
from loraforge.formats.io import load_tensors, save_json, save_tensors

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
EMBEDS_NAME = "learned_embeds.safetensors"
INFO_NAME = "adapter_info.json"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
# Textual-inversion keys for the two CLIP encoders of SDXL (the de-facto format of SDXL embeddings).
CLIP_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
METADATA_KEY = "lora_adapter_metadata"


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
    from loraforge.layers import LoraEmbedding, LoraLayer

    out = {}
    for name, layer in lora_model.model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
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


def _fit(tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    # A 1x1 convolution and a linear layer hold the same matrix; files disagree on which they store.
    if tensor.numel() == math.prod(shape) and tensor.shape[:2] == tuple(shape[:2]):
        return tensor.reshape(shape)
    raise UserError(f"{what}: shape {tuple(tensor.shape)} in the file, the model needs {tuple(shape)}")


def apply(
    lora_model,
    adapter_name: str,
    modules: dict[str, ModuleLora],
    where: str = "adapter",
    component: str | None = None,
) -> None:
    """Adds `modules` (named as files spell them) to a `LoraModel` (pipeline component `component`) as
    adapter `adapter_name`.

    Everything is checked first (every module exists, is adaptable and has the right shapes); a
    failure while copying removes the half-added adapter again."""
    from loraforge.layers import LoraLayer, supported, wrap

    modules = {model_name(component, lora_model, n): m for n, m in modules.items()}
    config = config_for(modules)
    plain = dict(lora_model._plain_modules())
    for name, m in modules.items():
        module = plain.get(name)
        if module is None:
            raise UserError(
                f"{where} does not fit this model: it has no module {name!r} (is it for another base?)"
            )
        if not supported(module):
            raise UserError(f"{where}: {name} is a {type(module).__name__}, which LoRA cannot adapt here")
        current = lora_model.model.get_submodule(name)
        layer = current if isinstance(current, LoraLayer) else wrap(module)
        _fit(m.down, layer.a_shape(m.rank), f"{where}: {name} down")
        _fit(m.up, layer.b_shape(m.rank), f"{where}: {name} up")
    found = set(lora_model.find_targets(config))
    if found != set(modules):
        odd = sorted(found ^ set(modules))
        raise UserError(
            f"{where}: its module names do not select exactly its modules in this model: {odd[:3]}"
        )
    lora_model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for name, m in modules.items():
                layer = lora_model.model.get_submodule(name)
                A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
                A.copy_(_fit(m.down, tuple(A.shape), name))
                B.copy_(_fit(m.up, tuple(B.shape), name))
                A.requires_grad_(False)
                B.requires_grad_(False)
    except BaseException:
        lora_model.delete_adapter(adapter_name)
        raise


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
    info = _read_info(directory)
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


def _read_info(directory: Path) -> dict:
    info_path = Path(directory) / INFO_NAME
    if not info_path.is_file():
        return {}
    try:
        return json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{info_path} is not valid JSON: {e}") from e


# -- any image adapter file -------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """'diffusers', 'kohya' or 'cloneofsimo' for an adapter directory or .safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file():
            return "diffusers"
        candidates = sorted(p for p in path.glob("*.safetensors") if p.name != EMBEDS_NAME)
        if len(candidates) == 1:
            return detect_format(candidates[0])
        if not candidates and (path / EMBEDS_NAME).is_file():
            return "diffusers"  # learned tokens only
        if (path / "adapter_config.json").is_file():
            raise UserError(
                f"{path} is a PEFT adapter for a single model; image adapters need diffusers, kohya or cloneofsimo files"
            )
        raise NotFound(f"{path}: no image adapter file ({WEIGHTS_NAME} or one .safetensors)")
    if not path.is_file():
        raise NotFound(f"adapter not found: {path}")
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: image adapters are read from .safetensors files")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from e
    if keys and all(re.match(r"^(lora_unet_|lora_te\d?_|bundle_emb\.)", k) for k in keys):
        return "kohya"
    if any(re.match(r"^[A-Za-z_]\w*:\d+:(up|down)$", k) for k in keys):
        return "cloneofsimo"
    return "diffusers"


def read_image_lora(path: str | Path, components: dict | None = None) -> ImageLora:
    """Reads any supported image adapter. `components` (name -> model) lets kohya/cloneofsimo files,
    which do not spell module paths the diffusers way, be mapped onto the actual models."""
    fmt = detect_format(path)
    if fmt == "diffusers":
        return read_diffusers(path)
    path = Path(path)
    if path.is_dir():
        path = next(p for p in sorted(path.glob("*.safetensors")) if p.name != EMBEDS_NAME)
    if components is None:
        raise UserError(f"{path}: reading a {fmt} file needs the pipeline's models to map its module names")
    if fmt == "kohya":
        from loraforge.formats.kohya import read_kohya

        lora = read_kohya(path, components)
    else:
        from loraforge.formats.cloneofsimo import read_cloneofsimo

        lora = read_cloneofsimo(path, components)
    directory = path.parent
    info = _read_info(directory)
    lora.info = {**info, **lora.info}
    embeds = directory / EMBEDS_NAME
    if not lora.tokens and embeds.is_file():
        lora.tokens, lora.embeddings = load_embeddings(embeds, info.get("tokens"))
    return lora
