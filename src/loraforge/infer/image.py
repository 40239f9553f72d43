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
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge import flags
from loraforge.errors import ConfigError, UserError
from loraforge.infer.progress import Progress
from loraforge.runtime import (
    GenerationSettings,
    ImageRuntime,
    load_image,
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


@dataclass
class GeneratedImage:
    image: object  # PIL.Image
    prompt_index: int
    settings: GenerationSettings
    seed: int

    def png_info(self, base: str, adapters: list[dict]):
        width, height = self.image.size
        return png_info(self.settings, self.seed, width, height, base, adapters)


def generate_images(
    prompts: str | list[str],
    base: str | None = None,
    adapters=(),
    *,
    negative_prompt: str | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
    size: str | tuple[int, int] | None = None,
    num_images: int = 1,
    scheduler: str | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    runtime: ImageRuntime | None = None,
    progress: bool = False,
) -> list[GeneratedImage]:
    """`num_images` images per prompt from `base` with `adapters` (``SOURCE[:WEIGHT]`` strings or
    AdapterSpecs) at their weights; image k of a prompt uses seed ``seed + k``. Pass `runtime` (from
    `loraforge.runtime.load_image`) to reuse a loaded pipeline. `progress`: report images done, rate
    and ETA on stderr."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("give at least one prompt")
    if num_images < 1:
        raise ConfigError(f"num_images must be at least 1, got {num_images}")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if guidance < 0:
        raise ConfigError(f"guidance must be >= 0, got {guidance}")
    if scheduler and scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    wanted = parse_size(size) if isinstance(size, str) or size is None else tuple(size)
    rt = runtime or load_image(base, adapters, device=device, dtype=dtype)
    pipe = rt.pipe
    if wanted is not None:
        step = size_step(pipe)
        if wanted[0] % step or wanted[1] % step:
            raise ConfigError(
                f"size {wanted[0]}x{wanted[1]}: both sides must be multiples of {step} for this pipeline"
            )
    width, height = wanted or native_size(pipe)
    set_scheduler(pipe, scheduler)
    out = []
    meter = Progress(len(prompts) * num_images, "images", "generate-image", enabled=progress)
    for pi, prompt in enumerate(prompts):
        settings = GenerationSettings(
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            guidance=guidance,
            width=width,
            height=height,
            scheduler=scheduler,
        )
        for k in range(num_images):
            # One at a time (render seeds image k with seed + k either way) to report progress.
            image = render(pipe, dataclasses.replace(settings, seed=seed + k), 1)[0]
            out.append(GeneratedImage(image, pi, settings, seed + k))
            meter.advance()
    meter.close()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        default=None,
        help="pipeline: embedded name, local diffusers directory or hub id (default: the base recorded in the first adapter, else tiny-sd)",
    )
    flags.add_adapter(parser)
    parser.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several prompts")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    parser.add_argument("--steps", type=flags.positive_int, default=25, help="denoising steps")
    parser.add_argument(
        "--guidance", type=flags.non_negative_float, default=5.0, help="classifier-free guidance scale"
    )
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), default=None, help="sampler (default: the pipeline's own)"
    )
    parser.add_argument(
        "--size", default=None, help="N or WIDTHxHEIGHT (default: the pipeline's native size)"
    )
    parser.add_argument("--num-images", type=flags.positive_int, default=1, help="images per prompt")
    flags.add_out(parser, "output directory for the PNG files (default: images)", default="images")
    flags.add_json(parser, "the written files and their settings")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")


def run(args) -> int:
    specs = parse_adapter_specs(args.adapter)  # checked before the pipeline loads
    size = parse_size(args.size)
    rt = load_image(args.base, specs, device=args.device, dtype=getattr(torch, args.dtype))
    images = generate_images(
        args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        size=size,
        num_images=args.num_images,
        scheduler=args.scheduler,
        runtime=rt,
        progress=True,
    )
    described = [{"path": s.source, "weight": s.weight} for s in specs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for g in images:
        path = out / (f"{g.prompt_index:02d}-{g.seed}.png" if len(args.prompt) > 1 else f"{g.seed}.png")
        g.image.save(path, pnginfo=g.png_info(rt.base, described))
        written.append({"path": str(path), "prompt": g.settings.prompt, "seed": g.seed})
    if args.json:
        print(json.dumps({"base": rt.base, "adapters": described, "images": written}, indent=2))
    else:
        loaded = ", ".join(f"{a.path}:{a.weight:g}" for a in rt.adapters.adapters) or "none"
        print(f"wrote {len(written)} image(s) to {out} (adapters: {loaded})")
    return 0
