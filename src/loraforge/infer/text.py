"""`loraforge generate`: text generation from a base model with any number of adapters mixed by weight.

    loraforge generate --adapter runs/text/adapter --prompt "Describe as JSON: Kate sat in the kitchen.\\n" --greedy
    loraforge generate --base tiny-llama --adapter a/:0.7 --adapter b/:0.3 --prompt "..." --seed 1 --temperature 0.8

Adapters are loaded into one `LoraModel` and activated together with their weights
(`set_adapters`): each adapted layer computes ``W x + sum_i w_i * scale_i * B_i A_i x``. Output
streams to stdout token by token; the same `--seed` and options give the same text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from loraforge.cli import CliError, parse_adapter_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        default=None,
        help="base model: embedded name, local dir or hub id (default: the base recorded in the first adapter, else tiny-llama)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="adapter directory with an optional weight (repeatable)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="prompt text; repeat for several (a literal \\n is a newline)",
    )
    parser.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=64)
    parser.add_argument(
        "--greedy", action="store_true", help="pick the most likely token each step (no sampling)"
    )
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=0.95)
    parser.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (same seed, same text)")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message with the tokenizer's chat template",
    )
    parser.add_argument(
        "--no-stream", dest="stream", action="store_false", help="print each generation when complete"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--trust-remote-code", action="store_true")


def default_base(adapter_specs: list[str]) -> str:
    """The base recorded in the first adapter's config, when it names something loadable; else tiny-llama."""
    from loraforge.bases import DEFAULT_TEXT_BASE, EMBEDDED_BASES

    for spec in adapter_specs[:1]:
        path, _ = parse_adapter_spec(spec)
        try:
            recorded = json.loads((Path(path) / "adapter_config.json").read_text()).get(
                "base_model_name_or_path"
            )
        except (OSError, ValueError):
            recorded = None
        if recorded and (recorded in EMBEDDED_BASES or Path(recorded).is_dir()):
            return recorded
    return DEFAULT_TEXT_BASE


def load_with_adapters(
    base: str, adapter_specs: list[str], dtype: str = "float32", trust_remote_code: bool = False
):
    """(LoraModel or plain model, tokenizer, [(name, path, weight)]) with the adapters active at their weights."""
    from loraforge import LoraModel
    from loraforge.train.text import load_base

    model, tokenizer = load_base(base, dtype, trust_remote_code)
    model.eval()
    loaded = []
    if not adapter_specs:
        return model, tokenizer, loaded
    lora = LoraModel(model)
    for i, spec in enumerate(adapter_specs):
        path, weight = parse_adapter_spec(spec)
        name = f"adapter{i}"
        lora.load_adapter(path, adapter_name=name)
        loaded.append((name, path, weight))
    lora.set_adapters([n for n, _, _ in loaded], [w for _, _, w in loaded])
    lora.eval()
    return lora, tokenizer, loaded


def generation_kwargs(args, tokenizer) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if args.greedy:
        kwargs.update(do_sample=False)
    else:
        if args.temperature <= 0:
            raise CliError("--temperature must be > 0 (use --greedy for deterministic decoding)")
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return kwargs


def encode_prompt(prompt: str, tokenizer, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise CliError("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    if not args.prompt:
        raise CliError("give at least one --prompt")
    if args.max_new_tokens <= 0:
        raise CliError("--max-new-tokens must be > 0")
    base = args.base or default_base(args.adapter)
    model, tokenizer, loaded = load_with_adapters(base, args.adapter, args.dtype, args.trust_remote_code)
    mix = ", ".join(f"{p} x{w:g}" for _, p, w in loaded) or "none"
    print(
        f"base: {base}; adapters: {mix}; " + ("greedy" if args.greedy else f"sampling (seed {args.seed})"),
        file=sys.stderr,
    )
    kwargs = generation_kwargs(args, tokenizer)
    device = next(model.parameters()).device
    for i, raw in enumerate(args.prompt):
        prompt = raw.replace("\\n", "\n")
        ids = torch.tensor([encode_prompt(prompt, tokenizer, args.chat)], device=device)
        # Seed per prompt: a prompt's text does not depend on which prompts came before it.
        torch.manual_seed(args.seed)
        if len(args.prompt) > 1:
            print(f"--- [{i + 1}] {prompt!r}", flush=True)
        streamer = (
            TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
        )
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs
            )
        if not args.stream:
            print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), flush=True)
    return 0
