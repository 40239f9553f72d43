"""Adapter files in the ecosystem's formats, and the one table that knows them all.

``FORMATS`` maps each format's name to how a file of it is recognised, read and written:

    name         kind   files                                                reads / writes
    kohya        image  one .safetensors, keys ``lora_unet_...``/``lora_te_...``   ImageLora
    cloneofsimo  image  one .safetensors, keys ``unet:0:up``/``unet:0:down``       ImageLora (read only)
    diffusers    image  ``pytorch_lora_weights.safetensors`` (+ learned_embeds,     ImageLora
                        adapter_info.json)
    peft         text   ``adapter_config.json`` + ``adapter_model.safetensors``      (LoraConfig, tensors)
                                                                                     / a LoraModel's adapter

`detect_format` names the format of a directory or file (the only detection rules), `read_image_lora`
and `write_image_lora` read and write image adapters through the table, and `describe` summarises any
adapter from its header (what ``loraforge inspect`` prints). Next to kohya and cloneofsimo files, the
diffusers layout's ``learned_embeds.safetensors`` and ``adapter_info.json`` are read and written too.

Modules: `io` (tensor files), `image_lora` (the format-neutral image adapter and the bridge to
`LoraModel`), and one module per format. Format modules import `io` and `image_lora`, never each
other and never this package; only this package imports them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.config import CONFIG_NAME
from loraforge.errors import NotFound, UserError
from loraforge.formats import cloneofsimo, diffusers, kohya, peft
from loraforge.formats.image_lora import ImageLora
from loraforge.formats.io import Header, read_header


@dataclass(frozen=True)
class Format:
    """One adapter file format.

    `detect` says whether a safetensors file (its header) is in this format. `read` and `write`:
    for kind "image", ``read(path, components) -> ImageLora`` (path: a directory or file; components:
    pipeline component -> model, to map module names) and ``write(directory, lora, info) -> Path``
    (the weights file; None for a format loraforge only reads); for kind "text" (PEFT),
    ``read(directory, allow_pickle=False) -> (LoraConfig, tensors)`` and
    ``write(lora_model, adapter_name, directory)``. `marker`: a file that makes a directory this format.
    `modules`: module -> rank, from a header.
    """

    name: str
    kind: str
    detect: Callable[[Header], bool]
    read: Callable
    write: Callable | None
    modules: Callable[[Header], dict[str, int]]
    marker: str | None = None


# -- image formats: reading and writing through the side files ------------------------------------


def _weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.safetensors") if p.name != diffusers.EMBEDS_NAME)


def _single_file(path: Path) -> Path:
    return _weight_files(path)[0] if path.is_dir() else path


def _with_side_files(lora: ImageLora, directory: Path) -> ImageLora:
    """Adds the adapter_info.json and learned_embeds.safetensors next to a kohya/cloneofsimo file."""
    info = diffusers.read_info(directory)
    lora.info = {**info, **lora.info}
    embeds = directory / diffusers.EMBEDS_NAME
    if not lora.tokens and embeds.is_file():
        lora.tokens, lora.embeddings = diffusers.load_embeddings(embeds, info.get("tokens"))
    return lora


def _mapped_reader(name: str, read_file: Callable) -> Callable:
    def read(path: Path, components: dict | None) -> ImageLora:
        file = _single_file(Path(path))
        if components is None:
            raise UserError(
                f"{file}: reading a {name} file needs the pipeline's models to map its module names"
            )
        return _with_side_files(read_file(file, components), file.parent)

    return read


def _read_diffusers(path: Path, components: dict | None = None) -> ImageLora:
    return diffusers.read_diffusers(path)


def _write_diffusers(directory: Path, lora: ImageLora, info: dict | None = None) -> Path:
    return diffusers.save_diffusers(directory, lora, info)


def _write_kohya(directory: Path, lora: ImageLora, info: dict | None = None) -> Path:
    """``lora.safetensors`` in kohya's format, with the learned tokens and info in diffusers' side files."""
    directory = Path(directory)
    path = kohya.save_kohya(directory / kohya.KOHYA_NAME, lora)
    if lora.tokens:
        diffusers.save_embeddings(directory / diffusers.EMBEDS_NAME, lora.tokens, lora.embeddings)
    diffusers.save_info(directory, lora, info)
    return path


# In detection order: the most specific file rules first (PEFT's last rule accepts any PEFT-shaped keys).
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "kohya",
            "image",
            kohya.detect,
            _mapped_reader("kohya", kohya.read_kohya),
            _write_kohya,
            kohya.header_modules,
        ),
        Format(
            "cloneofsimo",
            "image",
            cloneofsimo.detect,
            _mapped_reader("cloneofsimo", cloneofsimo.read_cloneofsimo),
            None,
            cloneofsimo.header_modules,
        ),
        Format(
            "diffusers",
            "image",
            diffusers.detect,
            _read_diffusers,
            _write_diffusers,
            diffusers.header_modules,
            marker=diffusers.WEIGHTS_NAME,
        ),
        Format(
            "peft",
            "text",
            peft.detect,
            peft.read_adapter,
            peft.save_adapter,
            peft.header_modules,
            marker=CONFIG_NAME,
        ),
    )
}


def detect_format(path: str | Path) -> str:
    """The format ('peft', 'diffusers', 'kohya' or 'cloneofsimo') of an adapter directory or
    .safetensors file. NotFound if there is nothing there; UserError naming what was found otherwise."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"adapter not found: {path}")
    if path.is_dir():
        for fmt in FORMATS.values():
            if fmt.marker and (path / fmt.marker).is_file():
                return fmt.name
        candidates = _weight_files(path)
        if len(candidates) == 1:
            return detect_format(candidates[0])
        if candidates:
            names = ", ".join(p.name for p in candidates[:5])
            raise UserError(f"{path} holds several adapter files ({names}); name the one to use")
        if (path / diffusers.EMBEDS_NAME).is_file():
            return "diffusers"  # learned tokens only
        raise NotFound(
            f"{path}: no adapter in it ({CONFIG_NAME}, {diffusers.WEIGHTS_NAME} or one .safetensors file)"
        )
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: adapter files are read from .safetensors files (or their directory)")
    header = read_header(path)
    for fmt in FORMATS.values():
        if fmt.detect(header):
            return fmt.name
    found = ", ".join(repr(k) for k in header.keys[:3]) if header.keys else "no tensors"
    more = f" and {len(header.keys) - 3} more" if len(header.keys) > 3 else ""
    raise UserError(
        f"{path} is not a LoRA adapter in a format loraforge reads ({', '.join(sorted(FORMATS))}): "
        f"it holds {found}{more}"
    )


