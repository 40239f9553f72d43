"""Image training data: a folder or `.zip` of images with optional captions, checked up front.

    records, report = scan_images("data/style", min_size=16)
    print(report.summary())
    buckets = make_buckets(512, step=64)

* Images: ``.jpg``/``.jpeg``, ``.png``, ``.webp`` (and ``.bmp``), in nested folders too.
* Captions: a same-name ``.txt`` beside the image (``cat/01.png`` + ``cat/01.txt``), or a
  ``metadata.jsonl`` (one JSON object a line with ``file_name`` relative to the jsonl's folder and the
  caption under ``text``, ``caption`` or ``prompt``; Hugging Face's "imagefolder" layout). A ``.txt``
  wins over the jsonl. Images without a caption get the instance prompt (see `PromptBuilder`).
* Unreadable or truncated images, images smaller than ``min_size`` on their short side, and files that
  are not images are reported by name and skipped; with ``strict=True`` any of them is an error. No
  usable image at all is always an error, raised before any model is loaded.

Every image is decoded once while scanning (that is how truncation is found); pixels are read again
only when the training set is built, so a large folder never sits in memory twice.
"""

from __future__ import annotations

import io
import json
import math
import random
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from loraforge.errors import DataError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
METADATA_NAME = "metadata.jsonl"
CAPTION_COLUMNS = ("text", "caption", "prompt")


@dataclass
class ImageRecord:
    """One usable image. `name` is its path inside the folder or archive (posix separators)."""

    name: str
    size: tuple[int, int]  # (width, height) after EXIF rotation
    caption: str | None
    _source: _Source = field(repr=False)

    def load(self):
        """The image as an RGB `PIL.Image` (EXIF rotation applied, transparency over white)."""
        return _decode(self._source.read(self.name))


