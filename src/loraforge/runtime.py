"""A base model with adapters on it: the one seam every command, job and server goes through.

    rt = load_text(adapters=["runs/text/adapter:0.8", "other/:0.3"])   # base recorded in the adapter
    rt.model.generate(...)                                             # a LoraModel, adapters active
    rt = load_image(base="tiny-sd", adapters=["style.safetensors:0.7"])
    rt.pipe(prompt=...)                                                # a diffusers pipeline

What it decides, once for everything built on it:

* **Adapter specs** are ``SOURCE[:WEIGHT]``: a directory or ``.safetensors`` file, or the CID of one
  in the local job store (`loraforge.jobs.store`; a `loraforge run lora_training` result's CID names
  its ``adapter/``), weight 1 if left out. Only a trailing ``:number`` is a weight, so paths with
  colons keep working. `AdapterSpec` keeps the source as written; `locate_adapter` resolves it.
* **Adapter names**: the k-th adapter given is ``adapter{k}``, for text and images alike.
* **Which base**: the one named; else the one the first adapter records (PEFT's
  ``base_model_name_or_path``, an image adapter's ``adapter_info.json``), whatever it is (an embedded
  name, a directory or a hub id: a hub id is loaded from the cache or downloaded, never swapped
  for another model); else the embedded default for the kind.
* **Loading errors** (a missing base, a tokenizer that cannot load, an adapter for another model)
  are `UserError`s naming what failed, raised before anything is changed.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from loraforge.bases import DEFAULT_IMAGE_BASE, DEFAULT_TEXT_BASE, EMBEDDED_BASES, resolve_base
from loraforge.config import CONFIG_NAME
from loraforge.errors import NotFound, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# -- adapter specs ---------------------------------------------------------------------------------


class AdapterSpec(NamedTuple):
    """One adapter to put on a base: where it is (`source`, as the user wrote it) and its weight."""

    source: str
    weight: float = 1.0

    @property
    def path(self) -> Path:
        return Path(self.source)

    def __str__(self) -> str:
        return f"{self.source}:{self.weight:g}"


def parse_adapter_spec(spec: str | AdapterSpec | tuple) -> AdapterSpec:
    """``SOURCE[:WEIGHT]`` -> AdapterSpec. A Windows drive letter or a path with colons keeps working
    because only a trailing ``:number`` is taken as the weight."""
    if isinstance(spec, AdapterSpec):
        return spec
    if isinstance(spec, tuple):
        source, weight = spec
        return AdapterSpec(str(source), float(weight))
    spec = str(spec)
    source, sep, weight = spec.rpartition(":")
    if sep and source:
        try:
            return AdapterSpec(source, float(weight))
        except ValueError:
            # `adapter:x` where `adapter` exists and `adapter:x` does not: a mistyped weight, not a path.
            if os.path.exists(source) and not os.path.exists(spec):
                raise UserError(
                    f"adapter {spec!r}: the weight after ':' must be a number, got {weight!r}"
                ) from None
    return AdapterSpec(spec, 1.0)


def parse_adapter_specs(specs) -> list[AdapterSpec]:
    """Parses every spec and checks that each adapter exists, before any model is loaded."""
    out = [parse_adapter_spec(s) for s in specs or []]
    for spec in out:
        locate_adapter(spec)
    return out


def locate_adapter(spec: AdapterSpec) -> Path:
    """The local path of an adapter (a directory or a weights file); NotFound if there is none.

    A source that is not a path but a CID the store holds is exported from the store (once; see
    `Store.materialize`): a file as ``adapter.safetensors``, a directory as it is, and a job result
    (a directory with an ``adapter/`` inside) as that ``adapter/``."""
    path = spec.path
    if path.is_dir() and (path / "adapter").is_dir() and (path / "job.json").is_file():
        return path / "adapter"  # a job result directory
    if path.exists():
        return path
    from loraforge.jobs.cid import is_cid

    if is_cid(spec.source):
        from loraforge.jobs.store import Store

        store = Store()
        try:
            path = store.materialize(spec.source, name="adapter.safetensors")
        except NotFound:
            raise NotFound(
                f"adapter not found: {spec.source} is not an adapter in the store {store.root}"
            ) from None
        return locate_adapter(AdapterSpec(str(path), spec.weight))
    raise NotFound(f"adapter not found: {spec.source} (not an adapter directory or file)")


def adapter_name(index: int) -> str:
    """The name the `index`-th adapter of a command gets in the model."""
    return f"adapter{index}"


def recorded_base(path: str | Path) -> str | None:
    """The base model an adapter says it was trained on, or None."""
    from loraforge.formats.diffusers import INFO_NAME

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    for name, key in ((CONFIG_NAME, "base_model_name_or_path"), (INFO_NAME, "base")):
        file = directory / name
        if file.is_file():
            try:
                value = json.loads(file.read_text(encoding="utf-8")).get(key)
            except (OSError, ValueError, AttributeError):
                continue
            if value:
                return str(value)
    return None


def choose_base(base: str | None, adapters: list[AdapterSpec], default: str) -> str:
    """The base to load, as a name: given, else recorded by the first adapter that records one, else `default`."""
    if base:
        return base
    for spec in adapters:
        recorded = recorded_base(locate_adapter(spec))
        if recorded:
            return recorded
    return default


def describe_base(name: str) -> str:
    """How to show a base to a user: an embedded name stays a name (not the package's directory)."""
    return f"{name} (embedded)" if name in EMBEDDED_BASES else name


def quiet_libraries() -> None:
    """Silences what a user cannot act on: the libraries' per-file "Loading" bars (loraforge shows
    its own progress) and transformers' note that image processors fall back to PIL without
    torchvision (the pipelines here never use those processors). Real warnings still show."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    # One filter object: addFilter ignores a filter already there, so loading many models adds it once.
    for filterer in (*hf_logging.get_logger().handlers, logging.getLogger("transformers")):
        filterer.addFilter(_no_torchvision_note)


_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h


def _glibc():
    """The C library, where it is glibc (it has `mallopt` and `malloc_trim`); None otherwise."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def return_freed_memory() -> None:
    """Makes glibc give large freed blocks back to the system at once (a fixed 1 MiB mmap threshold).

    By default glibc raises its mmap threshold (up to 32 MiB) after the first large block is freed, so
    later blocks of that size come from the heap, where fragmentation keeps them resident after they
    are freed. Training on CPU frees such blocks at every layer (activations and their float32 copies
    for the adapter). A 1 MiB threshold keeps the process at its live working set (fine-tuning a 1B
    Llama on an nf4 base: 1.28 GB peak against 1.58 by default), at a price in speed: every tensor of
    1 MiB or more then gets fresh pages from the kernel (that step took 1.6x as long), so it is an
    option (`low_memory` in the training configs), not the default. Process-wide and idempotent;
    skipped off glibc and when the user set ``MALLOC_MMAP_THRESHOLD_`` themselves."""
    _fix_mmap_threshold(1 << 20)


def _fix_mmap_threshold(nbytes: int) -> None:
    """glibc's mmap threshold fixed at `nbytes`, unless the user or an earlier call fixed one already."""
    global _mmap_threshold_fixed
    if _mmap_threshold_fixed or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)
    _mmap_threshold_fixed = True


