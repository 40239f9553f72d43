"""`loraforge train`: LoRA fine-tuning of a causal language model.

    loraforge train                                   # the embedded tiny-llama on the example task
    loraforge train --config run.yaml --learning-rate 5e-4 --max-steps 300 --out runs/mine
    accelerate launch --num_processes 2 -m loraforge.cli train ...   # or torchrun; DDP, rank 0 writes

From Python, the same run::

    from loraforge import LoraConfig
    from loraforge.train.text import TextTrainConfig, train_text

    result = train_text(TextTrainConfig(max_steps=20, lora=LoraConfig(r=4, lora_alpha=8)))
    result.adapter_dir, result.train_loss, result.eval_loss

The run reads a YAML config (optional) and command-line overrides (see `examples/train_text.yaml`
or `loraforge train --help`), checks the data before loading any model, trains with the shared loop
(`loraforge.train.loop`) and writes a PEFT-format adapter to ``<output_dir>/adapter`` that
`peft.PeftModel.from_pretrained` reads, with the resolved config, metrics and a loss curve beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import shlex
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.data.text import IGNORE, Scan, TextDataset, prompt_and_reference, scan_text_file
from loraforge.kernels import checkpointing
from loraforge.runtime import load_text_model, prepare_4bit_cpu_training
from loraforge.train.config import (
    TextTrainConfig,
    add_config_arguments,
    config_from_args,
    config_to_yaml,
    resolve_config,
)
from loraforge.train.loop import TrainResult
from loraforge.train.task import Task

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples" / "text"
EXAMPLE_TRAIN = EXAMPLES_DIR / "train.jsonl"
EXAMPLE_HELDOUT = EXAMPLES_DIR / "heldout.jsonl"
CONFIG_NAME = "train_config.yaml"


def default_target_modules(model) -> list[str] | str:
    return "all-linear"


# -- loss ------------------------------------------------------------------------------------------


def _forward_kwargs(model, batch: dict, device) -> dict:
    kwargs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
    }
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"].to(device)
    if kwargs["attention_mask"].dim() == 4:
        kwargs["attention_mask"] = kwargs["attention_mask"].to(_float_dtype(model))
    return kwargs


def _float_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point() and not p.requires_grad:
            return p.dtype
    return torch.float32


def _transformers_model(model):
    """The transformers model inside `model` (a LoraModel, maybe wrapped by DDP)."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):  # DDP wrapper
        model = model.module
    return getattr(model, "model", model)


_ACCEPTS: dict[tuple[type, str], bool] = {}


def _accepts(model, name: str) -> bool:
    """Whether the transformers model inside `model` takes keyword `name`."""
    inner = _transformers_model(model)
    key = (type(inner), name)
    if key not in _ACCEPTS:
        try:
            _ACCEPTS[key] = name in inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            _ACCEPTS[key] = False
    return _ACCEPTS[key]


