#!/usr/bin/env python3
"""Image LoRA training speed: loraforge's `train-image` loop against the standard diffusers + PEFT route.

The standard route is written the way diffusers' `examples/text_to_image/train_text_to_image_lora.py`
does it: ``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian",
target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``, a DataLoader whose transform resizes,
centre-crops, converts and normalises every image on every access, and per step: VAE encode
(``latent_dist.sample()``), text encoder forward, noise + timesteps, UNet forward, MSE, backward,
grad-norm clipping, AdamW step, LR scheduler step, all under an `accelerate.Accelerator`.

loraforge's route is the real `loraforge train-image` task on the shared training loop, with the same
pipeline, data and settings (UNet LoRA on the same modules, same rank/alpha, batch size,
resolution, learning rate, no learned tokens, no text-encoder LoRA, plain MSE). What differs is
how: latents and prompt embeddings are computed once, the LoRA update is one fused multiply-add.

Each (route, round) runs in a fresh process, alternating standard / loraforge, so neither warms
caches for the other. A run times every optimizer step after `--warmup` steps; the table reports
the median over rounds of each run's median steps/s, and peak memory: the process's peak RSS and
how far training raised it above the RSS at its start (on CUDA, peak allocated GPU memory).

    python benchmarks/bench_image_train.py                    # embedded tiny-sd, example style set
    python benchmarks/bench_image_train.py --rounds 5 --steps 60 --base path/to/sd15
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STYLE = REPO / "src" / "loraforge" / "examples" / "style"
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


# -- memory ----------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> int:
    """Resets the process's peak RSS to its current RSS (Linux); returns the current RSS in KiB."""
    import torch

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return _status_kib("VmRSS")


def peaks(baseline_kib: int) -> dict:
    import torch

    out = {
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "train_rss_mib": (_status_kib("VmHWM") - baseline_kib) / 1024,
    }
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# -- the standard route ----------------------------------------------------------------------------


def run_standard(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, DiffusionPipeline
    from peft import LoraConfig
    from PIL import Image

    from loraforge.bases import resolve_base

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    accelerator = Accelerator()
    where = resolve_base(args.base)
    pipe = DiffusionPipeline.from_pretrained(where)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)

    files = sorted(STYLE.glob("*.png"))
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    res = args.resolution

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            image = Image.open(files[i]).convert("RGB")
            w, h = image.size
            scale = res / min(w, h)
            image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
            left, top = (image.size[0] - res) // 2, (image.size[1] - res) // 2
            image = image.crop((left, top, left + res, top + res))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            pixels = (pixels - 0.5) / 0.5
            ids = tokenizer(
                captions[i],
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids[0]
            return {"pixel_values": pixels, "input_ids": ids}

    loader = torch.utils.data.DataLoader(
        Data(), shuffle=True, batch_size=args.batch_size, num_workers=0, drop_last=False
    )
    total = args.warmup + args.steps + 1
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    baseline = reset_peak()
    stamps = []
    unet.train()
    step = 0
    while step < total:
        for batch in loader:
            stamps.append((time.perf_counter(), time.process_time()))
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(dtype=vae.dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
                ).long()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
                target = (
                    noise
                    if noise_scheduler.config.prediction_type == "epsilon"
                    else noise_scheduler.get_velocity(latents, noise, timesteps)
                )
                pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            float(loss)  # the example logs loss.item()-derived values every step
            step += 1
            if step >= total:
                break
    stamps.append((time.perf_counter(), time.process_time()))
    return {**_step_times(stamps, args.warmup), **peaks(baseline)}


# -- loraforge's route -----------------------------------------------------------------------------


def run_loraforge(args, out_dir: Path) -> dict:
    from loraforge.train.config import load_config
    from loraforge.train.image import ImageTask, ImageTrainConfig, load_data
    from loraforge.train.loop import train

    config = load_config(
        ImageTrainConfig,
        overrides={
            "base": args.base,
            "data": str(STYLE),
            "output_dir": str(out_dir),
            "max_steps": args.warmup + args.steps + 1,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "lora_r": args.rank,
            "lora_alpha": args.rank,
            "target_modules": TARGETS,
            "placeholder_tokens": [],
            "caption_template": "{caption}",
            "caption_templates": [],  # one prompt per image, as the standard route trains
            "instance_prompt": "a picture",
            "snr_gamma": 0.0,
            "schedule": "constant",
            "resolution": args.resolution,
            "save_every": 0,
            "eval_every": 0,
            "sample_every": 0,
            "validation_steps": 1,
            "progress_bar": False,
            "tensorboard": False,
            "threads": args.threads,
            "seed": args.seed,
            "log_every": 1000,
        },
    )
    records, _ = load_data(config)
    stamps: list[tuple[float, float]] = []
    state = {}

    class TimedTask(ImageTask):
        def build(self, accelerator=None):
            super().build(accelerator)
            state["baseline"] = reset_peak()

        def loss(self, batch):
            stamps.append((time.perf_counter(), time.process_time()))
            return super().loss(batch)

        def eval_loss(self):
            stamps.append((time.perf_counter(), time.process_time()))  # end of the last step
            return None

    task = TimedTask(config, records)
    task.log = lambda *a, **k: None
    train(task, config)
    result = peaks(state["baseline"])
    return {**_step_times(stamps[: args.warmup + args.steps + 2], args.warmup), **result}


def _step_times(stamps: list[tuple[float, float]], warmup: int) -> dict:
    """Wall-clock and CPU seconds of each step after the warmup."""
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][warmup:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][warmup:]
    return {"step_times": wall, "step_cpu_times": cpu}