_mmap_threshold_fixed = False


def hold_heap_down(model: torch.nn.Module, slack: int = 128 << 20) -> list:
    """Keeps glibc's heap near the live working set while a model with a 4-bit base trains on CPU.

    Before each transformer block runs, forward and backward (a forward pre-hook on the model's
    ``_no_split_modules`` classes, and a hook on the gradient of their output), the heap's free pages
    go back to the system (`malloc_trim`) when the resident set has grown by more than `slack` bytes
    since the last time. Every page handed back is faulted in again when the heap reuses it, and
    faults are dear (2.6 us per 4 KiB page in this project's sandbox), so trimming at every block is
    too much. Blocks under 64 MiB come from the heap
    (a fixed mmap threshold), where they are reused without faults. A 1B Llama on an nf4 base
    (`benchmarks/bench_qlora.py`, 1 warmup + 3 steps): untrimmed 1.52 GB peak at 89 tokens/s; trimmed
    at every block 1.28 GB at 68; with the default 128 MiB slack 1.36 GB at 77. Not used for bf16
    bases (there the same cost a quarter of the speed). Returns the hook handles (remove them to stop
    trimming); does nothing off glibc."""
    libc = _glibc()
    if libc is None:
        return []
    _fix_mmap_threshold(64 << 20)
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    resident_after_trim = _resident_bytes()

    def trim(*_):
        nonlocal resident_after_trim
        if _resident_bytes() - resident_after_trim > slack:
            libc.malloc_trim(0)
            resident_after_trim = _resident_bytes()

    def trim_before_backward(module, args, output):
        # The gradient of a block's output arrives just before the block's backward (and, under
        # checkpointing, its recompute) runs. (A full backward pre-hook would do the same, but warns
        # where no block input requires grad, as with a frozen embedding.)
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(trim)

    return [m.register_forward_pre_hook(trim) for m in blocks] + [
        m.register_forward_hook(trim_before_backward) for m in blocks
    ]