def read_image_lora(path: str | Path, components: dict | None = None) -> ImageLora:
    """Reads an image adapter in any supported format. `components` (name -> model) lets kohya and
    cloneofsimo files, which do not spell module paths the diffusers way, be mapped onto the models."""
    fmt = FORMATS[detect_format(path)]
    if fmt.kind != "image":
        raise UserError(
            f"{path} is a PEFT adapter for a single model; image adapters need diffusers, kohya or cloneofsimo files"
        )
    return fmt.read(Path(path), components)


def write_image_lora(directory: str | Path, lora: ImageLora, format: str = "diffusers", info=None) -> Path:
    """Writes `lora` into `directory` in `format` (with learned tokens and info); returns the weights file."""
    fmt = FORMATS.get(format)
    if fmt is None or fmt.kind != "image":
        image = sorted(n for n, f in FORMATS.items() if f.kind == "image" and f.write)
        raise UserError(f"unknown image adapter format {format!r}; loraforge writes {', '.join(image)}")
    if fmt.write is None:
        raise UserError(f"loraforge reads {format} files but does not write them; use diffusers or kohya")
    Path(directory).mkdir(parents=True, exist_ok=True)
    return fmt.write(Path(directory), lora, info)


# -- describe (loraforge inspect) ------------------------------------------------------------------

