"""`loraforge eval-text`: held-out loss and follow rate of an adapter on the example text task.

    loraforge eval-text --adapter runs/text/adapter            # adapter vs bare base, side by side
    loraforge eval-text                                         # the bare base alone
    loraforge eval-text --adapter a/ --base tiny-llama --data my_heldout.jsonl

Held-out loss: mean cross-entropy over the completion tokens (what training optimises).
Follow rate: share of prompts whose greedy generation follows the taught behaviour, judged by
`loraforge.examples.text.task.follows_task(prompt, generation, reference)`; "exact values" (where the
checker module has `matches_reference`) also requires the reference's values, all of them; "values
right" (with `values_right`) counts each value on its own; "distinct outputs"
counts the different answers (cut at the first stop), so a format learned without the content shows.
With `--adapter`, the bare base is measured in the same process (the adapter switched off) and the
loss drop is printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from loraforge import flags
from loraforge.errors import UserError
from loraforge.formats.io import save_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_adapter(parser, help="adapter to measure, with an optional weight; repeat to mix")
    parser.add_argument(
        "--base", default=None, help="base model (default: the adapter's recorded base, else tiny-llama)"
    )
    parser.add_argument(
        "--data", default=None, help="held-out JSONL (default: the packaged example heldout.jsonl)"
    )
    parser.add_argument(
        "--max-examples", type=flags.non_negative_int, default=0, help="use only the first N rows (0: all)"
    )
    parser.add_argument("--max-new-tokens", type=flags.positive_int, default=64)
    parser.add_argument("--batch-size", type=flags.positive_int, default=16)
    parser.add_argument("--max-length", type=flags.positive_int, default=512)
    flags.add_out(parser, "also write the figures to this JSON file")
    flags.add_json(parser, "the figures (instead of the table)")
    parser.add_argument(
        "--show", type=flags.non_negative_int, default=3, help="print this many example generations"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--trust-remote-code", action="store_true")


def _stop_token_ids(tokenizer, stops=("\n",)) -> list[int]:
    """Token ids whose text contains a stop string (the checker ignores everything after a newline)."""
    ids = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if any(s in text for s in stops):
            ids.append(token_id)
    return ids


@torch.no_grad()
def greedy_generations(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    stop_ids=(),
    label: str | None = None,
) -> list[str]:
    """Greedy continuations, batched with left padding (shortest prompts together). With `label`, a
    progress bar on stderr counts the prompts done, their rate and the time left."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    progress = tqdm(total=len(prompts), desc=label, unit="prompt", disable=label is None, file=sys.stderr)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            p = prompts[i]
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos + list(stop_ids) or None,
        )
        for r, i in enumerate(chunk):
            out[i] = tokenizer.decode(gen[r, width:], skip_special_tokens=False).replace(
                tokenizer.pad_token or "\0", ""
            )
        progress.update(len(chunk))
    progress.close()
    return out


def measure(model, tokenizer, dataset, prompts, references, args, stop_ids, label=None) -> dict:
    from loraforge.examples.text import task as checker
    from loraforge.examples.text.task import cut_generation
    from loraforge.train.text import dataset_loss

    follows_task = checker.follows_task
    exact = getattr(checker, "matches_reference", None)
    per_value = getattr(checker, "values_right", None)

    loss = dataset_loss(model, dataset, args.batch_size)
    generations = greedy_generations(
        model, tokenizer, [p for p in prompts], args.max_new_tokens, args.batch_size, stop_ids, label
    )
    prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    triples = list(zip(prompt_texts, generations, references))
    try:
        followed = [follows_task(pt, g, ref) for pt, g, ref in triples]
        matched = [exact(pt, g, ref) for pt, g, ref in triples] if exact else None
        counts = [per_value(pt, g, ref) for pt, g, ref in triples] if per_value else None
    except ValueError as e:  # references that are not the example task's (e.g. not JSON objects)
        print(f"note: follow rate not measured: {e}")
        followed, matched, counts = [False] * len(triples), None, None
    return {
        "loss": loss,
        "follow_rate": sum(followed) / len(followed),
        "followed": sum(followed),
        "examples": len(followed),
        "exact_rate": sum(matched) / len(matched) if matched is not None else None,
        "value_rate": sum(r for r, _ in counts) / max(1, sum(t for _, t in counts)) if counts else None,
        # How many different answers the prompts got: a follow rate is only as telling as this is high.
        "distinct": len({cut_generation(g) for g in generations}),
        "samples": list(zip(prompt_texts, generations, followed)),
    }