def prepare_4bit_cpu_training(model: torch.nn.Module) -> None:
    """What training `model` needs when its base is 4-bit and on CPU, and nothing otherwise: bitsandbytes
    kept on its kernel with a backward pass (`quant.keep_4bit_training_kernel`) and glibc's heap held
    near the live set (`hold_heap_down`; a 1B model's would keep ~0.25 GB of freed blocks)."""
    from loraforge.quant import keep_4bit_training_kernel, model_quantization

    if model_quantization(model) != "4bit" or any(p.device.type != "cpu" for p in model.parameters()):
        return
    keep_4bit_training_kernel(model)
    hold_heap_down(model)


def _resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """Hands the freed parts of glibc's heap back to the system now (`malloc_trim`); no-op off glibc.
    Called once after loading a quantized base: the full-precision tensors read while quantizing are
    freed by then, but glibc would keep their pages resident through the whole run."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _no_torchvision_note(record) -> bool:
    return "requires torchvision" not in record.getMessage()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- text models -----------------------------------------------------------------------------------


def load_tokenizer(base: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_base(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise NotFound(f"cannot load the tokenizer of base {base!r}: {_first_line(e)}") from e
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
    return tokenizer


def load_text_model(
    base: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    require_tokenizer: bool = True,
    quantize: str = "none",
    compute_dtype: str = "float32",
    double_quant: bool = True,
    device: str | torch.device | None = None,
):
    """(model, tokenizer) for an embedded base name, a local transformers directory or a hub id.
    Without `require_tokenizer`, a base with no loadable tokenizer gives tokenizer None.

    `quantize` ("nf4", "fp4", "int8"; "none" by default) loads the linear layers of the transformer
    blocks quantized by bitsandbytes (a frozen QLoRA base); 4-bit layers compute in `compute_dtype`
    with `double_quant` on by default. `dtype` is then the dtype of the layers left unquantized
    (embeddings, norms, output head). A quantized model is placed on `device` (default CPU) as it loads."""
    from transformers import AutoModelForCausalLM

    from loraforge.quant import QUANTIZE_CHOICES, quantization_config, quiet_int8_casts

    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)} or auto")
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"quantize {quantize!r}: choose from {', '.join(QUANTIZE_CHOICES)}")
    if compute_dtype not in DTYPES:
        raise UserError(f"compute dtype {compute_dtype!r}: choose from {', '.join(DTYPES)}")
    quant = quantization_config(quantize, DTYPES[compute_dtype], double_quant)
    quiet_libraries()
    try:
        tokenizer = load_tokenizer(base, trust_remote_code)
    except NotFound:
        if require_tokenizer:
            raise
        tokenizer = None
    path = resolve_base(base)
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": "auto" if dtype == "auto" else DTYPES[dtype]}
    if quant is not None:
        quiet_int8_casts()
        kwargs.update(quantization_config=quant, device_map={"": str(device or "cpu")})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise NotFound(f"cannot load base model {base!r}: {_first_line(e)}") from e
    if quant is not None:
        release_checkpoint(model)
        trim_heap()
    return model, tokenizer


def release_checkpoint(model) -> None:
    """Gives the unquantized weights of a freshly quantized model their own memory. Loaded in the
    checkpoint's dtype, they are views of its memory-mapped file, which keeps the whole mapping, and
    every page of it read while quantizing (the full-precision weights), resident in the process."""
    from loraforge.quant import avoid_broken_cpu_repack, is_quantized

    for m in model.modules():
        avoid_broken_cpu_repack(m)
    quantized = {id(p) for m in model.modules() if is_quantized(m) for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) not in quantized and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


@dataclass
class TextRuntime:
    """A causal LM with adapters on it. `model` is a LoraModel (the bare base when no adapter is given)."""

    model: object
    tokenizer: object
    base: str  # as named (embedded name, directory or hub id)
    adapters: list[tuple[str, AdapterSpec]] = field(default_factory=list)  # (name in the model, spec)

    def describe(self) -> str:
        mix = ", ".join(str(s) for _, s in self.adapters) or "none"
        return f"base: {describe_base(self.base)}; adapters: {mix}"


def text_adapter_dir(spec: AdapterSpec) -> Path:
    """The PEFT adapter directory of a spec: the directory itself, or the directory of its weights
    file. Anything else is refused by what it is (an image adapter points to `generate-image`)."""
    from loraforge.formats import FORMATS, detect_format

    path = locate_adapter(spec)
    directory = path.parent if path.is_file() else path
    if (directory / CONFIG_NAME).is_file():
        return directory
    fmt = detect_format(path)
    if FORMATS[fmt].kind == "image":
        raise UserError(f"{spec.source} is a {fmt} image adapter; image adapters go to generate-image")
    raise NotFound(f"{spec.source}: a PEFT adapter needs its {CONFIG_NAME} beside the weights")


def load_text(
    base: str | None = None,
    adapters=(),
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    require_tokenizer: bool = True,
    quantize: str = "none",
    compute_dtype: str = "float32",
) -> TextRuntime:
    """Loads a causal LM and puts `adapters` (specs or ``SOURCE[:WEIGHT]`` strings) on it at their weights.
    `quantize` ("nf4", "fp4", "int8") loads the base quantized (see `load_text_model`)."""
    from loraforge.model import LoraModel

    specs = parse_adapter_specs(adapters)
    directories = [text_adapter_dir(spec) for spec in specs]  # all checked before the model loads
    name = choose_base(base, specs, DEFAULT_TEXT_BASE)
    model, tokenizer = load_text_model(
        name, dtype, trust_remote_code, require_tokenizer, quantize, compute_dtype, device=device
    )
    if device is not None and quantize == "none":
        model.to(device)
    lora = LoraModel(model)
    loaded = []
    for i, (spec, directory) in enumerate(zip(specs, directories)):
        lora.load_adapter(directory, adapter_name(i))
        loaded.append((adapter_name(i), spec))
    if loaded:
        lora.set_adapters([n for n, _ in loaded], [s.weight for _, s in loaded])
    lora.eval()
    return TextRuntime(lora, tokenizer, name, loaded)


# -- image pipelines -------------------------------------------------------------------------------

TINY_PARAMETERS = 20_000_000  # below this a model runs fastest on one CPU thread


def load_pipeline(
    base: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    threads: int = 0,
):
    """Any diffusers Stable Diffusion pipeline (SD 1.x/2.x, SDXL, ...) from a local directory, a hub id
    or an embedded base name. The safety checker is not loaded.

    `threads`: CPU threads for PyTorch. 0: PyTorch's default, except one thread for a tiny pipeline on
    CPU, whose kernels are too small to split (spare threads only spin, and on a busy machine that
    makes each step many times slower)."""
    quiet_libraries()  # before diffusers loads the pipeline modules, which print the torchvision note
    from diffusers import DiffusionPipeline

    name = base or DEFAULT_IMAGE_BASE
    where = resolve_base(name)
    kwargs = {}
    try:
        index = DiffusionPipeline.load_config(where)
    except Exception as e:  # noqa: BLE001 - diffusers raises several kinds for a missing model
        raise NotFound(f"cannot read a diffusers pipeline from {name!r}: {_first_line(e)}") from e
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        # Newer diffusers renamed torch_dtype to dtype; older ones only know torch_dtype.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(where, torch_dtype=dtype, **kwargs)
    if getattr(pipe, "unet", None) is None:
        raise UserError(
            f"{name} is a {type(pipe).__name__}; loraforge trains and runs UNet Stable Diffusion pipelines"
        )
    pipe.set_progress_bar_config(disable=True)
    set_threads(threads, device, pipe.unet)
    return pipe.to(device)


def set_threads(threads: int, device, model) -> None:
    """CPU threads for PyTorch: `threads` if given; else one for a tiny model on CPU, whose kernels are
    too small to split (spare threads only spin, and on a busy machine that makes each step many times
    slower); else PyTorch's default."""
    if threads:
        torch.set_num_threads(threads)
    elif torch.device(device).type == "cpu" and sum(p.numel() for p in model.parameters()) < TINY_PARAMETERS:
        torch.set_num_threads(1)


