"""The text serving engine alone (no HTTP): continuous batching with many adapters against one adapter,
the bare base, and swapping adapters per request.

    python benchmarks/bench_serve_engine.py                          # 4-layer 256-wide Llama, CPU
    python benchmarks/bench_serve_engine.py --device cuda --layers 16 --hidden 2048 --jobs 256 --max-batch 64
    python benchmarks/bench_serve_engine.py --jobs 8 --tokens 4 --adapters 2 --swap-jobs 2   # smoke run

Every scenario runs the same jobs (same prompts, greedy, same lengths) through `TextEngine` with its
step thread, all submitted at once (`--arrival-ms` spaces them out):
  - base:      every job on the bare base
  - single:    every job on one adapter
  - mixed-K:   jobs spread round-robin over K adapters (K = --adapters), each row its own adapter
  - mixes-K:   every job a weighted mix of two of the K adapters (different pairs)
  - swap:      the route without mixed batches: for each job, `set_adapter` then `generate` alone
               (`--swap-jobs` of them, as it is slow)
Reports tokens/s, jobs/s, p50/p99 job latency, and throughput relative to `single` and `base`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build(args):
    from bench_engine import build_base

    from loraforge import LoraConfig, LoraModel

    base = build_base(args, max_positions=args.prompt + args.tokens + 8)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = LoraModel(base.to(device=args.device, dtype=dtype))
    for i in range(args.adapters):
        model.add_adapter(
            f"a{i}", LoraConfig(r=args.rank, target_modules=args.targets.split(","), init_lora_weights=False)
        )
    return model, IdTokenizer()


class IdTokenizer:
    """Stands in for a tokenizer of the random model: token i decodes to "<i>" (the engine only decodes)."""

    pad_token_id, eos_token_id = 0, None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def jobs_for(args, mixes):
    from loraforge.serve.text import TextJob

    g = torch.Generator().manual_seed(1)
    return [
        TextJob(
            torch.randint(4, args.vocab, (args.prompt,), generator=g).tolist(),
            mixes[i % len(mixes)],
            max_tokens=args.tokens,
            temperature=0,
        )
        for i in range(args.jobs)
    ]


def run_engine(model, tokenizer, args, jobs) -> dict:
    from loraforge.serve.text import TextEngine

    engine = TextEngine(model, tokenizer, max_batch=args.max_batch, max_loras=args.max_loras).start()
    try:
        start = time.perf_counter()
        handles = []
        for job in jobs:
            handles.append(engine.submit(job))
            if args.arrival_ms:
                time.sleep(args.arrival_ms / 1000)
        for handle in handles:
            handle.wait()
            assert handle.finish_reason == "length", handle.error
        elapsed = max(h.finished_at for h in handles) - start
    finally:
        engine.stop()
    latencies = [h.finished_at - h.submitted_at for h in handles]
    first = [h.first_token_at - h.submitted_at for h in handles]
    return summary(elapsed, sum(len(h.token_ids) for h in handles), latencies, len(jobs), first)


def run_swap(model, args, jobs) -> dict:
    """One job at a time: activate its adapter, `generate` alone (what a server without mixed
    batches does per request)."""
    start, latencies, tokens = time.perf_counter(), [], 0
    for job in jobs:
        t0 = time.perf_counter()
        model.set_adapter(job.mix)
        x = torch.tensor([job.prompt_ids], device=args.device)
        with torch.no_grad():
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=job.max_tokens,
                min_new_tokens=job.max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        tokens += out.shape[1] - x.shape[1]
        latencies.append(time.perf_counter() - t0)
    return summary(time.perf_counter() - start, tokens, latencies, len(jobs), None)


def summary(elapsed, tokens, latencies, jobs, first) -> dict:
    return {
        "tokens_per_s": tokens / elapsed,
        "jobs_per_s": jobs / elapsed,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 0.99),
        "ttft_p50_s": statistics.median(first) if first else float("nan"),
    }


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per job")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per job")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--arrival-ms", type=float, default=0.0, help="time between submissions")
    parser.add_argument("--swap-jobs", type=int, default=8, help="jobs for the swap route (0: skip it)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = build(args)
    names = [f"a{i}" for i in range(args.adapters)]
    k = len(names)
    scenarios = {
        "base": [()],
        "single": [names[0]],
        f"mixed-{k}": names,
        f"mixes-{k}": [((names[i], 0.7), (names[(i + 1) % k], 0.3)) for i in range(k)] if k > 1 else names,
    }
    run_engine(model, tokenizer, args, jobs_for(args, [names[0]])[: max(2, args.max_batch // 4)])  # warm-up
    results = {
        name: run_engine(model, tokenizer, args, jobs_for(args, mixes)) for name, mixes in scenarios.items()
    }
    if args.swap_jobs:
        swap_args = argparse.Namespace(**{**vars(args), "jobs": args.swap_jobs})
        results["swap"] = run_swap(model, args, jobs_for(swap_args, names))
    print(
        f"Llama {args.layers}x{args.hidden}, {args.dtype} on {args.device}; rank {args.rank} on {args.targets}; "
        f"{args.jobs} jobs x ({args.prompt} prompt + {args.tokens} new tokens), max_batch {args.max_batch}"
    )
    print(
        f"{'scenario':<12}{'tok/s':>10}{'jobs/s':>9}{'p50 s':>9}{'p99 s':>9}{'ttft p50':>10}"
        f"{'/single':>9}{'/base':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<12}{r['tokens_per_s']:>10.1f}{r['jobs_per_s']:>9.2f}{r['p50_s']:>9.3f}{r['p99_s']:>9.3f}"
            f"{r['ttft_p50_s']:>10.3f}"
            f"{r['tokens_per_s'] / results['single']['tokens_per_s']:>9.2f}"
            f"{r['tokens_per_s'] / results['base']['tokens_per_s']:>8.2f}"
        )


if __name__ == "__main__":
    main()
