"""`loraforge generate`: text generation from a base model with any number of adapters mixed by weight.

    loraforge generate --adapter runs/text/adapter --prompt "Describe as JSON: Kate sat in the kitchen.\\n" --greedy
    loraforge generate --base tiny-llama --adapter a/:0.7 --adapter b/:0.3 --prompt "..." --seed 1 --temperature 0.8

Adapters are loaded into one `LoraModel` and activated together with their weights
(`set_adapters`): each adapted layer computes ``W x + sum_i w_i * scale_i * B_i A_i x``. Output
streams to stdout token by token; the same `--seed` and options give the same text.
"""

from __future__ import annotations

import argparse
import sys

import torch

from loraforge.errors import UserError
from loraforge.runtime import load_text


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


def generation_kwargs(args, tokenizer) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if args.greedy:
        kwargs.update(do_sample=False)
    else:
        if args.temperature <= 0:
            raise UserError("--temperature must be > 0 (use --greedy for deterministic decoding)")
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return kwargs


def encode_prompt(prompt: str, tokenizer, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    if not args.prompt:
        raise UserError("give at least one --prompt")
    if args.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be > 0")
    rt = load_text(args.base, args.adapter, args.dtype, args.trust_remote_code)
    model, tokenizer = rt.model, rt.tokenizer
    print(
        f"{rt.describe()}; " + ("greedy" if args.greedy else f"sampling (seed {args.seed})"),
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