def native_size(pipe) -> tuple[int, int]:
    """(width, height) the pipeline's UNet was built for."""
    sample = pipe.unet.config.sample_size
    factor = getattr(pipe, "vae_scale_factor", 8)
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return w * factor, h * factor


def size_step(pipe) -> int:
    """Image sizes must be multiples of this (VAE factor x UNet downsampling)."""
    factor = getattr(pipe, "vae_scale_factor", 8)
    return factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)


def text_models(pipe) -> list[tuple[str, object, object]]:
    """(component, tokenizer, text encoder) for each text encoder of the pipeline."""
    from loraforge.formats.image_lora import TEXT_COMPONENTS

    out = []
    for component in TEXT_COMPONENTS:
        encoder = getattr(pipe, component, None)
        if encoder is not None:
            tokenizer = getattr(pipe, "tokenizer" if component == "text_encoder" else "tokenizer_2")
            out.append((component, tokenizer, encoder))
    return out


def add_tokens(pipe, tokens: list[str], vectors: dict[str, torch.Tensor]) -> None:
    """Adds `tokens` to the pipeline's tokenizer(s) (in order) and sets their embedding rows."""
    for component, tokenizer, encoder in text_models(pipe):
        if component not in vectors:
            raise IncompatibleTokens(f"the adapter's learned tokens have no vectors for {component}")
        rows = vectors[component]
        embedding = encoder.get_input_embeddings()
        if rows.shape != (len(tokens), embedding.weight.shape[1]):
            raise IncompatibleTokens(
                f"learned token vectors of shape {tuple(rows.shape)} do not fit {component} "
                f"({len(tokens)} tokens x {embedding.weight.shape[1]})"
            )
        new = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if new:
            tokenizer.add_tokens(new)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if max(ids) >= embedding.weight.shape[0]:
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            embedding = encoder.get_input_embeddings()
        with torch.no_grad():
            embedding.weight[ids] = rows.to(embedding.weight.dtype)


