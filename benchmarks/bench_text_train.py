#!/usr/bin/env python3
"""Text LoRA fine-tune: loraforge vs the standard Hugging Face route, side by side.

Both routes train the same model (the embedded tiny-llama), on the same examples (the packaged
example task, tokenized identically, loss on the completion tokens only), with the same LoRA
(r, alpha, all linear layers), optimizer (AdamW), schedule (warmup + cosine), batch size and
number of steps, so they process exactly the same real tokens:

* loraforge:  `loraforge.train.text.TextTask` + `loraforge.train.loop.train` (batches padded to
  their own longest example, length-grouped; output head and the last layer's MLP / o_proj only at
  the positions that carry loss; the fused kernels of `loraforge.kernels`);
* HF:         `transformers.Trainer` + `peft.get_peft_model`, every example padded to the longest
  example in the dataset, the model computing its own loss from `labels`.

Each measurement runs in a fresh process; the routes alternate (lf, hf, lf, hf, ...) so a load
change on a shared machine hits both, and the table shows medians.

* tokens/s: real (non-padding) tokens / time spent in training steps (from the first step's data
  fetch to the last optimizer step; model loading and tokenization excluded for both).
* tokens per CPU-second: the same tokens / CPU time the process used over the training window
  (`time.process_time`). On a shared machine wall time swings with other jobs' load; CPU time
  measures the work each route does and is far steadier.
* peak memory: peak RSS during training (up to the last optimizer step) minus RSS just before
  training starts (model and data loaded), sampled every 5 ms with psutil by a background thread;
  the table also gives the process's absolute peak RSS over the same window.

    python benchmarks/bench_text_train.py                  # 3 runs per route, 1 epoch each
    python benchmarks/bench_text_train.py --repeats 5 --max-steps 60 --threads 2
    python benchmarks/bench_text_train.py --mixed-lengths     # prompts with 0-20 context sentences
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time


class PeakRSS:
    """Peak resident memory above a baseline, sampled in a background thread."""

    def __init__(self, interval=0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.baseline = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.baseline = self.peak = self.proc.memory_info().rss
        self.cpu_start = time.process_time()
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> None:
        """Called right after the last training step: later work (saving files) is not counted."""
        if not self._stop.is_set():
            self.cpu_seconds = time.process_time() - self.cpu_start
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.set()
            self._thread.join()

    def result(self) -> tuple[float, float]:
        """(peak - baseline, peak) in MiB."""
        self.stop()
        return (self.peak - self.baseline) / 2**20, self.peak / 2**20


def hyperparameters(args) -> dict:
    return dict(
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        max_length=args.max_length,
        seed=args.seed,
    )


def run_loraforge(args) -> dict:
    from loraforge.train.config import TextTrainConfig, load_config
    from loraforge.train.loop import train
    from loraforge.train.text import TextTask

    out = tempfile.mkdtemp(prefix="bench_lf_")
    hp = hyperparameters(args)
    config = load_config(
        TextTrainConfig,
        overrides=dict(
            output_dir=out,
            max_steps=args.max_steps,
            epochs=args.epochs,
            eval_data="none",
            data=args.data or None,
            save_every=0,
            keep_last=1,
            log_every=10_000,
            progress_bar=False,
            tensorboard=False,
            threads=args.threads,
            **hp,
        ),
    )
    meter = PeakRSS()

    class Measured(TextTask):
        def build(self, accelerator):
            super().build(accelerator)
            meter.start()  # model and data are loaded: training starts now

        def save_adapter(self, directory):
            meter.stop()  # the first save is the final checkpoint, after the last step
            super().save_adapter(directory)

    task = Measured(config, log=lambda *a: None)
    result = train(task, config)
    mem, peak = meter.result()
    return dict(
        tokens=result.tokens,
        seconds=result.step_time_s,
        steps=result.steps,
        peak_mib=mem,
        peak_abs_mib=peak,
        cpu_s=meter.cpu_seconds,
        loss=result.train_loss,
    )


def run_hf(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from loraforge.bases import resolve_base
    from loraforge.data.text import IGNORE, scan_text_file, tokenize_records
    from loraforge.runtime import load_tokenizer
    from loraforge.train.text import EXAMPLE_TRAIN

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_base("tiny-llama")
    tokenizer = load_tokenizer("tiny-llama")
    # Same tokens and labels as loraforge (prompt masked), so both routes train on the same thing.
    examples, _ = tokenize_records(
        scan_text_file(args.data or EXAMPLE_TRAIN).records, tokenizer, args.max_length, "completion"
    )
    longest = max(len(e) for e in examples)
    pad = tokenizer.pad_token_id

    class Padded(torch.utils.data.Dataset):
        # The usual recipe: tokenizer(..., padding="max_length", max_length=<longest in the dataset>).
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            e = examples[i]
            n = longest - len(e)
            return {
                "input_ids": torch.tensor(e.input_ids + [pad] * n),
                "attention_mask": torch.tensor([1] * len(e) + [0] * n),
                "labels": torch.tensor(e.labels + [IGNORE] * n),
            }

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(args.seed)
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            target_modules="all-linear",
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    out = tempfile.mkdtemp(prefix="bench_hf_")
    training_args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps if args.max_steps else -1,
        num_train_epochs=args.epochs,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=args.seed,
        remove_unused_columns=False,
    )
    times = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["start"] = time.perf_counter()

        def on_step_end(self, args_, state, control, **k):
            times["end"] = time.perf_counter()
            if state.global_step >= state.max_steps:
                meter.stop()

    dataset = Padded()
    meter = PeakRSS()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[Clock()])
    meter.start()
    state = trainer.train()
    mem, peak = meter.result()
    steps = state.global_step
    # Real (non-padding) tokens seen. Whole epochs: every example once per epoch, exactly as loraforge.
    # With max_steps the draw is random, so this is the expected count.
    total = sum(len(e) for e in examples)
    real = total * args.epochs if not args.max_steps else total * steps * args.batch_size / len(examples)
    return dict(
        tokens=int(real),
        seconds=times["end"] - times["start"],
        steps=steps,
        peak_mib=mem,
        peak_abs_mib=peak,
        cpu_s=meter.cpu_seconds,
        loss=state.training_loss,
        padded_to=longest,
    )


def child(args) -> int:
    result = run_loraforge(args) if args.route == "loraforge" else run_hf(args)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def write_mixed_lengths(path: str, seed: int = 0) -> str:
    """The example rows with 0..20 context sentences (long-tailed) in front of each prompt: the spread of
    lengths real instruction data has, which is what padding to the longest example pays for."""
    import random

    from loraforge.train.text import EXAMPLE_TRAIN

    rows = [json.loads(line) for line in EXAMPLE_TRAIN.read_text().splitlines() if line.strip()]
    sentences = [r["prompt"].split(": ", 1)[1].strip() for r in rows]
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for r in rows:
            k = min(20, int(rng.expovariate(1 / 3)))
            context = " ".join(rng.choice(sentences) for _ in range(k))
            prompt = (f"Context: {context}\n" if k else "") + r["prompt"]
            fh.write(json.dumps({"prompt": prompt, "completion": r["completion"]}) + "\n")
    return path


def parent(args) -> int:
    if args.mixed_lengths:
        args.data = write_mixed_lengths(os.path.join(tempfile.mkdtemp(prefix="bench_data_"), "mixed.jsonl"))
    skip = ("route", "repeats", "mixed_lengths")
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip]
    results = {"loraforge": [], "hf": []}
    for i in range(args.repeats):
        for route in ("loraforge", "hf"):
            cmd = [sys.executable, os.path.abspath(__file__), f"--route={route}", *passthrough]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{route} run failed")
            r = json.loads(line[len("RESULT ") :])
            r["tps"] = r["tokens"] / r["seconds"]
            r["tpcpu"] = r["tokens"] / r["cpu_s"]
            results[route].append(r)
            print(
                f"run {i + 1} {route:<9}: {r['steps']} steps, {r['tokens']:,} tokens in {r['seconds']:.1f}s = "
                f"{r['tps']:,.0f} tok/s, {r['tpcpu']:,.0f} tok/CPU-s, peak +{r['peak_mib']:.0f} MiB, "
                f"train loss {r['loss']:.3f} ({'last step' if route == 'loraforge' else 'mean over the run'})",
                flush=True,
            )
    med = {
        k: {
            m: statistics.median(r[m] for r in v)
            for m in ("tps", "tpcpu", "peak_mib", "peak_abs_mib", "seconds")
        }
        for k, v in results.items()
    }
    lf, hf = med["loraforge"], med["hf"]
    print()
    print(
        f"tiny-llama, {'mixed-length variant' if args.mixed_lengths else args.data or 'example task'}, batch {args.batch_size}, r={args.lora_r}, "
        f"{'max_steps ' + str(args.max_steps) if args.max_steps else str(args.epochs) + ' epoch(s)'}, threads "
        f"{args.threads or 'default'}, medians of {args.repeats} alternating runs; HF pads to {results['hf'][0]['padded_to']} tokens"
    )
    print(
        "| route | tokens/s (wall) | tokens per CPU-second | train time (s) | peak RSS delta in training (MiB) "
        "| peak RSS of process (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in (("loraforge", lf), ("transformers.Trainer + PEFT", hf)):
        print(
            f"| {name} | {m['tps']:,.0f} | {m['tpcpu']:,.0f} | {m['seconds']:.1f} | {m['peak_mib']:.0f} "
            f"| {m['peak_abs_mib']:.0f} |"
        )
    print(
        f"| loraforge / HF | {lf['tps'] / hf['tps']:.2f}x | {lf['tpcpu'] / hf['tpcpu']:.2f}x | "
        f"{lf['seconds'] / hf['seconds']:.2f}x | {lf['peak_mib'] / hf['peak_mib']:.2f}x | "
        f"{lf['peak_abs_mib'] / hf['peak_abs_mib']:.2f}x |"
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--route", choices=["loraforge", "hf"], default=None, help="(internal) run one route in this process"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=5e-3)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="", help="training JSONL (default: the packaged example task)")
    ap.add_argument(
        "--mixed-lengths",
        action="store_true",
        help="use the example rows with 0-20 extra context sentences per prompt (a realistic spread of lengths)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads in both routes (0: torch default)")
    args = ap.parse_args()
    return child(args) if args.route else parent(args)


if __name__ == "__main__":
    sys.exit(main())
