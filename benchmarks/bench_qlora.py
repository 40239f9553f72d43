#!/usr/bin/env python3
"""QLoRA memory and speed: a 1B-class Llama with an fp32, bf16, nf4 and int8 frozen base, loraforge
against PEFT + bitsandbytes with the same settings, side by side.

The model is built from a config with random weights (hidden 2048, 16 layers, intermediate 5632,
32 heads / 4 KV heads, vocab 32000: 0.84B parameters: TinyLlama-1.1B's shape with 16 of its 22 layers) and saved
once as a bf16 checkpoint, so that every run loads it the way a user loads a base: through
`from_pretrained`, quantized tensor by tensor for nf4 / int8 (`BitsAndBytesConfig`; 4-bit: double
quantization, bf16 compute; both: unquantized layers (embeddings, norms, head) in bf16).

Every run: LoRA r=16, alpha 32 on all linear layers, gradient checkpointing (non-reentrant), fused
AdamW (lr 1e-4), batch 1 of 256 random tokens; each library's own training step: for loraforge what
`loraforge train` runs (`causal_lm_loss`, whose output head and softmax go a chunk of positions at a
time, and `make_optimizer`), for PEFT a plain transformers step (the model's loss from `labels=`, as
the Trainer computes it); the same loss either way (the printed losses agree), then backward and
the optimizer step. loraforge loads through `loraforge.runtime.load_text_model`, PEFT through
transformers' `from_pretrained` + `peft.get_peft_model` (without `prepare_model_for_kbit_training`,
which would upcast every unquantized weight to fp32 and only add memory to PEFT's column).

Each (base, library) runs in a fresh process, alternating libraries, so one cannot inflate another's
memory. With `--rounds N` every run is repeated N times, the libraries swapping order each round (the
machine's speed drifts); the table then gives the median of each rate, the largest of each peak, and
the loraforge / PEFT speed ratio of every round. Peak memory is the process's resident set (Python,
libraries, model, everything), sampled every 10 ms from the end of loading to the last optimizer step:
"peak RSS" (VmRSS) and its anonymous part ("anon": RSS less file-backed pages such as a memory-mapped
checkpoint, which the kernel can drop).
The loading transient (VmHWM at the end of loading: while quantizing, the checkpoint's mapped pages
are resident too) is reported separately.

    nice python benchmarks/bench_qlora.py                        # all 8 runs, ~5 min on 2 CPU cores
    nice python benchmarks/bench_qlora.py --rounds 5             # medians of 5 alternated rounds, ~25 min
    python benchmarks/bench_qlora.py --bases nf4 --libs loraforge --layers 2 --warmup 0 --steps 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BASES = ("fp32", "bf16", "nf4", "int8")
LIBS = ("loraforge", "peft")
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def status_gb() -> dict[str, float]:
    """VmRSS, RssAnon and VmHWM of this process, in GiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                out[key] = int(value.split()[0]) / 2**20
    return out