def run(args: argparse.Namespace) -> int:
    from loraforge.data.text import TextDataset, prompt_and_reference, scan_text_file
    from loraforge.runtime import load_text
    from loraforge.train.text import EXAMPLE_HELDOUT

    data = Path(args.data) if args.data else EXAMPLE_HELDOUT
    scan = scan_text_file(data)  # checked before any model is loaded
    if args.max_examples > 0:
        scan.records = scan.records[: args.max_examples]
    rt = load_text(args.base, args.adapter, args.dtype, args.trust_remote_code)
    model, tokenizer, loaded = rt.model, rt.tokenizer, rt.adapters
    model.eval()
    dataset = TextDataset(scan, tokenizer, args.max_length, "completion", packing=False)
    pairs = [prompt_and_reference(r, tokenizer) for r in scan.records]
    pairs = [p for p in pairs if p is not None]
    if not pairs:
        raise UserError(f"{data}: no prompt/completion rows to generate from")
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    stop_ids = _stop_token_ids(tokenizer)
    # With --json, stdout carries the JSON alone; the progress lines go to stderr.
    say = functools.partial(print, file=sys.stderr if args.json else sys.stdout)
    say(f"data: {data} ({len(pairs)} prompts); {rt.describe()}")

    results = {}
    if loaded:
        results["adapter"] = measure(
            model, tokenizer, dataset, prompts, references, args, stop_ids, "with adapter"
        )
        with model.disable_adapter():
            results["base"] = measure(
                model, tokenizer, dataset, prompts, references, args, stop_ids, "bare base"
            )
    else:
        results["base"] = measure(model, tokenizer, dataset, prompts, references, args, stop_ids, "bare base")

    summary = {name: {k: v for k, v in r.items() if k != "samples"} for name, r in results.items()}
    if loaded:
        summary["loss_drop_percent"] = 100 * (1 - results["adapter"]["loss"] / results["base"]["loss"])
    if args.out:
        save_json(summary, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    _print_table(results, summary, loaded, args.show)
    return 0


def _print_table(results: dict, summary: dict, loaded, show: int) -> None:
    columns = [("bare base", results["base"])] + ([("with adapter", results["adapter"])] if loaded else [])
    print()
    print(f"{'':<22}" + "".join(f"{name:>16}" for name, _ in columns))
    print(f"{'held-out loss':<22}" + "".join(f"{r['loss']:>16.4f}" for _, r in columns))
    print(f"{'follow rate':<22}" + "".join(f"{100 * r['follow_rate']:>15.1f}%" for _, r in columns))
    print(
        f"{'followed / prompts':<22}"
        + "".join(f"{str(r['followed']) + '/' + str(r['examples']):>16}" for _, r in columns)
    )
    if all(r["exact_rate"] is not None for _, r in columns):
        print(f"{'exact values':<22}" + "".join(f"{100 * r['exact_rate']:>15.1f}%" for _, r in columns))
    if all(r["value_rate"] is not None for _, r in columns):
        print(f"{'values right':<22}" + "".join(f"{100 * r['value_rate']:>15.1f}%" for _, r in columns))
    print(f"{'distinct outputs':<22}" + "".join(f"{r['distinct']:>16}" for _, r in columns))
    if loaded:
        print(f"{'loss drop':<22}{summary['loss_drop_percent']:>31.1f}%")
    shown = results["adapter" if loaded else "base"]["samples"][: max(0, show)]
    if shown:
        print("\nexamples (greedy" + (", with adapter" if loaded else "") + "):")
        for prompt, generation, ok in shown:
            print(f"  [{'ok' if ok else '--'}] {prompt.strip()!r} -> {generation.strip()!r}")
