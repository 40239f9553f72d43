"""Image requests for 4 different LoRAs: one shared UNet batch (`ImageEngine`) against the same 4 run one by one.

    python benchmarks/bench_serve_images.py                    # embedded tiny-sd, 20 steps, 5 rounds
    python benchmarks/bench_serve_images.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --device cuda --dtype float16 --size 512 --steps 25
    python benchmarks/bench_serve_images.py --quick            # smoke run: 2 steps, 1 round

Each request uses its own adapter (random rank-R LoRA on the UNet's attention and the text encoders'
attention, written as diffusers files and loaded by `ImageEngine.load`; every other one also has learned
tokens, used in its prompt), its own seed and classifier-free guidance. Contenders, each making the same
4 images, alternated within every round (their order rotated round by round), one warm-up round first:

  batched        the 4 requests submitted together: one engine batch, 8 UNet rows per step
  engine 1x1     the 4 requests through the engine one at a time (each waits for the previous)
  pipeline 1x1   the single-request path on a second copy of the pipeline with the 4 adapters loaded:
                 per request, make its adapter the active one (and write its tokens), then call
                 the pipeline as `loraforge.runtime.render` does (float output, for the check)

Reported: the median seconds per round of 4 images, images/s, and the speed-up of batched over each
one-by-one route (goal: at least 2x over pipeline 1x1). The batched images are checked against the
pipeline's (max abs difference of float pixels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

GOAL = 2.0
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def random_lora(pipe, seed: int, rank: int, tokens: tuple[str, ...]):
    """A random ImageLora for `pipe` (seeded), strong enough to change the image."""
    from loraforge.formats.image_lora import ImageLora, ModuleLora, canonical_name
    from loraforge.model import base_modules

    g = torch.Generator().manual_seed(seed)
    lora = ImageLora(tokens=list(tokens))
    for component in ("unet", *TEXT_COMPONENTS):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        suffixes = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        modules = {}
        for name, m in base_modules(model):
            if isinstance(m, nn.Linear) and any(name.endswith("." + s) for s in suffixes):
                modules[canonical_name(component, model, name)] = ModuleLora(
                    down=torch.randn((rank, m.in_features), generator=g) / m.in_features**0.5,
                    up=torch.randn((m.out_features, rank), generator=g) * 0.3 / rank**0.5,
                    alpha=float(rank),
                )
        lora.components[component] = modules
        if tokens and component != "unet":
            dim = model.get_input_embeddings().weight.shape[1]
            lora.embeddings[component] = torch.randn((len(tokens), dim), generator=g) * 0.02
    return lora


def requests(args, names):
    from loraforge.serve.image import ImageJob

    jobs = []
    for i, name in enumerate(names):
        style = f" in the style of <{name}-a><{name}-b>" if i % 2 == 0 else ""
        jobs.append(
            ImageJob(
                prompt=f"a photo of a red circle on a blue square{style}",
                negative_prompt="blurry",
                mix=name,
                seed=100 + i,
                steps=args.steps,
                guidance=args.guidance,
                width=args.width,
                height=args.height,
                output="np",
            )
        )
    return jobs


class PipelineRoute:
    """One request at a time on a plain pipeline: activate the request's adapter, then render."""

    def __init__(self, pipe, dirs: dict[str, Path]):
        from loraforge.runtime import PipelineAdapters

        self.pipe = pipe
        self.adapters = PipelineAdapters(pipe)
        self.loaded = {name: self.adapters.load(str(path), name) for name, path in dirs.items()}

    def run(self, job):
        from loraforge.runtime import add_tokens

        for model in self.adapters.models.values():
            names = [job.mix] if job.mix in model.peft_config else []
            model.set_adapters(names, [1.0] * len(names))
        lora = self.loaded[job.mix].lora
        if lora.tokens:
            add_tokens(self.pipe, lora.tokens, {c: v.float() for c, v in lora.embeddings.items()})
        with torch.no_grad():
            return self.pipe(
                prompt=job.prompt,
                negative_prompt=job.negative_prompt,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance,
                width=job.width,
                height=job.height,
                generator=torch.Generator("cpu").manual_seed(job.seed),
                output_type="np",
            ).images[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny-sd", help="pipeline: embedded name, directory or hub id")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the pipeline's native)")
    parser.add_argument("--requests", type=int, default=4, help="requests, each with its own LoRA")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: load_pipeline's choice)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 round")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 2, 1

    from loraforge.formats import write_image_lora
    from loraforge.runtime import DTYPES, PipelineAdapters, load_pipeline, native_size
    from loraforge.serve.image import ImageEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    pipe = load_pipeline(args.base, device=device, dtype=dtype, threads=args.threads)
    other = load_pipeline(args.base, device=device, dtype=dtype, threads=args.threads)
    args.width, args.height = (args.size, args.size) if args.size else native_size(pipe)

    names = [f"style{i}" for i in range(args.requests)]
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-images-"))
    dirs = {}
    for i, name in enumerate(names):
        tokens = (f"<{name}-a>", f"<{name}-b>") if i % 2 == 0 else ()
        write_image_lora(workdir / name, random_lora(pipe, i, args.rank, tokens))
        dirs[name] = workdir / name
    engine = ImageEngine(pipe, PipelineAdapters(pipe), max_batch=2 * args.requests, window_ms=5)
    for name, path in dirs.items():
        engine.load(name, path)
    engine.start()
    route = PipelineRoute(other, dirs)
    jobs = requests(args, names)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def batched():
        handles = [engine.submit(job) for job in jobs]
        return [h.result()[0] for h in handles]

    def engine_serial():
        return [engine.submit(job).result()[0] for job in jobs]

    def pipeline_serial():
        return [route.run(job) for job in jobs]

    contenders = {"batched": batched, "engine 1x1": engine_serial, "pipeline 1x1": pipeline_serial}
    times = {name: [] for name in contenders}
    outputs = {}
    order = list(contenders)
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in order:
            sync()
            start = time.perf_counter()
            outputs[name] = contenders[name]()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
        order = order[1:] + order[:1]
    engine.stop()

    batches = list(engine.batches)
    shared = sum(1 for b in batches if b[0] == args.requests)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs["batched"], outputs["pipeline 1x1"]))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"base {args.base} on {device} ({args.dtype}), {args.width}x{args.height}, {args.steps} steps, "
        f"guidance {args.guidance:g}, {args.requests} requests with {args.requests} LoRAs (rank {args.rank}), "
        f"{args.rounds} round(s); batches of all {args.requests} requests: {shared}"
    )
    print(f"| {'route':<14} | {'s per round (median)':>20} | {'images/s':>9} | {'batched speed-up':>16} |")
    print(f"|{'-' * 16}|{'-' * 22}|{'-' * 11}|{'-' * 18}|")
    for name, median in medians.items():
        speedup = median / medians["batched"]
        print(f"| {name:<14} | {median:>20.3f} | {args.requests / median:>9.2f} | {speedup:>15.2f}x |")
    ratio = medians["pipeline 1x1"] / medians["batched"]
    verdict = "meets" if ratio >= GOAL else "misses"
    print(f"batched vs pipeline one by one: {ratio:.2f}x ({verdict} the {GOAL:g}x goal)")
    print(f"max abs pixel difference, batched vs pipeline: {diff:.2e}")
    if args.json:
        print(
            json.dumps(
                {
                    "base": args.base,
                    "device": device,
                    "steps": args.steps,
                    "size": [args.width, args.height],
                    "requests": args.requests,
                    "rounds": args.rounds,
                    "seconds": times,
                    "median_seconds": medians,
                    "speedup_vs_pipeline": ratio,
                    "max_abs_pixel_difference": diff,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