class Peak:
    """Peak VmRSS and RssAnon, sampled by a background thread."""

    def __init__(self, interval=0.01):
        self.interval, self.rss, self.anon = interval, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        s = status_gb()
        self.rss, self.anon = max(self.rss, s["VmRSS"]), max(self.anon, s["RssAnon"])

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def build_checkpoint(directory: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {directory}: {params / 1e9:.2f}B parameters", flush=True)


def run_one(lib: str, base: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = "float32" if base == "fp32" else "bfloat16"
    quantize = {"nf4": "nf4", "int8": "int8"}.get(base, "none")
    started = time.perf_counter()
    if lib == "loraforge":
        from loraforge import LoraConfig, get_lora_model

        if args.low_memory:  # what `low_memory: true` in a training config does
            from loraforge.runtime import return_freed_memory

            return_freed_memory()
        from loraforge.runtime import load_text_model, prepare_4bit_cpu_training
        from loraforge.train.task import enable_activation_checkpointing

        model, _ = load_text_model(
            args.model_dir, dtype, require_tokenizer=False, quantize=quantize, compute_dtype="bfloat16"
        )
        model.config.use_cache = False
        enable_activation_checkpointing(model)
        model = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        prepare_4bit_cpu_training(model)  # what `loraforge train` does (only for a 4-bit base on CPU)
    else:
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kwargs = dict(dtype=getattr(torch, dtype))
        if quantize == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        elif quantize == "int8":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if quantize != "none":
            kwargs["device_map"] = {"": "cpu"}
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs)
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    load_s = time.perf_counter() - started
    loaded = status_gb()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if lib == "loraforge":  # what `loraforge train` runs: its optimizer and its loss step
        from loraforge.optim import make_optimizer
        from loraforge.train.text import causal_lm_loss

        optimizer = make_optimizer("adamw", [{"params": params}], lr=1e-4)

        def loss_of(ids):
            return causal_lm_loss(
                model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            )[0]
    else:  # a plain transformers step (what the Trainer runs): the model's own loss
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def loss_of(ids):
            return model(input_ids=ids, labels=ids).loss

    generator = torch.Generator().manual_seed(0)
    steps = args.warmup + args.steps
    batches = [
        torch.randint(0, SHAPE["vocab_size"], (1, args.seq), generator=generator) for _ in range(steps)
    ]
    losses, t0 = [], None
    with Peak() as peak:
        for i, ids in enumerate(batches):
            if i == args.warmup:
                t0, cpu0 = time.perf_counter(), time.process_time()
                faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            loss = loss_of(ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return dict(
        lib=lib,
        base=base,
        tokens_per_s=args.steps * args.seq / elapsed,
        s_per_step=elapsed / args.steps,
        peak_gb=peak.rss,
        peak_anon_gb=peak.anon,
        loaded_gb=loaded["VmRSS"],
        load_hwm_gb=loaded["VmHWM"],
        tokens_per_cpu_s=args.steps * args.seq / cpu,
        page_faults_per_step=faults / args.steps,
        load_s=load_s,
        trainable=sum(p.numel() for p in params),
        losses=losses,
    )


def summarize(results: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (base, library) over the rounds: the median of each rate, the largest of each peak."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["base"], r["lib"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        agg = {
            k: statistics.median(r[k] for r in runs)
            for k in ("tokens_per_s", "tokens_per_cpu_s", "s_per_step")
        }
        agg.update({k: max(r[k] for r in runs) for k in ("peak_gb", "peak_anon_gb", "load_hwm_gb")})
        agg["rounds"] = len(runs)
        out[key] = agg
    return out


def speed_ratios(results: list[dict], base: str) -> list[float]:
    """loraforge / PEFT tokens/s of each round that ran both on `base`."""
    by_round = {}
    for r in results:
        if r["base"] == base:
            by_round.setdefault(r["round"], {})[r["lib"]] = r["tokens_per_s"]
    return [v["loraforge"] / v["peft"] for v in by_round.values() if len(v) == 2]


def table(results: list[dict]) -> str:
    by = summarize(results)
    bases = [b for b in BASES if any(k[0] == b for k in by)]
    fp32 = {lib: by[("fp32", lib)]["peak_gb"] for lib in LIBS if ("fp32", lib) in by}
    rounds = max(r["rounds"] for r in by.values()) if by else 0
    lines = [
        f"{rounds} round(s); rates: median over the rounds; peaks: the largest",
        "",
        "| base | peak RSS GB (lf / PEFT) | anon GB (lf / PEFT) | tokens/s (lf / PEFT) | lf / PEFT tokens/s "
        "(median, each round) | tokens per CPU-s (lf / PEFT) | lf peak / lf fp32 | loading peak GB (lf / PEFT) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in bases:
        lf, pf = by.get((b, "loraforge")), by.get((b, "peft"))

        def cell(r, key, fmt):
            return format(r[key], fmt) if r else "-"

        ratio = f"{lf['peak_gb'] / fp32['loraforge']:.2f}x" if lf and "loraforge" in fp32 else "-"
        speed = speed_ratios(results, b)
        speed_cell = (
            f"{statistics.median(speed):.2f}x ({', '.join(f'{x:.2f}' for x in speed)})" if speed else "-"
        )

        def pair(key, fmt, lf=lf, pf=pf):
            return f"{cell(lf, key, fmt)} / {cell(pf, key, fmt)}"

        lines.append(
            f"| {b} | {pair('peak_gb', '.2f')} | {pair('peak_anon_gb', '.2f')} | {pair('tokens_per_s', '.1f')} "
            f"| {speed_cell} | {pair('tokens_per_cpu_s', '.1f')} | {ratio} | {pair('load_hwm_gb', '.2f')} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    parser.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every run; the libraries swap order each round"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model-dir", default=None, help="checkpoint to reuse (built if missing)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="loraforge runs with low_memory (glibc returns freed memory)",
    )
    parser.add_argument("--one", nargs=2, metavar=("LIB", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args)), flush=True)
        return 0
    args.model_dir = args.model_dir or f"/tmp/loraforge-bench-llama-{args.layers}l"
    if not (Path(args.model_dir) / "config.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import bench_qlora as b; b.build_checkpoint(b.Path({args.model_dir!r}), {args.layers})",
            ],
            cwd=Path(__file__).parent,
            check=True,
        )
    results = []
    passthrough = ["--layers", str(args.layers), "--seq", str(args.seq), "--warmup", str(args.warmup)]
    passthrough += ["--steps", str(args.steps), "--threads", str(args.threads), "--model-dir", args.model_dir]
    passthrough += ["--low-memory"] if args.low_memory else []
    for round_ in range(args.rounds):
        for base in args.bases:
            # Alternate which library goes first, so that drift in the machine's speed evens out.
            for lib in args.libs if round_ % 2 == 0 else args.libs[::-1]:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", lib, base, *passthrough],
                    capture_output=True,
                    text=True,
                )
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode or not lines:
                    print(f"{lib} / {base} failed:\n{out.stderr[-3000:]}", flush=True)
                    continue
                r = json.loads(lines[-1][len("RESULT ") :])
                r["round"] = round_
                results.append(r)
                print(
                    f"round {round_} {base:5s} {lib:9s} peak {r['peak_gb']:.2f} GB (anon {r['peak_anon_gb']:.2f}, "
                    f"after load {r['loaded_gb']:.2f}, loading peak {r['load_hwm_gb']:.2f}), "
                    f"{r['tokens_per_s']:.1f} tok/s, {r['s_per_step']:.1f} s/step, "
                    f"{r['page_faults_per_step'] / 1000:.0f}k page faults/step, loss {r['losses']}",
                    flush=True,
                )
    print()
    print(
        f"{args.layers} layers, {args.seq} tokens, batch 1, {args.warmup} warmup + {args.steps} timed steps, "
        f"{args.threads} threads"
    )
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