class IncompatibleTokens(UserError):
    """Learned token vectors that do not fit the pipeline's text encoders."""


@dataclass
class LoadedAdapter:
    name: str
    spec: AdapterSpec
    lora: object = field(repr=False)  # formats' ImageLora

    @property
    def path(self) -> str:
        return self.spec.source

    @property
    def weight(self) -> float:
        return self.spec.weight


class PipelineAdapters:
    """loraforge LoRA wrappers on a pipeline's UNet and text encoders, and the adapters loaded on them."""

    def __init__(self, pipe):
        from loraforge.formats.image_lora import COMPONENTS
        from loraforge.model import LoraModel

        self.pipe = pipe
        self.models = {}
        for component in COMPONENTS:
            model = getattr(pipe, component, None)
            if model is not None:
                self.models[component] = LoraModel(model)
        self.adapters: list[LoadedAdapter] = []

    def load(self, spec: AdapterSpec | str, name: str | None = None) -> LoadedAdapter:
        """Reads an image adapter in any supported format and adds it (not yet active). On failure the
        pipeline is left as it was."""
        from loraforge.formats import read_image_lora
        from loraforge.formats.image_lora import apply

        spec = parse_adapter_spec(spec)
        path = locate_adapter(spec)
        name = name or adapter_name(len(self.adapters))
        lora = read_image_lora(path, {c: m.model for c, m in self.models.items()})
        missing = [c for c in lora.components if c not in self.models]
        if missing:
            raise UserError(f"{spec.source} has weights for {missing[0]}, which this pipeline does not have")
        if lora.tokens:
            lacking = [c for c, _, _ in text_models(self.pipe) if c not in lora.embeddings]
            if lacking:
                raise UserError(
                    f"{spec.source}: learned tokens have no vectors for {lacking[0]} of this pipeline"
                )
        done = []
        try:
            for component, modules in lora.components.items():
                apply(self.models[component], name, modules, where=spec.source, component=component)
                done.append(component)
        except BaseException:
            for component in done:
                self.models[component].delete_adapter(name)
            raise
        loaded = LoadedAdapter(name=name, spec=spec, lora=lora)
        self.adapters.append(loaded)
        return loaded

    def activate(self) -> None:
        """Turns the loaded adapters on at their weights and writes their learned token vectors.

        Learned tokens apply at full strength whatever the adapter's weight; two adapters that define
        the same token get the weight-averaged vector."""
        for model in self.models.values():
            names = [a.name for a in self.adapters if a.name in model.peft_config]
            weights = [a.weight for a in self.adapters if a.name in model.peft_config]
            model.set_adapters(names, weights)
            for p in model.parameters():
                p.requires_grad_(False)
        tokens: dict[str, list[tuple[float, dict[str, torch.Tensor]]]] = {}
        for a in self.adapters:
            for i, token in enumerate(a.lora.tokens):
                tokens.setdefault(token, []).append(
                    (a.weight, {c: v[i] for c, v in a.lora.embeddings.items()})
                )
        if tokens:
            order = list(tokens)
            vectors = {}
            for component, _, _ in text_models(self.pipe):
                rows = []
                for token in order:
                    total = sum(abs(w) for w, _ in tokens[token])
                    rows.append(sum(abs(w) / total * v[component].float() for w, v in tokens[token]))
                vectors[component] = torch.stack(rows)
            add_tokens(self.pipe, order, vectors)

    def describe(self) -> list[dict]:
        return [{"path": a.path, "weight": a.weight} for a in self.adapters]


