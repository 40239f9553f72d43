"""The embedded base models that ship inside the package, so every job runs offline.

Each is a normal `transformers` / `diffusers` directory produced by a script in `scripts/`.
"""

from pathlib import Path

from loraforge.errors import NotFound

BASES_DIR = Path(__file__).parent

EMBEDDED_BASES = {
    "tiny-llama": (
        "text",
        BASES_DIR / "tiny-llama",
        "Llama-style causal LM pretrained by scripts/pretrain_text_base.py",
    ),
    "tiny-sd": (
        "image",
        BASES_DIR / "tiny-sd",
        "Stable Diffusion pipeline pretrained by scripts/pretrain_image_base.py",
    ),
}
DEFAULT_TEXT_BASE = "tiny-llama"
DEFAULT_IMAGE_BASE = "tiny-sd"


def resolve_base(name_or_path: str) -> str:
    """Returns a local directory for an embedded base name; anything else (a path or hub id) passes through."""
    if name_or_path in EMBEDDED_BASES:
        path = EMBEDDED_BASES[name_or_path][1]
        if not (path / "config.json").exists() and not (path / "model_index.json").exists():
            raise NotFound(f"embedded base {name_or_path!r} is missing its weights at {path}")
        return str(path)
    return name_or_path