# Layer names that end in a number or contain "_" (kohya flattens module paths with "_").
_KNOWN_SUFFIXES = (
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv_shortcut",
    "time_emb_proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "out_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "to_q",
    "to_k",
    "to_v",
)


def _module_suffix(module: str, flat: bool) -> str:
    """The layer name that target_modules would use for a module path (e.g. `to_out.0`)."""
    flattened = module.replace(".", "_")
    for known in _KNOWN_SUFFIXES:
        if module.endswith("." + known) or (flat and flattened.endswith("_" + known.replace(".", "_"))):
            return known
    parts = module.split("_" if flat else ".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _described_file(path: Path, fmt: str) -> Path:
    if not path.is_dir():
        return path
    if fmt == "peft":
        weights = path / peft.WEIGHTS_NAME
        if not weights.is_file():
            raise UserError(f"no .safetensors adapter file in {path}")
        return weights
    if fmt == "diffusers":
        weights = path / diffusers.WEIGHTS_NAME
        return weights if weights.is_file() else path / diffusers.EMBEDS_NAME
    return _single_file(path)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e


def describe(path: str | Path) -> dict:
    """Summarises an adapter from its files' headers and configs (its tensors are not loaded): format,
    rank, alpha, target layer names, size, base model, learned tokens. Any format `detect_format` knows;
    for a directory, learned tokens in ``learned_embeds.safetensors`` are listed too."""
    path = Path(path)
    fmt = detect_format(path)
    weights = _described_file(path, fmt)
    header = read_header(weights)
    config = _read_json(weights.parent / CONFIG_NAME)
    info = _read_json(weights.parent / diffusers.INFO_NAME)
    metadata = header.metadata
    modules = FORMATS[fmt].modules(header)
    ranks = sorted(set(modules.values()))
    tokens: list[str] = []
    if fmt == "cloneofsimo":
        targets = cloneofsimo.header_classes(header)
        tokens = cloneofsimo.header_tokens(header)
    else:
        targets = sorted({_module_suffix(m, flat=fmt == "kohya") for m in modules})
        if fmt == "kohya":
            tokens = kohya.header_tokens(header)
    token_keys = [
        k for k in header.keys if k.startswith("bundle_emb.") or metadata.get(k) == cloneofsimo.EMBED_FLAG
    ]
    alpha_keys = [k for k in header.keys if k.endswith(".alpha")]
    n_params = sum(
        int(torch.Size(s).numel())
        for k, s in header.shapes.items()
        if k not in alpha_keys and k not in token_keys
    )
    alpha = config.get("lora_alpha", info.get("alpha"))
    alphas = sorted(set(header.scalars(alpha_keys))) if alpha is None else []
    if alpha is None and alphas:
        alpha = alphas[0] if len(alphas) == 1 else alphas
    if alpha is None and diffusers.METADATA_KEY in metadata:
        peft_meta = json.loads(metadata[diffusers.METADATA_KEY])
        alpha = next((v for k, v in peft_meta.items() if k.endswith("lora_alpha")), None)
    if alpha is None and fmt == "cloneofsimo" and ranks:
        alpha = float(ranks[0]) if len(ranks) == 1 else [float(r) for r in ranks]  # up carries the scale
    embeds = weights.parent / diffusers.EMBEDS_NAME
    if path.is_dir() and embeds.is_file():
        tokens += [t for t in diffusers.load_embeddings(embeds, info.get("tokens"))[0] if t not in tokens]
    return {
        "path": str(weights),
        "format": fmt,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "lora_alpha": alpha,
        "use_rslora": config.get("use_rslora", False),
        "targets": targets,
        "adapted_modules": len(modules),
        "parameters": n_params,
        "dtypes": sorted(set(header.dtypes.values())),
        "file_size_bytes": weights.stat().st_size,
        "base_model": config.get("base_model_name_or_path") or info.get("base") or metadata.get("base_model"),
        "task_type": config.get("task_type"),
        "learned_tokens": tokens,
    }


__all__ = ["FORMATS", "Format", "describe", "detect_format", "read_image_lora", "write_image_lora"]
