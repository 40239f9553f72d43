"""`loraforge generate-image`: images from a Stable Diffusion pipeline with any number of adapters.

    loraforge generate-image --adapter runs/image/adapter --prompt "a circle, in the style of <s1><s2>"
    loraforge generate-image --base path/to/sdxl --adapter style.safetensors:0.7 --adapter subject/:0.5 \\
        --prompt "..." --negative-prompt "blurry" --seed 7 --steps 30 --guidance 6 --scheduler euler \\
        --size 1024x768 --num-images 4 --out images/

Adapters may be loraforge/diffusers directories (``pytorch_lora_weights.safetensors`` + learned
tokens), kohya/civitai ``.safetensors`` files, or cloneofsimo ``final_lora.safetensors`` files; the
format is detected. Image k of a run is made with seed ``seed + k`` from a CPU generator, so the same
seed and settings give the same image (bit-identical on CPU). An adapter at weight 0 is not loaded at
all (its learned tokens neither), so weight 0 gives exactly the base pipeline's image. Learned tokens
apply at full strength whatever the adapter's weight; two adapters that define the same token get
the weight-averaged vector. Each PNG records prompt, seed, settings, base and adapters (with
weights) in its text metadata (``parameters`` in A1111's style, ``loraforge`` as JSON).
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraforge.formats.diffusers import COMPONENTS, TEXT_COMPONENTS, ImageLora, apply, read_image_lora

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++_sde": "DPMSolverSDEScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


# -- pipelines -------------------------------------------------------------------------------------


TINY_UNET_PARAMETERS = 20_000_000


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
    from diffusers import DiffusionPipeline

    from loraforge.bases import DEFAULT_IMAGE_BASE, resolve_base

    where = resolve_base(base or DEFAULT_IMAGE_BASE)
    kwargs = {}
    try:
        index = DiffusionPipeline.load_config(where)
    except Exception as e:  # noqa: BLE001 - diffusers raises several kinds for a missing model
        raise FileNotFoundError(f"cannot read a diffusers pipeline from {where!r}: {e}") from e
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        # Newer diffusers renamed torch_dtype to dtype; older ones only know torch_dtype.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(where, torch_dtype=dtype, **kwargs)
    if getattr(pipe, "unet", None) is None:
        raise ValueError(
            f"{where} is a {type(pipe).__name__}; loraforge trains and runs UNet Stable Diffusion pipelines"
        )
    pipe.set_progress_bar_config(disable=True)
    if threads:
        torch.set_num_threads(threads)
    elif (
        torch.device(device).type == "cpu"
        and sum(p.numel() for p in pipe.unet.parameters()) < TINY_UNET_PARAMETERS
    ):
        torch.set_num_threads(1)
    return pipe.to(device)


def set_scheduler(pipe, name: str | None) -> None:
    if not name:
        return
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


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
            raise ValueError(f"the adapter's learned tokens have no vectors for {component}")
        rows = vectors[component]
        embedding = encoder.get_input_embeddings()
        if rows.shape != (len(tokens), embedding.weight.shape[1]):
            raise ValueError(
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


# -- adapters on a pipeline --------------------------------------------------------------------------


@dataclass
class LoadedAdapter:
    name: str
    path: str
    weight: float
    lora: ImageLora = field(repr=False)


class PipelineAdapters:
    """loraforge LoRA wrappers on a pipeline's UNet and text encoders, and the adapters loaded on them."""

    def __init__(self, pipe):
        from loraforge.model import LoraModel

        self.pipe = pipe
        self.models = {}
        for component in COMPONENTS:
            model = getattr(pipe, component, None)
            if model is not None:
                self.models[component] = LoraModel(model)
        self.adapters: list[LoadedAdapter] = []

    def load(self, path: str | Path, weight: float = 1.0, name: str | None = None) -> LoadedAdapter:
        name = name or f"adapter{len(self.adapters)}"
        lora = read_image_lora(path, {c: m.model for c, m in self.models.items()})
        done = []
        try:
            for component, modules in lora.components.items():
                if component not in self.models:
                    raise ValueError(f"{path} has weights for {component}, which this pipeline does not have")
                apply(self.models[component], name, modules, where=str(path), component=component)
                done.append(component)
        except BaseException:
            for component in done:
                self.models[component].delete_adapter(name)
            raise
        if lora.tokens:
            missing = [c for c, _, _ in text_models(self.pipe) if c not in lora.embeddings]
            if missing:
                raise ValueError(f"{path}: learned tokens have no vectors for {missing[0]} of this pipeline")
        loaded = LoadedAdapter(name=name, path=str(path), weight=float(weight), lora=lora)
        self.adapters.append(loaded)
        return loaded

    def activate(self) -> None:
        """Turns the loaded adapters on at their weights and writes their learned token vectors."""
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


