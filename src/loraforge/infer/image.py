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
from pathlib import Path

import torch

from loraforge.errors import UserError
from loraforge.runtime import (
    GenerationSettings,
    apply_adapters,
    load_pipeline,
    native_size,
    parse_adapter_specs,
    render,
    size_step,
)

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


# -- pipelines ---------------------------------------------------------------------------------------


def set_scheduler(pipe, name: str | None) -> None:
    if not name:
        return
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


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
        raise UserError(f"--size must be N or WIDTHxHEIGHT, got {text!r}")
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
    if args.num_images < 1:
        raise UserError("--num-images must be at least 1")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    specs = parse_adapter_specs(args.adapter)  # checked before the pipeline loads
    size = parse_size(args.size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.base, device=device, dtype=getattr(torch, args.dtype))
    if size is not None:
        step = size_step(pipe)
        if size[0] % step or size[1] % step:
            raise UserError(
                f"--size {size[0]}x{size[1]}: both sides must be multiples of {step} for this pipeline"
            )
    width, height = size or native_size(pipe)
    set_scheduler(pipe, args.scheduler)
    adapters = apply_adapters(pipe, specs)
    described = [{"path": s.source, "weight": s.weight} for s in specs]
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
        for k, image in enumerate(render(pipe, settings, args.num_images)):
            seed = args.seed + k
            path = out / (f"{pi:02d}-{seed}.png" if len(args.prompt) > 1 else f"{seed}.png")
            image.save(path, pnginfo=png_info(settings, seed, width, height, base, described))
            written.append(path)
    loaded = ", ".join(f"{a.path}:{a.weight:g}" for a in adapters.adapters) or "none"
    print(f"wrote {len(written)} image(s) to {out} (adapters: {loaded})")
    return 0