_LAST_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def last_layer_positionwise_parts(model) -> list[nn.Module]:
    """The last decoder layer's MLP and attention output projection, where the model has them.

    Both act on each position separately and feed only the residual stream, which after the last
    layer reaches nothing but the output head. So when only some positions' logits are wanted, these
    two may run on those positions alone: ~3/4 of the last layer's matmuls. Mixture-of-experts
    blocks are left out (their routers see every token). The layer is found once per model; its
    parts are read on each call, as adding or removing adapters replaces them.
    """
    inner = _transformers_model(model)
    if inner not in _LAST_LAYERS:
        n_layers = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
        stacks = [m for m in inner.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
        _LAST_LAYERS[inner] = stacks[-1][-1] if n_layers and stacks else None
    last = _LAST_LAYERS[inner]
    parts = []
    mlp = getattr(last, "mlp", None)
    if mlp is not None and type(mlp).__name__.endswith("MLP"):
        parts.append(mlp)
    o_proj = getattr(getattr(last, "self_attn", None), "o_proj", None)
    if isinstance(o_proj, nn.Module):
        parts.append(o_proj)
    return parts


@contextmanager
def only_at_positions(modules: list[nn.Module], keep: torch.Tensor):
    """Within the block, each module computes its (batch, position, features) output at the sequence
    positions `keep` only; the other positions get zeros (their values must go unused). Done with
    hooks, so it composes with whatever forward the module runs (e.g. a fused kernel)."""

    full_length: dict[int, int] = {}

    def narrow(module, args):
        if len(args) == 1 and args[0].dim() == 3:
            full_length[id(module)] = args[0].shape[1]
            return (args[0][:, keep],)
        return None

    def widen(module, args, part):
        length = full_length.pop(id(module), None)
        if length is None:
            return None
        out = part.new_zeros(part.shape[0], length, part.shape[-1])
        return out.index_copy(1, keep, part)

    handles = [
        h for m in modules for h in (m.register_forward_pre_hook(narrow), m.register_forward_hook(widen))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def causal_lm_loss(model, batch: dict, device=None) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the tokens whose label is not IGNORE, and their count.

    Only positions that predict a labelled token go through the output head (`logits_to_keep`, where
    the model supports it): with completion-only training that skips the prompt positions' head and
    softmax, the largest single matrix of a small model. The last layer's MLP and attention output
    projection skip those positions too (see `last_layer_positionwise_parts`). Where the model's
    logits are its head's output as they are (`_plain_head`), the head and the softmax run a few
    hundred positions at a time (`head_cross_entropy`), so the (tokens x vocabulary) logits never
    exist in full.
    """
    device = device or next(model.parameters()).device
    kwargs = _forward_kwargs(model, batch, device)
    labels = batch["labels"].to(device)
    targets = labels[:, 1:]
    wanted = targets != IGNORE  # (B, L-1): position t predicts token t+1
    n = int(wanted.sum())
    keep = wanted.any(0).nonzero().flatten()
    head = _plain_head(model)
    with _head_input(head) as captured:
        if _accepts(model, "logits_to_keep") and keep.numel() < targets.shape[1]:
            # Checkpointing recomputes the forward during backward, outside the restriction: shapes differ.
            restrict = not (torch.is_grad_enabled() and checkpointing(_transformers_model(model)))
            with only_at_positions(last_layer_positionwise_parts(model) if restrict else [], keep):
                logits = model(**kwargs, logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
            targets, wanted = targets[:, keep], wanted[:, keep]
        else:
            logits = model(**kwargs, use_cache=False).logits[:, :-1]
    if head is None:
        return F.cross_entropy(logits[wanted].float(), targets[wanted]), n
    hidden = captured["hidden"]  # (B, K or L, H): what the head would have turned into the logits
    hidden = hidden if hidden.shape[1] == wanted.shape[1] else hidden[:, :-1]
    return head_cross_entropy(head, hidden[wanted], targets[wanted]), n


# Model families whose forward returns the output head's result unchanged (no logit soft-capping or
# scaling after the head), so the loss may be computed from the head's input.
_PLAIN_HEAD_TYPES = frozenset(
    "llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe phi phi3 gemma gpt2 gpt_neox gptj opt olmo "
    "olmo2 stablelm starcoder2 smollm3 bloom falcon".split()
)


def _plain_head(model) -> nn.Module | None:
    inner = _transformers_model(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES or not hasattr(
        inner, "get_output_embeddings"
    ):
        return None
    return inner.get_output_embeddings()


@contextmanager
def _head_input(head: nn.Module | None):
    """Within the block, `head` records its input in the yielded dict and returns an empty
    (..., 0) tensor instead of the logits; the model's forward carries that through untouched."""
    captured: dict = {}
    if head is None:
        yield captured
        return

    def record(x, *args, **kwargs):
        captured["hidden"] = x
        return x.new_empty(*x.shape[:-1], 0)

    head.forward = record  # an instance attribute, found before the class's forward
    try:
        yield captured
    finally:
        del head.forward


HEAD_CHUNK_BYTES = 8 << 20  # float32 logits per chunk of positions


def head_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(head(hidden).float(), targets)`` (mean) for (N, H) hidden states, computed a
    chunk of positions at a time so that the (N, vocabulary) logits are never all in memory.

    While autograd records, each chunk's gradients (for `hidden` and the head's trainable parameters)
    are taken right away and scaled in the backward pass: the loss is the last operation, so that
    gives the plain result without keeping, or recomputing, any logits."""
    # the head's (or its wrapped layer's) output size; else one row through the head tells it
    vocab = next(
        (m.out_features for m in head.modules() if isinstance(getattr(m, "out_features", None), int)), None
    )
    if vocab is None:
        with torch.no_grad():
            vocab = head(hidden[:1].detach()).shape[-1]
    rows = max(1, HEAD_CHUNK_BYTES // (4 * vocab))
    params = [p for p in head.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
        total = sum(
            F.cross_entropy(head(h).float(), t, reduction="sum")
            for h, t in zip(hidden.split(rows), targets.split(rows))
        )
        return total / max(1, targets.numel())
    return _HeadCrossEntropy.apply(hidden, targets, head, rows, *params)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, head, rows, *params):
        n = max(1, targets.numel())
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_params = [None] * len(params)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows].detach().requires_grad_(hidden.requires_grad)
            with torch.enable_grad():
                loss = F.cross_entropy(head(h).float(), targets[start : start + rows], reduction="sum") / n
                inputs = ([h] if hidden.requires_grad else []) + list(params)
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            total += loss.detach()
            if hidden.requires_grad:
                grad_hidden[start : start + rows] = grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        ctx.grad_hidden, ctx.grad_params = grad_hidden, grad_params
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden = (
            None if ctx.grad_hidden is None else ctx.grad_hidden.mul_(grad_out.to(ctx.grad_hidden.dtype))
        )
        grad_params = [None if g is None else g.mul_(grad_out) for g in ctx.grad_params]
        ctx.grad_hidden = ctx.grad_params = None
        return (grad_hidden, None, None, None, *grad_params)


@torch.no_grad()
def dataset_loss(model, dataset: TextDataset, batch_size: int) -> float:
    """Token-weighted mean loss of a dataset (completion tokens under completion training)."""
    total = count = 0
    for batch in dataset.eval_batches(batch_size):
        loss, n = causal_lm_loss(model, batch)
        total += float(loss) * n
        count += n
    return total / count


# -- the task --------------------------------------------------------------------------------------


def resolve_data(config: TextTrainConfig) -> tuple[Path, Path | None]:
    """(train file, eval file or None), filling in the packaged example where the config leaves it empty."""
    data = Path(config.data) if config.data else EXAMPLE_TRAIN
    if config.eval_data in ("none", "None"):
        eval_data = None
    elif config.eval_data:
        eval_data = Path(config.eval_data)
    else:
        eval_data = EXAMPLE_HELDOUT if not config.data else None
    return data, eval_data


class TextTask(Task):
    """The `Task` (see loraforge.train.task) of causal-LM LoRA fine-tuning."""

    def __init__(self, config: TextTrainConfig, log=print):
        self.config = config
        self.log = log
        self.data_path, self.eval_path = resolve_data(config)
        # Read and check the data first: bad files fail in a second, before any model is loaded.
        self.train_scan: Scan = scan_text_file(self.data_path, strict=config.strict)
        self.eval_scan: Scan | None = (
            scan_text_file(self.eval_path, strict=config.strict) if self.eval_path else None
        )
        self.model = self.lora = self.tokenizer = None
        self.accelerator = None

    # -- Task interface ----------------------------------------------------------------------------

    def build(self, accelerator):
        from loraforge import get_lora_model

        c = self.config
        self.accelerator = accelerator
        say = accelerator.print
        say(self.train_scan.report())
        if self.eval_scan is not None:
            say(self.eval_scan.report())
        model, self.tokenizer = load_text_model(
            c.base,
            c.dtype,
            c.trust_remote_code,
            quantize=c.quantize,
            compute_dtype=c.quant_compute_dtype,
            double_quant=c.double_quant,
            device=accelerator.device,
        )
        model.config.use_cache = False
        if c.quantize == "none":
            model.to(accelerator.device)
        lora_config = dataclasses.replace(
            c.lora,
            target_modules=c.lora.target_modules or default_target_modules(model),
            task_type="CAUSAL_LM",
            base_model_name_or_path=c.base,
        )
        self.lora = get_lora_model(model, lora_config)
        self.model = self.lora
        prepare_4bit_cpu_training(self.lora)
        trainable, total = self.lora.get_nb_trainable_parameters()
        targets = self.lora.peft_config["default"].target_modules
        targets = ", ".join(targets) if isinstance(targets, list) else targets
        say(
            f"model: {c.base} ({type(model).__name__}, {total - trainable:,} parameters"
            f"{'' if c.quantize == 'none' else ', linear layers quantized ' + c.quantize + ' (frozen)'}); "
            f"adapter r={c.lora.r} on {targets}: {trainable:,} trainable"
        )
        self.train_set = TextDataset(
            self.train_scan, self.tokenizer, c.max_length, c.train_on, c.packing, c.seed, c.group_by_length
        )
        say(f"train: {self.train_set.describe()}")
        self.eval_set = None
        if self.eval_scan is not None:
            self.eval_set = TextDataset(
                self.eval_scan, self.tokenizer, c.max_length, c.train_on, False, c.seed, True
            )
            say(f"eval: {self.eval_set.describe()}")

    def trainable_parameters(self):
        return [p for p in self.lora.parameters() if p.requires_grad]

    def num_batches(self) -> int:
        return self.train_set.num_batches(self.config.batch_size)

    def train_batches(self, epoch: int, start: int = 0):
        return self.train_set.batches(self.config.batch_size, epoch, start)

    def loss(self, batch):
        return causal_lm_loss(self.model, batch, self.accelerator.device)

    def input_tokens(self, batch) -> int:
        return int(batch["num_tokens"])

    def eval_loss(self):
        if self.eval_set is None:
            return None
        return dataset_loss(self.lora, self.eval_set, self.config.batch_size * 2)

    def sample_prompts(self) -> list[list[int]]:
        if self.config.sample_prompts:
            return [self.tokenizer(p)["input_ids"] for p in self.config.sample_prompts]
        scan = self.eval_scan or self.train_scan
        prompts = []
        for record in scan.records:
            got = prompt_and_reference(record, self.tokenizer)
            if got is not None:
                prompts.append(got[0])
            if len(prompts) == 3:
                break
        return prompts

    def sample(self, step: int, out_dir: Path):
        prompts = self.sample_prompts()
        if not prompts:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for ids in prompts:
            text = generate_text(
                self.lora, self.tokenizer, ids, max_new_tokens=self.config.sample_max_new_tokens
            )
            lines.append(
                f"### prompt\n{self.tokenizer.decode(ids, skip_special_tokens=True)}\n### generation\n{text}\n"
            )
        (out_dir / f"step-{step}.txt").write_text("\n".join(lines), encoding="utf-8")

    def save_adapter(self, directory):
        self.lora.save_pretrained(directory)

    def extra_state(self) -> dict:
        return {"data": str(self.data_path), "examples": len(self.train_set.items)}

    def load_extra_state(self, state: dict) -> None:
        if state and state.get("examples") not in (None, len(self.train_set.items)):
            self.accelerator.print(
                f"note: the checkpoint was trained on {state['examples']} rows, the data now has {len(self.train_set.items)}"
            )


@torch.no_grad()
def generate_text(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 48, **kwargs) -> str:
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **kwargs,
    )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


# -- Python API ------------------------------------------------------------------------------------


def train_text(config: TextTrainConfig | None = None, /, **overrides) -> TrainResult:
    """Fine-tunes a causal language model with LoRA: `loraforge train` from Python.

    `config` defaults to `TextTrainConfig()`; `overrides` are config keys as in the YAML file
    (`max_steps=200`, `lora={"r": 16}`, the older `lora_r=16` ...) applied on top of it. The config is
    validated and the data read and checked before any model loads: bad input raises a `UserError`
    naming the key, or the file and line. The resolved config is saved as
    ``<output_dir>/train_config.yaml``; the adapter (PEFT's format) goes to `result.adapter_dir`.
    Prints what the training prints (data report, progress, eval losses); nothing else.
    """

    from loraforge.train.loop import train

    config = resolve_config(TextTrainConfig, config, overrides)
    task = TextTask(config)  # reads and checks the data
    return train(task, config)


# -- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TextTrainConfig, example="examples/train_text.yaml")


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    config = config_from_args(TextTrainConfig, args)
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    if main:
        print("resolved config:\n  " + config_to_yaml(config).strip().replace("\n", "\n  "))
    result = train_text(config)
    if result.interrupted:
        return 130
    if main and result.already_finished:
        print(f"{result.done_line()}; its adapter: {result.adapter_dir}")
    elif main:
        print(_summary(result, config))
        sys.stdout.flush()
    return 0


def _summary(result: TrainResult, config: TextTrainConfig) -> str:
    """The closing lines: losses, where everything went, and how to use the adapter."""
    out, adapter, task = Path(config.output_dir), result.adapter_dir, result.task
    summary = [
        result.done_line(),
        f"adapter: {adapter}   (config: {out / CONFIG_NAME}, metrics: {out / 'metrics.csv'}, curve: {out / 'loss.png'})",
        "use it:",
    ]
    base = shlex.quote(config.base)
    prompt = _example_prompt(task).replace("\n", "\\n")  # `generate` turns a typed \n into a newline
    summary.append(
        f"  loraforge generate --base {base} --adapter {shlex.quote(str(adapter))} --greedy --prompt {shlex.quote(prompt)}"
    )
    if task.eval_path is not None:
        summary.append(
            f"  loraforge eval-text --base {base} --adapter {shlex.quote(str(adapter))} --data {shlex.quote(str(task.eval_path))}"
        )
    base_path = config.base
    from loraforge.bases import EMBEDDED_BASES

    if config.base in EMBEDDED_BASES:
        base_path = str(EMBEDDED_BASES[config.base][1])
    summary.append(
        "  python: from transformers import AutoModelForCausalLM; from peft import PeftModel; "
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_path!r}), {str(adapter)!r})"
    )
    return "\n".join(summary)


def _example_prompt(task: TextTask) -> str:
    if task.config.sample_prompts:
        return task.config.sample_prompts[0]
    for record in (task.eval_scan or task.train_scan).records:
        if record.kind == "prompt_completion":
            return record.fields.get("prompt", "")
        if record.kind == "alpaca":
            from loraforge.data.text import alpaca_prompt

            return alpaca_prompt(record.fields["instruction"], record.fields.get("input", ""))
        break
    return "Hello"
