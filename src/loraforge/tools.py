"""Adapter file tools for the command line: `bases`, `merge`, `mix`, `inspect`.

loraforge bases
loraforge inspect runs/text/adapter
loraforge mix runs/a:0.7 runs/b:0.3 --method svd --rank 16 --out mixed/
loraforge merge --adapter runs/a:1.0 --out merged/          # base taken from the adapter's config
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from loraforge import flags
from loraforge.bases import EMBEDDED_BASES
from loraforge.combine import METHODS
from loraforge.errors import UserError
from loraforge.formats import describe
from loraforge.formats.peft import PREFIX, read_adapter
from loraforge.runtime import adapter_name, describe_base, load_text, parse_adapter_specs

# -- bases -----------------------------------------------------------------------------------------


def bases_arguments(parser):
    flags.add_json(parser, "the list")


def bases_run(args) -> int:
    rows = []
    for name, (kind, path, about) in EMBEDDED_BASES.items():
        present = (path / "config.json").exists() or (path / "model_index.json").exists()
        rows.append({"name": name, "kind": kind, "path": str(path), "present": present, "about": about})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        status = "" if r["present"] else "  (weights missing)"
        print(f"{r['name']:<12} {r['kind']:<6} {r['path']}{status}\n{'':<20}{r['about']}")
    return 0


# -- merge -----------------------------------------------------------------------------------------


def merge_arguments(parser):
    parser.add_argument(
        "--base",
        help="base model: embedded name, local directory or hub id (default: recorded in the adapter)",
    )
    flags.add_adapter(parser, help="adapter to merge, with an optional weight; repeat to mix", required=True)
    flags.add_out(
        parser, "output directory for the standalone model (must not exist or be empty)", required=True
    )
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "nf4", "fp4", "int8"],
        help="merge onto the base quantized as the adapter was trained (bitsandbytes): its layers are "
        "dequantized, and the merged model written is full precision (float32)",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip checking merged outputs against the unmerged model"
    )
    flags.add_json(parser, "what was merged and where it was written")


def merge_run(args) -> int:

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new --out")
    rt = load_text(args.base, args.adapter, require_tokenizer=False, quantize=args.quantize)
    lora = rt.model
    quantized = args.quantize != "none"
    # A quantized layer's own kernels round differently from a float matmul of its dequantized weight
    # (int8 also quantizes the activations), so the check is looser there.
    tolerance = 5e-2 if quantized else 1e-3
    probe = torch.randint(
        0, lora.model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = None if args.no_verify else lora(input_ids=probe).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said below, in the command's own words
            merged = lora.merge_and_unload()
        if quantized:
            print(
                f"note: merged onto the {args.quantize}-quantized base, dequantized: the model written is "
                "full precision (float32), the size of the unquantized base",
                file=sys.stderr,
            )
        if expected is not None:
            diff = (merged(input_ids=probe).logits - expected).abs().max().item()
            # With --json, stdout carries the JSON alone.
            print(
                f"merged vs unmerged logits: max abs difference {diff:.2e}",
                file=sys.stderr if args.json else sys.stdout,
            )
            if diff > tolerance:
                raise UserError(f"merged model differs from the unmerged one by {diff:.2e}; not saved")
    # Write into a sibling temp directory and rename, so an interrupted merge leaves no half model.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        merged.save_pretrained(tmp, max_shard_size=args.max_shard_size)
        if rt.tokenizer is not None:
            rt.tokenizer.save_pretrained(tmp)
        else:
            print("note: base has no tokenizer to copy", file=sys.stderr)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.json:
        adapters = [{"source": s.source, "weight": s.weight} for _, s in rt.adapters]
        print(json.dumps({"base": rt.base, "adapters": adapters, "out": str(out)}, indent=2))
        return 0
    weights = ", ".join(str(s) for _, s in rt.adapters)
    print(f"merged {weights} onto a copy of {describe_base(rt.base)}\nsaved standalone model to {out}")
    print(
        f"use it: AutoModelForCausalLM.from_pretrained({str(out)!r})  or  loraforge generate --base {out} --prompt ..."
    )
    return 0


# -- mix -------------------------------------------------------------------------------------------


def mix_arguments(parser):
    parser.add_argument(
        "adapters",
        nargs="*",
        metavar="SOURCE[:WEIGHT]",
        help="adapters to combine (a shortcut for --adapter)",
    )
    flags.add_adapter(parser, help="adapter to combine, with its weight (default 1); repeatable")
    parser.add_argument("--method", choices=METHODS, default="svd", help="combination method (default svd)")
    parser.add_argument(
        "--rank",
        type=flags.positive_int,
        help="rank of the result for svd/ties/dare_linear (default: largest input rank)",
    )
    parser.add_argument(
        "--density", type=flags.fraction, default=0.5, help="fraction kept by ties/dare_linear (default 0.5)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for dare_linear's random drop")
    flags.add_out(parser, "output adapter directory (must not exist or be empty)", required=True)
    flags.add_json(parser, "what was mixed and where it was written")


class _Skeleton(nn.Module):
    """A stand-in base model with the adapted modules' shapes and no real weights, so adapters can be
    combined without loading the base. Weights are a zero-stride view of one scalar: no memory."""


def _skeleton_for(tensors: dict[str, torch.Tensor]) -> nn.Module:
    root = _Skeleton()
    for key in tensors:
        if not key.endswith(("lora_A.weight", "lora_embedding_A")):
            continue
        path = key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]
        is_embedding = key.endswith("lora_embedding_A")
        A = tensors[key]
        B = tensors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        if is_embedding:
            module = nn.Embedding(1, 1)
            module.num_embeddings, module.embedding_dim = A.shape[1], B.shape[0]
            module.weight = nn.Parameter(torch.zeros(()).expand(A.shape[1], B.shape[0]), requires_grad=False)
        elif A.dim() == 2:
            module = nn.Linear(1, 1, bias=False)
            module.in_features, module.out_features = A.shape[1], B.shape[0]
            module.weight = nn.Parameter(torch.zeros(()).expand(B.shape[0], A.shape[1]), requires_grad=False)
        else:
            conv = nn.Conv2d if A.dim() == 4 else nn.Conv1d
            module = conv(A.shape[1], B.shape[0], tuple(A.shape[2:]), bias=False, device="meta")
            module.weight = nn.Parameter(
                torch.zeros(()).expand(B.shape[0], *A.shape[1:]), requires_grad=False
            )
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, _Skeleton())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return root


def mix_run(args) -> int:
    from loraforge.model import LoraModel

    adapters = parse_adapter_specs([*args.adapters, *args.adapter])
    if not adapters:
        raise UserError("give the adapters to mix (positionally or with --adapter)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out")
    loaded = [read_adapter(s.path) for s in adapters]
    union = {}
    for _, tensors in loaded:
        union.update(tensors)
    lora = LoraModel(_skeleton_for(union))
    names = []
    for i, spec in enumerate(adapters):
        names.append(adapter_name(i))
        lora.load_adapter(spec.path, names[-1])
    lora.add_weighted_adapter(
        names,
        [s.weight for s in adapters],
        "default",
        args.method,
        svd_rank=args.rank,
        density=args.density,
        seed=args.seed,
    )
    config = lora.peft_config["default"]
    config.base_model_name_or_path = loaded[0][0].base_model_name_or_path
    config.task_type = loaded[0][0].task_type
    lora.save_pretrained(out, selected_adapters=["default"])
    if args.json:
        inputs = [{"source": s.source, "weight": s.weight} for s in adapters]
        print(json.dumps({"method": args.method, "adapters": inputs, "out": str(out)}, indent=2))
        return 0
    print(f"mixed {' + '.join(f'{s.weight:g} x {s.source}' for s in adapters)} with {args.method} -> {out}")
    return 0


# -- inspect ---------------------------------------------------------------------------------------


def inspect_arguments(parser):
    parser.add_argument("path", help="adapter directory or .safetensors file")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def inspect_run(args) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    size = info["file_size_bytes"]
    print(f"adapter       {info['path']}  ({info['format']} format)")
    print(f"rank          {info['rank']}")
    print(f"lora_alpha    {info['lora_alpha']}" + ("  (rsLoRA)" if info["use_rslora"] else ""))
    print(f"targets       {', '.join(info['targets'])}  ({info['adapted_modules']} modules)")
    print(f"parameters    {info['parameters']:,}  ({', '.join(info['dtypes'])})")
    print(f"file size     {size / 1e6:.2f} MB" if size > 1e5 else f"file size     {size / 1e3:.1f} kB")
    print(f"base model    {info['base_model'] or 'not recorded'}")
    if info["learned_tokens"]:
        print(f"tokens        {' '.join(info['learned_tokens'])}  (learned embeddings)")
    return 0