# -- driver ----------------------------------------------------------------------------------------


def one_run(args) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = run_standard(args) if args.route == "standard" else run_loraforge(args, Path(tmp))
    print("RESULT " + json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny-sd", help="pipeline (default: the embedded tiny-sd)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds (each runs both routes once)"
    )
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for PyTorch, the same for both routes"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--route", choices=["standard", "loraforge"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.route:
        one_run(args)
        return 0

    results: dict[str, list[dict]] = {"standard": [], "loraforge": []}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    passthrough = [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("route", "rounds")
    ]
    for r in range(args.rounds):
        for route in ("standard", "loraforge"):
            t0 = time.time()
            proc = subprocess.run(
                [sys.executable, __file__, f"--route={route}", *passthrough],
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{route} run failed (exit {proc.returncode})")
            result = json.loads(line[len("RESULT ") :])
            result["steps_per_s"] = 1.0 / statistics.median(result["step_times"])
            result["steps_per_cpu_s"] = 1.0 / statistics.median(result["step_cpu_times"])
            results[route].append(result)
            print(
                f"round {r + 1}/{args.rounds} {route:<9} {result['steps_per_s']:7.2f} steps/s "
                f"({result['steps_per_cpu_s']:.2f} per CPU-second) "
                f"(peak RSS {result['peak_rss_mib']:.0f} MiB, +{result['train_rss_mib']:.0f} MiB in training; "
                f"{time.time() - t0:.0f}s with start-up)",
                flush=True,
            )

    def med(route, key):
        return statistics.median(r[key] for r in results[route])

    print()
    print(
        f"tiny pipeline {args.base}, example style set, batch {args.batch_size}, {args.resolution}px, rank {args.rank}, "
        f"{args.threads} thread(s), {args.rounds} alternating rounds of {args.steps} timed steps"
    )
    header = (
        f"| {'route':<32} | {'steps/s (median)':>16} | {'steps/CPU-s (median)':>20} | {'peak RSS MiB':>12} "
        f"| {'training +RSS MiB':>17} |"
    )
    cuda = "cuda_peak_mib" in results["standard"][0]
    if cuda:
        header += f" {'CUDA peak MiB':>13} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for route, label in (("standard", "diffusers + PEFT (standard)"), ("loraforge", "loraforge train-image")):
        row = (
            f"| {label:<32} | {med(route, 'steps_per_s'):>16.2f} | {med(route, 'steps_per_cpu_s'):>20.2f} | "
            f"{med(route, 'peak_rss_mib'):>12.0f} | {med(route, 'train_rss_mib'):>17.0f} |"
        )
        if cuda:
            row += f" {med(route, 'cuda_peak_mib'):>13.1f} |"
        print(row)
    speedup = med("loraforge", "steps_per_s") / med("standard", "steps_per_s")
    cpu_speedup = med("loraforge", "steps_per_cpu_s") / med("standard", "steps_per_cpu_s")
    print(
        f"\nloraforge / standard: {speedup:.2f}x steps/s (wall clock), {cpu_speedup:.2f}x steps per CPU-second"
    )
    print(
        "(CPU time is what a step costs the process; on a machine shared with other work it is the steadier figure)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