@dataclass
class ImageRuntime:
    """A diffusers pipeline with adapters on it."""

    pipe: object
    adapters: PipelineAdapters
    base: str

    def describe(self) -> str:
        mix = ", ".join(f"{a.path}:{a.weight:g}" for a in self.adapters.adapters) or "none"
        return f"base: {describe_base(self.base)}; adapters: {mix}"


def apply_adapters(pipe, adapters=()) -> PipelineAdapters:
    """Loads adapters onto `pipe` and activates them. A weight-0 adapter is not loaded at all (its
    learned tokens neither), so weight 0 gives exactly the base pipeline's image. The k-th spec
    keeps the name ``adapter{k}`` whether or not earlier ones were skipped."""
    on = PipelineAdapters(pipe)
    for i, spec in enumerate(parse_adapter_specs(adapters)):
        if spec.weight != 0:
            on.load(spec, name=adapter_name(i))
    on.activate()
    return on


def load_image(
    base: str | None = None,
    adapters=(),
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    threads: int = 0,
) -> ImageRuntime:
    """Loads a Stable Diffusion pipeline and puts `adapters` on it at their weights."""
    specs = parse_adapter_specs(adapters)
    name = choose_base(base, specs, DEFAULT_IMAGE_BASE)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(name, device=device, dtype=dtype, threads=threads)
    return ImageRuntime(pipe, apply_adapters(pipe, specs), name)


# -- running a pipeline ----------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 25
    guidance: float = 5.0
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None


def render(pipe, settings: GenerationSettings, count: int = 1) -> list:
    """`count` PIL images; image k uses a CPU generator seeded with ``settings.seed + k``, so the same
    seed and settings give the same image (bit-identical on CPU)."""
    width, height = settings.width, settings.height
    if width is None or height is None:
        width, height = native_size(pipe)
    images = []
    for k in range(count):
        generator = torch.Generator("cpu").manual_seed(settings.seed + k)
        with torch.no_grad():
            result = pipe(
                prompt=settings.prompt,
                negative_prompt=settings.negative_prompt,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                width=width,
                height=height,
                generator=generator,
            )
        images.append(result.images[0])
    return images