def apply_adapters(pipe, specs: list[tuple[str, float]]) -> PipelineAdapters:
    """Loads (path, weight) adapters onto `pipe`; weight-0 adapters are skipped entirely."""
    adapters = PipelineAdapters(pipe)
    for i, (path, weight) in enumerate(specs):
        if weight == 0:
            continue
        adapters.load(path, weight, name=f"adapter{i}")
    adapters.activate()
    return adapters


# -- generation --------------------------------------------------------------------------------------


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


def generate(pipe, settings: GenerationSettings, count: int = 1) -> list:
    """`count` PIL images; image k uses a CPU generator seeded with ``settings.seed + k``."""
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


def png_info(
    settings: GenerationSettings, seed: int, width: int, height: int, base: str, adapters: list[dict]
):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    data = {
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt or "",
        "seed": seed,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "scheduler": settings.scheduler or "default",
        "width": width,
        "height": height,
        "base": base,
        "adapters": adapters,
    }
    lora_text = ", ".join(f"{Path(a['path']).name}:{a['weight']:g}" for a in adapters) or "none"
    parameters = (
        f"{settings.prompt}\nNegative prompt: {settings.negative_prompt or ''}\n"
        f"Steps: {settings.steps}, Sampler: {settings.scheduler or 'default'}, CFG scale: {settings.guidance:g}, "
        f"Seed: {seed}, Size: {width}x{height}, Model: {base}, Lora: {lora_text}"
    )
    info.add_text("parameters", parameters)
    info.add_text("prompt", settings.prompt)
    info.add_text("seed", str(seed))
    info.add_text("adapters", json.dumps(adapters))
    info.add_text("loraforge", json.dumps(data))
    return info


def parse_size(text: str | None) -> tuple[int, int] | None:
    """ "512" -> (512, 512); "768x512" -> (768, 512) as (width, height)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", text)
    if not m:
        raise ValueError(f"--size must be N or WIDTHxHEIGHT, got {text!r}")
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) else w
    return w, h


# -- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        default=None,
        help="pipeline: embedded name, local diffusers directory or hub id (default: tiny-sd)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="an adapter directory or .safetensors file, optionally with a weight (default 1.0); repeat to mix",
    )
    parser.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several prompts")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), default=None, help="sampler (default: the pipeline's own)"
    )
    parser.add_argument(
        "--size", default=None, help="N or WIDTHxHEIGHT (default: the pipeline's native size)"
    )
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--out", default="images", help="output directory for the PNG files")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")


def run(args) -> int:
    from loraforge.cli import parse_adapter_spec

    if args.num_images < 1:
        raise ValueError("--num-images must be at least 1")
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    specs = [parse_adapter_spec(s) for s in args.adapter]
    for path, _ in specs:
        if not Path(path).exists():
            raise FileNotFoundError(f"adapter not found: {path}")
    size = parse_size(args.size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.base, device=device, dtype=getattr(torch, args.dtype))
    if size is not None:
        step = size_step(pipe)
        if size[0] % step or size[1] % step:
            raise ValueError(
                f"--size {size[0]}x{size[1]}: both sides must be multiples of {step} for this pipeline"
            )
    width, height = size or native_size(pipe)
    set_scheduler(pipe, args.scheduler)
    adapters = apply_adapters(pipe, specs)
    described = [{"path": p, "weight": w} for p, w in specs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = args.base or "tiny-sd"
    written = []
    for pi, prompt in enumerate(args.prompt):
        settings = GenerationSettings(
            prompt=prompt,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            width=width,
            height=height,
            scheduler=args.scheduler,
        )
        for k, image in enumerate(generate(pipe, settings, args.num_images)):
            seed = args.seed + k
            path = out / (f"{pi:02d}-{seed}.png" if len(args.prompt) > 1 else f"{seed}.png")
            image.save(path, pnginfo=png_info(settings, seed, width, height, base, described))
            written.append(path)
    loaded = ", ".join(f"{a.path}:{a.weight:g}" for a in adapters.adapters) or "none"
    print(f"wrote {len(written)} image(s) to {out} (adapters: {loaded})")
    return 0
