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
from dataclasses import dataclass, replace

import torch

from loraforge import flags
from loraforge.errors import ConfigError, UserError
from loraforge.runtime import TextRuntime, load_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        default=None,
        help="base model: embedded name, local dir or hub id (default: the base recorded in the first adapter, else tiny-llama)",
    )
    flags.add_adapter(parser)
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="prompt text; repeat for several (a literal \\n is a newline)",
    )
    parser.add_argument("--max-new-tokens", type=flags.positive_int, default=64)
    parser.add_argument(
        "--greedy", action="store_true", help="pick the most likely token each step (no sampling)"
    )
    parser.add_argument(
        "--temperature", type=flags.positive_float, default=0.8, help="sampling temperature (> 0)"
    )
    parser.add_argument(
        "--top-p", type=flags.probability, default=0.95, help="nucleus sampling mass, in (0, 1]"
    )
    parser.add_argument(
        "--top-k",
        type=flags.non_negative_int,
        default=50,
        help="sample from the k most likely tokens (0: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (same seed, same text)")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message with the tokenizer's chat template",
    )
    parser.add_argument(
        "--no-stream", dest="stream", action="store_false", help="print each generation when complete"
    )
    flags.add_json(parser, "the prompts and their generations (implies --no-stream)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "nf4", "fp4", "int8"],
        help="load the base's linear layers quantized by bitsandbytes (QLoRA); needs loraforge[quant]",
    )
    parser.add_argument("--trust-remote-code", action="store_true")


@dataclass
class SamplingSettings:
    """How each prompt is continued. The same settings and seed give the same text."""

    max_new_tokens: int = 64
    greedy: bool = False  # the most likely token at each step; the sampling fields are then unused
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 50  # 0: no top-k cut
    seed: int = 0
    chat: bool = False  # wrap each prompt as a user message with the tokenizer's chat template

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not self.greedy:
            if not self.temperature > 0:
                raise ConfigError(
                    f"temperature must be > 0, got {self.temperature} (use greedy for deterministic decoding)"
                )
            if not 0 < self.top_p <= 1:
                raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise ConfigError(f"top_k must be >= 0, got {self.top_k}")

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        if self.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def encode_prompt(prompt: str, tokenizer, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def complete(rt: TextRuntime, prompts: list[str], settings: SamplingSettings, streamer_for=None) -> list[str]:
    """The continuation of each prompt by `rt.model` (its adapters at their weights).

    `streamer_for(i)` may return a transformers streamer that receives prompt i's tokens as they come."""
    settings.validate()
    model, tokenizer = rt.model, rt.tokenizer
    kwargs = settings.generate_kwargs(tokenizer)
    device = next(model.parameters()).device
    texts = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([encode_prompt(prompt, tokenizer, settings.chat)], device=device)
        # Seed per prompt: a prompt's text does not depend on which prompts came before it.
        torch.manual_seed(settings.seed)
        streamer = streamer_for(i) if streamer_for else None
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs
            )
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def generate_text(
    prompts: str | list[str],
    base: str | None = None,
    adapters=(),
    settings: SamplingSettings | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    quantize: str = "none",
    **setting_overrides,
) -> list[str]:
    """Generates a continuation of each prompt from `base` with `adapters` (``SOURCE[:WEIGHT]``
    strings or AdapterSpecs) mixed by weight. Sampling settings come as a `SamplingSettings` or as
    keywords (``greedy=True``, ``max_new_tokens=32``, ``seed=1`` ...). `quantize` ("nf4", "fp4", "int8")
    loads the base quantized by bitsandbytes."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("give at least one prompt")
    settings = replace(settings or SamplingSettings(), **setting_overrides)
    settings.validate()  # before the model loads
    rt = load_text(base, adapters, dtype, trust_remote_code, quantize=quantize)
    return complete(rt, prompts, settings)


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    if not args.prompt:
        raise UserError("give at least one --prompt")
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        chat=args.chat,
    )
    settings.validate()
    rt = load_text(args.base, args.adapter, args.dtype, args.trust_remote_code, quantize=args.quantize)
    print(
        f"{rt.describe()}; " + ("greedy" if args.greedy else f"sampling (seed {args.seed})"),
        file=sys.stderr,
    )
    prompts = [raw.replace("\\n", "\n") for raw in args.prompt]
    stream = args.stream and not args.json
    texts = []
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1 and not args.json:
            print(f"--- [{i + 1}] {prompt!r}", flush=True)
        streamer = TextStreamer(rt.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        texts += complete(rt, [prompt], settings, lambda _, streamer=streamer: streamer)
        if not stream and not args.json:
            print(texts[-1], flush=True)
    if args.json:
        rows = [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]
        adapters = [{"source": s.source, "weight": s.weight} for _, s in rt.adapters]
        print(json.dumps({"base": rt.base, "adapters": adapters, "generations": rows}, indent=2))
    return 0