@dataclass
class ScanReport:
    source: str
    used: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    captioned: int = 0

    def summary(self) -> str:
        lines = [
            f"{self.source}: {len(self.used)} usable image(s), {self.captioned} with a caption, "
            f"{len(self.skipped)} file(s) skipped"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


# -- sources: a folder or a zip archive ------------------------------------------------------------


class _Source:
    def names(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, name: str) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError


class _DirSource(_Source):
    def __init__(self, root: Path):
        self.root = root

    def names(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


class _ZipSource(_Source):
    def __init__(self, path: Path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as z:
                self._names = sorted(i.filename for i in z.infolist() if not i.is_dir())
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{path} is not a readable zip archive: {e}") from e
        self._zip: zipfile.ZipFile | None = None

    def names(self) -> list[str]:
        return list(self._names)

    def read(self, name: str) -> bytes:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip.read(name)

    def __getstate__(self):  # picklable for data-loader workers
        return {"path": self.path, "_names": self._names, "_zip": None}


def open_source(path: str | Path) -> _Source:
    path = Path(path)
    if path.is_dir():
        return _DirSource(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        return _ZipSource(path)
    if not path.exists():
        raise DataError(f"training data not found: {path}")
    raise DataError(f"training data must be a folder or a .zip archive of images, not {path}")


def _ignored(name: str) -> bool:
    # Archive tools' bookkeeping, never user data.
    parts = PurePosixPath(name).parts
    return parts[0] == "__MACOSX" or parts[-1].startswith("._")


def _decode(data: bytes):
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _check_image(data: bytes) -> tuple[tuple[int, int] | None, str | None]:
    """(size, None) for a readable image, (None, why) otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # structure and checksums, without decoding
        image = _decode(data)  # a full decode finds truncated pixel data
    except UnidentifiedImageError:
        return None, "not a readable image (unknown or corrupt format)"
    except (OSError, SyntaxError, ValueError) as e:
        return None, f"unreadable or truncated image ({e})"
    except Image.DecompressionBombError as e:
        return None, f"image too large to decode safely ({e})"
    return image.size, None


def _read_metadata(source: _Source, name: str, report: ScanReport, problems: list[str]) -> dict[str, str]:
    """file name (relative to the archive/folder root) -> caption, from one metadata.jsonl."""
    folder = PurePosixPath(name).parent
    captions = {}
    try:
        text = source.read(name).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{name}: unreadable ({e})")
        report.skipped.append((name, f"unreadable metadata file ({e})"))
        return captions
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file_name = row["file_name"]
            caption = next((row[c] for c in CAPTION_COLUMNS if c in row), None)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            why = f"line {lineno} is not a JSON object with a file_name ({e.__class__.__name__})"
            problems.append(f"{name}: {why}")
            report.skipped.append((f"{name}:{lineno}", why))
            continue
        if isinstance(caption, str) and isinstance(file_name, str):
            captions[str(folder / PurePosixPath(file_name))] = caption
    return captions


def scan_images(
    source: str | Path, min_size: int = 8, strict: bool = False
) -> tuple[list[ImageRecord], ScanReport]:
    """Finds the usable images in a folder or zip, with their captions. See the module docstring."""
    src = open_source(source)
    report = ScanReport(source=str(source))
    problems: list[str] = []
    names = [n for n in src.names() if not _ignored(n)]
    name_set = set(names)
    metadata: dict[str, str] = {}
    for name in names:
        if PurePosixPath(name).name == METADATA_NAME:
            metadata.update(_read_metadata(src, name, report, problems))
    records = []
    for name in names:
        path = PurePosixPath(name)
        suffix = path.suffix.lower()
        if path.name == METADATA_NAME:
            continue
        if suffix == CAPTION_EXTENSION:
            if any(str(path.with_suffix(ext)) in name_set for ext in _all_case(IMAGE_EXTENSIONS)):
                continue  # a caption
            why = "caption file without a same-name image"
            report.skipped.append((name, why))
            problems.append(f"{name}: {why}")
            continue
        if suffix not in IMAGE_EXTENSIONS:
            why = "not an image file (expected .jpg, .jpeg, .png, .webp or .bmp)"
            report.skipped.append((name, why))
            problems.append(f"{name}: {why}")
            continue
        try:
            data = src.read(name)
        except OSError as e:
            size, why = None, f"unreadable ({e})"
        else:
            size, why = _check_image(data)
        if size is not None and min(size) < min_size:
            size, why = (
                None,
                f"too small ({size[0]}x{size[1]}; the short side must be at least {min_size} px)",
            )
        if size is None:
            report.skipped.append((name, why))
            problems.append(f"{name}: {why}")
            continue
        caption = _caption_for(src, path, name_set)
        if caption is None:
            caption = metadata.get(name)
        if caption is not None:
            report.captioned += 1
        records.append(ImageRecord(name=name, size=size, caption=caption, _source=src))
        report.used.append(name)
    if strict and problems:
        raise DataError(
            f"{source}: {len(problems)} problem(s) in the training data (strict mode):\n  "
            + "\n  ".join(problems)
        )
    if not records:
        detail = ("\n  " + "\n  ".join(f"{n}: {w}" for n, w in report.skipped)) if report.skipped else ""
        raise DataError(f"{source}: no usable training image (found {len(names)} file(s)){detail}")
    return records, report


def _all_case(exts):
    return [e for ext in exts for e in (ext, ext.upper())]


def _caption_for(src: _Source, path: PurePosixPath, name_set: set[str]) -> str | None:
    for candidate in (path.with_suffix(CAPTION_EXTENSION), path.with_suffix(CAPTION_EXTENSION.upper())):
        if str(candidate) in name_set:
            try:
                text = src.read(str(candidate)).decode("utf-8", errors="replace")
            except OSError:
                return None
            return " ".join(text.split()) or None
    return None


# -- prompts ---------------------------------------------------------------------------------------


@dataclass
class PromptBuilder:
    """Turns a caption (or its absence) into the training prompt.

    ``caption_template`` is applied to captions and ``instance_prompt`` stands in for a missing one;
    both may use ``{caption}`` / ``{tokens}`` (the placeholder tokens joined, e.g. ``<s1><s2>``).
    """

    tokens: list[str] = field(default_factory=list)
    caption_template: str = "{caption}, in the style of {tokens}"
    instance_prompt: str = "a picture in the style of {tokens}"

    def __post_init__(self):
        for name in ("caption_template", "instance_prompt"):
            template = getattr(self, name)
            try:
                template.format(caption="", tokens="")
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"{name} {template!r} may only use {{caption}} and {{tokens}}: {e}") from e
        if "{caption}" not in self.caption_template:
            raise UserError(f"caption_template {self.caption_template!r} must contain {{caption}}")

    @property
    def token_string(self) -> str:
        return "".join(self.tokens)

    def __call__(self, caption: str | None) -> str:
        if caption is None:
            text = self.instance_prompt.format(caption="", tokens=self.token_string)
        else:
            text = self.caption_template.format(caption=caption, tokens=self.token_string)
        return " ".join(text.split()).strip(" ,")


# -- sizes: buckets or a square crop ---------------------------------------------------------------


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) sizes of about resolution² pixels, both multiples of `step`, aspect ratio at most
    `max_ratio`; always includes the square."""
    if resolution % step:
        raise UserError(f"resolution {resolution} must be a multiple of {step} for this pipeline")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= resolution * max_ratio:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the image's; ties go to the larger."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def resize_and_crop(image, target: tuple[int, int], crop: str = "center", rng: random.Random | None = None):
    """Scales `image` to cover `target` (w, h), then crops. Returns (image, (top, left)) where the crop
    offset is in the scaled image (SDXL conditions on it)."""
    from PIL import Image

    tw, th = target
    w, h = image.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    if crop == "random":
        rng = rng or random
        left, top = rng.randint(0, nw - tw), rng.randint(0, nh - th)
    elif crop == "center":
        left, top = (nw - tw) // 2, (nh - th) // 2
    else:
        raise UserError(f"crop must be 'center' or 'random', got {crop!r}")
    return image.crop((left, top, left + tw, top + th)), (top, left)


def to_tensor(image):
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


# -- batches ---------------------------------------------------------------------------------------


def bucket_batches(
    bucket_of: list[tuple[int, int]], batch_size: int, rng: random.Random
) -> Iterator[list[int]]:
    """One epoch of batches (lists of sample indices): every batch's samples share a bucket; order random."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(bucket_of):
        groups.setdefault(b, []).append(i)
    batches = []
    for key in sorted(groups):
        members = groups[key][:]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    yield from batches
