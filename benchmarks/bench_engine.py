"""The LoRA engine against Hugging Face PEFT on the same model, config and inputs.

    python benchmarks/bench_engine.py                 # 4-layer, 256-wide Llama, r=16 on all linear layers
    python benchmarks/bench_engine.py --repeats 30 --threads 2

Measures, alternating loraforge / PEFT / bare base in every round and reporting medians:
  - training step: forward + backward + AdamW step on the adapter parameters
  - unmerged forward (no grad) of one adapter, and its overhead over the bare base model
  - a mixed batch: 8 rows, each with its own adapter (8 adapters), in one forward pass
  - merge + unmerge of the adapter into the base weights
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_base(args, max_positions: int = 1024):
    """A random Llama of `args.vocab`, `args.hidden` (heads of 64) and `args.layers` (also used by
    bench_serve_engine.py)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(config).eval()


def timed(fn, warmup=False):
    if warmup:
        fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import peft

    from loraforge import LoraConfig, get_lora_model

    def lf_config():
        return LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False
        )

    def peft_config():
        return peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False
        )

    base = build_base(args)
    bare = copy.deepcopy(base)
    ours = get_lora_model(copy.deepcopy(base), lf_config())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config())
    names = [f"a{i}" for i in range(8)]
    ours_multi = get_lora_model(copy.deepcopy(base), lf_config(), adapter_name=names[0])
    theirs_multi = peft.get_peft_model(copy.deepcopy(base), peft_config(), adapter_name=names[0])
    for n in names[1:]:
        ours_multi.add_adapter(n, lf_config())
        theirs_multi.add_adapter(n, peft_config())

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    mixed_ids = torch.randint(0, args.vocab, (8, args.seq), generator=g)

    def train_step(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def forward(model, **kw):
        def run():
            with torch.inference_mode():
                model(input_ids=kw.get("x", ids), **{k: v for k, v in kw.items() if k != "x"})

        return run

    def merge_cycle(model):
        def run():
            model.merge_adapter()
            model.unmerge_adapter()

        return run

    for m in (bare, ours, theirs, ours_multi, theirs_multi):
        m.eval()
    cases = {
        "training step": {"loraforge": train_step(ours), "peft": train_step(theirs)},
        "forward, 1 adapter (unmerged)": {
            "loraforge": forward(ours),
            "peft": forward(theirs),
            "bare base": forward(bare),
        },
        "mixed batch, 8 adapters": {
            "loraforge": forward(ours_multi, x=mixed_ids, adapter_names=names),
            "peft": forward(theirs_multi, x=mixed_ids, adapter_names=names),
            "bare base": forward(bare, x=mixed_ids),
        },
        "merge + unmerge": {"loraforge": merge_cycle(ours), "peft": merge_cycle(theirs)},
    }
    results = {case: {k: [] for k in fns} for case, fns in cases.items()}
    for case, fns in cases.items():
        for fn in fns.values():
            timed(fn, warmup=True)
        for _ in range(args.repeats):
            for who, fn in fns.items():  # alternate so drift in machine load hits every contender alike
                results[case][who].append(timed(fn))

    print(
        f"\nmodel: Llama {args.layers} layers x {args.hidden} wide, vocab {args.vocab}; LoRA r={args.rank} on all linear layers"
    )
    print(
        f"inputs: batch {args.batch} x {args.seq} tokens (mixed batch: 8 rows); {args.threads} threads; medians of {args.repeats}"
    )
    print(f"torch {torch.__version__}, peft {peft.__version__}\n")
    print(
        f"| {'measure':<30} | {'loraforge':>12} | {'peft':>12} | {'bare base':>12} | {'loraforge/peft':>14} | {'overhead vs base (lf / peft)':>28} |"
    )
    print(f"|{'-' * 32}|{'-' * 14}|{'-' * 14}|{'-' * 14}|{'-' * 16}|{'-' * 30}|")
    for case, by in results.items():
        med = {k: statistics.median(v) * 1000 for k, v in by.items()}
        base_ms = med.get("bare base")
        overhead = (
            f"{100 * (med['loraforge'] / base_ms - 1):+.1f}% / {100 * (med['peft'] / base_ms - 1):+.1f}%"
            if base_ms
            else "-"
        )
        base_text = f"{base_ms:.2f} ms" if base_ms else "-"
        print(
            f"| {case:<30} | {med['loraforge']:>9.2f} ms | {med['peft']:>9.2f} ms | {base_text:>12} | {med['loraforge'] / med['peft']:>13.2f}x | {overhead:>28} |"
        )


if __name__ == "__main__":
    main()
