"""Reading and writing tensor files safely: atomic writes, clear errors, no pickle by default."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loraforge.errors import NotFound, UserError


def atomic_write(path: str | Path, write) -> None:
    """Calls `write(tmp_path)` then renames the temp file onto `path`, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    # safetensors wants contiguous tensors that share no storage; adapters are small, so copy.
    clean = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        save_file(clean, tmp, metadata=metadata)
        sort_metadata(tmp)

    atomic_write(path, write)


def sort_metadata(path: str | Path) -> None:
    """Rewrites a safetensors header with its ``__metadata__`` keys sorted. safetensors writes them in
    hash-map order, which changes from process to process; sorted, the same tensors and metadata give
    the same bytes (what content addressing needs). Same length, so the data is not moved."""
    with open(path, "rb+") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        if not isinstance(header.get("__metadata__"), dict):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # not the writer's escaping: leave the file as it is
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def save_json(data: dict, path: str | Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=list) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Loads a whole tensor file into memory (nothing is applied anywhere until this succeeds)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"no such file: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        if not allow_pickle:
            raise UserError(
                f"{path} is a pickle file, which can run arbitrary code when loaded; loraforge reads safetensors. "
                "Pass allow_pickle=True (CLI: --allow-pickle) if you trust it; it is then read with weights_only=True."
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} could not be read as a weights-only torch file: {e}") from e
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise UserError(f"{path} does not hold a flat dict of tensors")
        return data
    raise UserError(f"{path}: unknown weight file type {path.suffix!r} (expected .safetensors)")


@dataclass
class Header:
    """What a safetensors file says about itself without its tensors being read."""

    path: Path
    shapes: dict[str, tuple[int, ...]]  # key -> shape, in file order
    dtypes: dict[str, str]
    metadata: dict[str, str]

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)

    def scalars(self, keys: list[str]) -> list[float]:
        """The values of these one-element tensors (kohya's alphas); nothing else is loaded."""
        from safetensors import safe_open

        if not keys:
            return []
        with safe_open(str(self.path), framework="pt") as f:
            return [float(f.get_tensor(k)) for k in keys]


def read_header(path: str | Path) -> Header:
    """The keys, shapes, dtypes and metadata of a safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes, dtypes = {}, {}
            for key in f.keys():
                part = f.get_slice(key)
                shapes[key], dtypes[key] = tuple(part.get_shape()), str(part.get_dtype())
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    return Header(path, shapes, dtypes, metadata)
