"""Training configuration: one dataclass per kind of run, documented field by field.

Each field's documentation is the string literal written right under it (an "attribute docstring").
That one text becomes the `--field` help of the command line, the comment above the key in
`examples/*.yaml`, and nothing else has to be kept in sync. The adapter's shape is the `lora` field,
a `loraforge.config.LoraConfig` (PEFT's field names), documented by that class's docstring.

Values come from three layers, later ones winning::

    dataclass defaults  <  YAML file (--config run.yaml)  <  command-line flags (--learning-rate 3e-4)

and every value is checked against the field's type; an unknown key or a value of the wrong type is
an error that names the key. The LoRA settings nest under `lora:` in YAML and are ``--lora.FIELD``
flags; the flat keys of older configs (`lora_r`, `lora_alpha`, `lora_dropout`, `target_modules`,
flags ``--lora-r`` ...) are aliases of `lora.r`, `lora.lora_alpha`, ...

    config = load_config(TextTrainConfig, "run.yaml", overrides={"max_steps": "200", "lora.r": 16})
    config = TextTrainConfig(max_steps=200, lora=LoraConfig(r=16, lora_alpha=32)); config.validate()
    config = with_overrides(config, {"learning_rate": 3e-4})
    add_config_arguments(parser, TextTrainConfig)       # --out, --learning-rate, --lora-r, ...
    config = config_from_args(TextTrainConfig, args)     # --config PATH plus the flags given
    print(example_yaml(TextTrainConfig))
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from loraforge.config import LoraConfig
from loraforge.errors import ConfigError, NotFound, UserError

# The flat keys (and flags) of older configs: aliases of fields of `lora`.
LORA_ALIASES = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "target_modules",
}
# LoraConfig fields the training task fills in itself (what the adapter file records); not config keys.
LORA_SET_BY_TASK = ("base_model_name_or_path", "task_type", "inference_mode")
# Extra (shorter) flag names, shown first in --help.
FLAG_ALIASES = {"output_dir": ["--out"]}


def lora_field_names() -> list[str]:
    """The LoraConfig fields a training config sets (under `lora:`), in LoraConfig's order."""
    return [f.name for f in dataclasses.fields(LoraConfig) if f.name not in LORA_SET_BY_TASK]


def _lora_alias(name: str) -> property:
    def get(self):
        return getattr(self.lora, name)

    def set_(self, value):
        alias = next(k for k, v in LORA_ALIASES.items() if v == name)
        self.lora = _lora_with(self.lora, {name: (value, alias)})

    return property(get, set_, doc=f"`lora.{name}` (the flat key of older configs).")


def lora_field(
    lora_alpha: float, empty_targets: str, targets_doc: str | None = None, modules_to_save: list | None = None
):
    """The `lora` field of a training config: r=8 at `lora_alpha`, and the help text of
    `target_modules` saying what an empty value means for this kind of run."""
    doc = targets_doc or (
        'Which modules get an adapter: a list of exact module names or name suffixes (["q_proj", '
        '"v_proj"]), a regular expression matched against the full name, or "all-linear" for every '
        f"linear layer except the output head. Empty: {empty_targets}."
    )
    return field(
        default_factory=lambda: LoraConfig(r=8, lora_alpha=lora_alpha, modules_to_save=modules_to_save),
        metadata={"docs": {"target_modules": doc}},
    )


@dataclass
class TrainConfig:
    """Fields shared by every training command (text and image)."""

    output_dir: str = "output"
    """Directory for the run: the final adapter (`adapter/`), checkpoints, metrics, samples, loss curve."""

    seed: int = 0
    """Random seed for adapter initialisation, data order and dropout. Same seed, same data, same
    machine: bit-identical adapter."""

    learning_rate: float = 1e-3
    """Peak learning rate of AdamW (reached after the warmup)."""

    batch_size: int = 8
    """Examples per micro-batch on each process."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step. Examples per step = batch_size x grad_accum x processes."""

    max_steps: int = 0
    """Number of optimizer steps. 0: run for `epochs` passes over the data instead."""

    epochs: float = 1.0
    """Passes over the training data, used when max_steps is 0. Fractions are allowed (0.5 = half)."""

    warmup_steps: int = 0
    """Steps over which the learning rate rises linearly from 0 to learning_rate."""

    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after the warmup: cosine or linear down to min_lr_ratio x learning_rate, or constant."""

    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of learning_rate (cosine and linear schedules)."""

    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""

    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """adamw: PyTorch's AdamW. adamw8bit: bitsandbytes' AdamW8bit, its moment estimates stored in 8 bits
    (needs bitsandbytes: pip install 'loraforge[quant]')."""

    loraplus_lr_ratio: float = 0.0
    """LoRA+: train the B matrices (and 1-D tensors such as DoRA magnitudes) at this multiple of the
    learning rate, as PEFT's create_loraplus_optimizer (the paper suggests 16). 0: off."""

    loraplus_lr_embedding: float = 1e-6
    """LoRA+: learning rate of adapters on embedding layers (PEFT's default), when loraplus_lr_ratio is set."""

    max_grad_norm: float = 1.0
    """Clip the gradient to this global L2 norm before each step. 0 turns clipping off."""

    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast the forward pass: no, bf16 or fp16 (fp16 needs a GPU). The adapter weights stay float32."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, ~30% slower."""

    eval_every: int = 0
    """Compute the eval loss every N steps (and always at the end). 0: only at the end."""

    sample_every: int = 0
    """Write samples from the model every N steps (and at the end). 0: only at the end."""

    save_every: int = 50
    """Write a resumable checkpoint every N steps (and at the end). 0: only at the end."""

    keep_last: int = 2
    """Keep only the newest K checkpoints. 0 keeps them all."""

    log_every: int = 10
    """Write a row of metrics (CSV and TensorBoard) every N steps."""

    resume: str | None = None
    """Resume from a checkpoint: "latest" (the newest under output_dir/checkpoints) or a checkpoint
    directory. Settings that change the result must match the interrupted run's (checked); a
    finished run is reported as finished and left as it is."""

    overwrite: bool = False
    """Start over in an output_dir that already holds a run: its adapter, checkpoints, metrics and
    samples are removed first. Without it such a directory is refused (continue it with resume)."""

    strict: bool = False
    """Stop at the first bad row or file of the data instead of skipping it (bad ones are always reported)."""

    lora: LoraConfig = lora_field(16.0, "the task's default")
    """The adapter: PEFT's LoraConfig fields, as a `lora:` mapping in YAML (flags --lora.FIELD). The
    flat keys of older configs, lora_r, lora_alpha, lora_dropout and target_modules, still work."""

    tensorboard: bool = True
    """Also write metrics as TensorBoard events under output_dir/tensorboard."""

    progress_bar: bool = True
    """Show a progress bar with the loss, the throughput and the time left."""

    threads: int = 0
    """CPU threads for PyTorch on each process. 0: one per core this process may run on, divided
    among the processes of a multi-process run. Set it for bit-identical reruns."""

    low_memory: bool = False
    """On CPU, give freed memory back to the system at once (glibc's mmap threshold fixed at 1 MiB):
    a lower peak (a 1B Llama on an nf4 base: 1.28 instead of 1.36 GB) for slower steps (there 1.5x:
    every tensor of 1 MiB or more then gets fresh pages). Results are the same."""

    # What may differ when a run is resumed: none of these change the trained weights, except the
    # run's length: resuming with a larger max_steps (or epochs) extends a run, which is what resume
    # is for (the loop notes the new total; a cosine or linear schedule is stretched to it).
    RESUME_FREE: ClassVar[tuple[str, ...]] = (
        "max_steps",
        "epochs",
        "output_dir",
        "resume",
        "overwrite",
        "eval_every",
        "sample_every",
        "save_every",
        "keep_last",
        "log_every",
        "strict",
        "tensorboard",
        "progress_bar",
        "threads",
        "low_memory",
    )

    # The flat keys of older configs, as attributes too: `config.lora_r` is `config.lora.r`.
    lora_r = _lora_alias("r")
    lora_alpha = _lora_alias("lora_alpha")
    lora_dropout = _lora_alias("lora_dropout")
    target_modules = _lora_alias("target_modules")

    def validate(self) -> None:
        """Checks each value against its field's type and the relations between values; raises
        ConfigError (a UserError, a ValueError) naming the field."""
        _check_types(self)
        positive = ("batch_size", "grad_accum", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                bad_value(name, getattr(self, name), "must be > 0")
        non_negative = (
            "max_steps",
            "warmup_steps",
            "eval_every",
            "sample_every",
            "save_every",
            "keep_last",
            "threads",
            "epochs",
            "weight_decay",
            "max_grad_norm",
            "loraplus_lr_ratio",
            "loraplus_lr_embedding",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                bad_value(name, getattr(self, name), "must be >= 0")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            bad_value("learning_rate", self.learning_rate, "must be a positive number")
        if self.max_steps == 0 and self.epochs == 0:
            bad_value("epochs", self.epochs, "must be > 0 when max_steps is 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad_value("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if not self.output_dir:
            bad_value("output_dir", self.output_dir, "must not be empty")


@dataclass
class TextTrainConfig(TrainConfig):
    """`loraforge train`: LoRA on a causal language model."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = TrainConfig.RESUME_FREE + (
        "sample_prompts",
        "sample_max_new_tokens",
    )

    output_dir: str = "runs/text"
    """Directory for the run: the final adapter (`adapter/`), checkpoints, metrics, samples, loss curve."""

    learning_rate: float = 2e-3
    """Peak learning rate of AdamW (reached after the warmup). The default suits the small embedded
    base; for billion-parameter bases 1e-4 to 3e-4 is the usual range."""

    batch_size: int = 16
    """Examples per micro-batch on each process."""

    epochs: float = 6.0
    """Passes over the training data, used when max_steps is 0. Fractions are allowed (0.5 = half)."""

    warmup_steps: int = 20
    """Steps over which the learning rate rises linearly from 0 to learning_rate."""

    eval_every: int = 100
    """Compute the held-out loss every N steps (and always at the end). 0: only at the end."""

    strict: bool = False
    """Stop at the first bad data row instead of skipping it (bad rows are always reported)."""

    # The output head is trained whole (a copy, 0.5M parameters on tiny-llama): the example's JSON
    # values start with a word's space-less token, which the base's copying heads do not produce.
    lora: LoraConfig = lora_field(16.0, "all-linear", modules_to_save=["lm_head"])

    progress_bar: bool = True
    """Show a progress bar with loss, tokens/s and the time left."""

    save_every: int = 100
    """Write a resumable checkpoint every N steps (and at the end). 0: only at the end."""

    base: str = "tiny-llama"
    """Base model: an embedded base name (see `loraforge bases`), a local transformers directory or a hub id."""

    data: str | None = None
    """Training data: a .jsonl file (rows with text; prompt/completion; instruction/input/output; or
    messages) or a plain .txt file (one example per blank-line-separated block). Empty: the packaged
    example task."""

    eval_data: str | None = None
    """Held-out data in the same formats, for the eval loss. Empty: the example's held-out set when
    `data` is the example, else none. "none" turns evaluation off."""

    max_length: int = 256
    """Longest sequence in tokens; longer examples are cut (the cut is counted and reported)."""

    packing: bool = False
    """Pack several short examples into each sequence of max_length tokens. Packed examples never
    attend to each other (block-diagonal attention mask, positions restart per example)."""

    train_on: Literal["completion", "all"] = "completion"
    """Which tokens carry the loss: "completion" (completions / assistant turns only; plain text
    rows train on everything) or "all"."""

    group_by_length: bool = True
    """Batch examples of similar length together (in shuffled groups) so padding stays small."""

    sample_prompts: list[str] = field(default_factory=list, metadata={"repeat": True})
    """Prompts to generate from at each sample step (on the command line: repeat the flag, one prompt
    each). Empty: the first 3 prompts of the held-out data."""

    sample_max_new_tokens: int = 48
    """Tokens generated per sample prompt (greedy)."""

    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype the base weights are loaded in (with `quantize`: those left unquantized, e.g. embeddings,
    norms, output head). The adapter always trains in float32."""

    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"
    """QLoRA: load the base's linear layers quantized by bitsandbytes (4-bit nf4 or fp4, or int8) and
    train the adapter on top, frozen. The adapter loads on the full-precision base as usual. Needs
    bitsandbytes (pip install 'loraforge[quant]'); runs on CPU and CUDA."""

    quant_compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype 4-bit layers compute in (their weights are dequantized to it on the fly)."""

    double_quant: bool = True
    """4-bit: quantize the quantization constants too (QLoRA's double quantization, ~0.4 bit/weight less)."""

    trust_remote_code: bool = False
    """Allow models whose code lives in their hub repository (only for bases you trust)."""

    def validate(self) -> None:
        super().validate()
        if self.max_length < 2:
            bad_value("max_length", self.max_length, "must be >= 2")
        if self.sample_max_new_tokens <= 0:
            bad_value("sample_max_new_tokens", self.sample_max_new_tokens, "must be > 0")
        if not self.base:
            bad_value("base", self.base, "must not be empty")


# -- documentation ---------------------------------------------------------------------------------


def field_docs(cls) -> dict[str, str]:
    """Field name -> its attribute docstring, from the source of `cls` and its bases (subclass wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        class_node = ast.parse(source).body[0]
        body = class_node.body
        for node, nxt in zip(body, body[1:] + [None]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def lora_docs(cls=None) -> dict[str, str]:
    """LoraConfig field -> its documentation: the `Args:` section of LoraConfig's docstring (without
    its "Default ..." remark: the training default is the one shown beside it), overridden by the
    texts that `cls`'s `lora` field gives in its metadata under "docs"."""
    docs: dict[str, str] = {}
    name = None
    in_args = False
    for line in (inspect.getdoc(LoraConfig) or "").splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        entry = re.match(r"^ {4}(\w+): (.*)$", line)
        if entry:
            name = entry.group(1)
            docs[name] = entry.group(2)
        elif line.startswith("        ") and name:
            docs[name] += " " + line.strip()
        elif line.strip():
            break  # the end of the section
    for key, text in docs.items():
        text = " ".join(text.replace("``", "").split())
        docs[key] = re.sub(r"\s+Default\s(?!.*\sDefault\s).*$", "", text)
    if cls is not None:
        lora = next((f for f in dataclasses.fields(cls) if f.name == "lora"), None)
        if lora is not None:
            docs.update(lora.metadata.get("docs", {}))
    return docs


# -- types -----------------------------------------------------------------------------------------


def bad_value(name: str, value: Any, why: str):
    """Raises the ConfigError for a value out of range, naming its key."""
    raise ConfigError(f"config key {name!r}: {why} (got {value!r})")


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"a mapping of {_describe(key)} to {_describe(value)}"
    if tp is LoraConfig:
        return "a mapping of LoraConfig fields"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp, from_text: bool):
    """`value` as type `tp`, or _Mismatch. With from_text, strings are read as YAML scalars first."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        # Try the non-string members first so "3" from the command line becomes 3 for `int | str`.
        ordered = [a for a in args if a is not str] + [a for a in args if a is str]
        for arg in ordered:
            try:
                return _coerce(value, arg, from_text)
            except _Mismatch:
                continue
        raise _Mismatch
    if from_text and isinstance(value, str) and tp is not str and origin is not Literal:
        if origin is list and not value.lstrip().startswith("["):
            # `--target-modules q_proj,v_proj`, `--lora.layers-to-transform 0,1`
            return _coerce([v.strip() for v in value.split(",") if v.strip()], tp, True)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise _Mismatch from None
        return _coerce(parsed, tp, False)
    if tp is type(None):
        if value is None or (from_text and value in ("", "null", "None")):
            return None
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _Mismatch
        return [_coerce(v, item, from_text) for v in value]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _Mismatch
        return {_coerce(k, key_type, True): _coerce(v, value_type, from_text) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if from_text and value is not None and not isinstance(value, dict | list):
            return str(value)
        raise _Mismatch
    raise _Mismatch


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce_key(key: str, value: Any, tp, from_text: bool, where: str = ""):
    try:
        return _coerce(value, tp, from_text)
    except _Mismatch:
        raise ConfigError(f"config key {key!r}{where}: expected {_describe(tp)}, got {value!r}") from None


def _check_types(config) -> None:
    """Each field's value against its type (a config built in Python is checked here); values that
    convert losslessly (an int for a float field) are converted. `lora` is checked by LoraConfig."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "lora":
            if isinstance(value, dict):
                updates: dict[str, tuple[Any, str]] = {}
                for key, item in value.items():
                    _set_lora(updates, str(key), item, f"lora.{key}", "", from_text=False)
                value = _lora_with(_default(type(config), "lora"), updates)
            elif not isinstance(value, LoraConfig):
                bad_value("lora", value, "must be a loraforge.config.LoraConfig (or a mapping of its fields)")
            # Re-runs LoraConfig's checks (the object may have been changed since it was made).
            names = ("target_modules", "exclude_modules")
            config.lora = _lora_with(value, {n: (getattr(value, n), f"lora.{n}") for n in names})
            continue
        coerced = _coerce_key(f.name, value, hints[f.name], from_text=False)
        if type(coerced) is not type(value) or coerced != value:
            setattr(config, f.name, coerced)


def _default(cls, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _check_keys(cls, data: dict, source: str):
    known = [f.name for f in dataclasses.fields(cls)]
    aliases = list(LORA_ALIASES) if "lora" in known else []
    for key in data:
        if key not in known and key not in aliases:
            close = difflib.get_close_matches(str(key), known + aliases, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


# -- the LoRA section ------------------------------------------------------------------------------


def _set_lora(
    updates: dict[str, tuple[Any, str]], name: str, value: Any, shown: str, where: str, from_text: bool
) -> None:
    """Records `lora.<name> = value` (given as key `shown`) in `updates`, type-checked."""
    known = lora_field_names()
    if name not in known:
        if name in LORA_SET_BY_TASK:
            raise ConfigError(f"config key {shown!r}{where}: the training command sets it, not the config")
        close = difflib.get_close_matches(name, known, n=1)
        hint = (
            f"; did you mean 'lora.{close[0]}'?" if close else f"; known keys under lora: {', '.join(known)}"
        )
        raise ConfigError(f"unknown config key {shown!r}{where}{hint}")
    if name in updates and updates[name][1] != shown:
        raise ConfigError(
            f"config keys {updates[name][1]!r} and {shown!r}{where} both set lora.{name}; keep one"
        )
    updates[name] = (_coerce_key(shown, value, _hints(LoraConfig)[name], from_text, where), shown)


def _module_selection(value):
    """target_modules / exclude_modules as the command line gives them, made what LoraConfig means:
    nothing -> None, one regular expression or "all-linear" -> that string."""
    if value == "" or (isinstance(value, list) and not value):
        return None
    if isinstance(value, list) and len(value) == 1:
        # `--target-modules all-linear` or `--target-modules '.*\.(q|v)_proj'` from the command line.
        only = value[0]
        if only == "all-linear" or any(ch in only for ch in "*+?[]()|\\^$"):
            return only
    return value


def _lora_with(start: LoraConfig, updates: dict[str, tuple[Any, str]]) -> LoraConfig:
    """`start` with `updates` ({field: (value, key as written)}), checked by LoraConfig; its errors
    name the key as the user wrote it."""
    changes = {name: value for name, (value, _) in updates.items()}
    for name in ("target_modules", "exclude_modules"):
        if name in changes:
            changes[name] = _module_selection(changes[name])
    try:
        return dataclasses.replace(start, **changes)
    except UserError as e:
        found = re.match(r"LoraConfig\.(\w+): (.*)", str(e), re.S)
        if not found:
            raise ConfigError(f"config key 'lora': {e}") from None
        name, why = found.groups()
        shown = updates[name][1] if name in updates else f"lora.{name}"
        raise ConfigError(f"config key {shown!r}: {why}") from None


# -- loading ---------------------------------------------------------------------------------------


def load_config(cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Builds a validated `cls` from its defaults, then the YAML file, then `overrides`.

    Override values may be strings (from the command line): they are read as YAML scalars, so
    ``"3e-4"`` becomes a float, ``"true"`` a bool and ``"q_proj,v_proj"`` a list where the field is one.
    LoRA settings: ``{"lora": {"r": 16}}``, ``{"lora.r": 16}``, ``{"lora_r": 16}`` or a whole
    ``{"lora": LoraConfig(...)}``.
    """
    layers = []
    if yaml_path:
        layers.append((_read_yaml(yaml_path), str(yaml_path)))
    if overrides:
        layers.append((overrides, None))
    return _build(cls, {}, layers)


def resolve_config(cls, config=None, overrides: dict[str, Any] | None = None):
    """What the Python API trains with: a validated copy of `config` (default: `cls()`) with
    `overrides` applied. The caller's object is left as it was."""
    if config is None:
        return load_config(cls, overrides=overrides)
    if not isinstance(config, cls):
        raise ConfigError(f"expected a {cls.__name__}, got {type(config).__name__}")
    return with_overrides(config, overrides)


def with_overrides(config, overrides: dict[str, Any] | None = None):
    """A validated copy of `config` with `overrides` (keys and values as `load_config` takes them)."""
    start = {f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
    return _build(type(config), start, [(overrides or {}, None)])


def _read_yaml(yaml_path: str | Path) -> dict:
    path = Path(yaml_path)
    if not path.is_file():
        raise NotFound(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not {type(data).__name__}")
    return data


def _build(cls, values: dict[str, Any], layers: list[tuple[dict, str | None]]):
    """`cls(**values)` after applying each (data, source) layer in turn, validated."""
    lora_updates: dict[str, tuple[Any, str]] = {}
    for data, source in layers:
        _apply_layer(cls, data, source, values, lora_updates)
    if "lora" in _hints(cls):
        values["lora"] = _lora_with(values.get("lora") or _default(cls, "lora"), lora_updates)
    config = cls(**values)
    config.validate()
    return config


def _apply_layer(cls, data: dict, source: str | None, values: dict, lora_updates: dict) -> None:
    """One layer's keys into `values`, its LoRA settings (``lora: {...}``, ``lora.FIELD``, the flat
    aliases) into `lora_updates`. Source None: the overrides, whose strings are command-line text;
    else the YAML file's name. One LoRA field set twice within a layer is an error."""
    hints = _hints(cls)
    has_lora = "lora" in hints
    text = source is None
    where = "" if text else f" in {source}"
    plain = {k: v for k, v in data.items() if not (has_lora and str(k).startswith("lora."))}
    _check_keys(cls, plain, source or "the overrides")
    if has_lora and isinstance(data.get("lora"), LoraConfig):  # a whole LoraConfig: the section so far goes
        values["lora"] = data["lora"]
        lora_updates.clear()
    layer: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        from_text = text and isinstance(value, str)
        if has_lora and key == "lora":
            if isinstance(value, dict):
                for sub, item in value.items():
                    _set_lora(layer, str(sub), item, f"lora.{sub}", where, text and isinstance(item, str))
            elif value is not None and not isinstance(value, LoraConfig):
                raise ConfigError(
                    f"config key 'lora'{where}: expected a mapping of LoraConfig fields "
                    f"(e.g. {{r: 8, lora_alpha: 16}}), got {value!r}"
                )
        elif has_lora and str(key).startswith("lora."):
            _set_lora(layer, key[len("lora.") :], value, key, where, from_text)
        elif has_lora and key in LORA_ALIASES:
            _set_lora(layer, LORA_ALIASES[key], value, key, where, from_text)
        else:
            values[key] = _coerce_key(key, value, hints[key], from_text, where)
    lora_updates.update(layer)


def config_to_dict(config) -> dict[str, Any]:
    """The config as plain data; `lora` nested, without the fields the task sets itself."""
    data = dataclasses.asdict(config)
    if isinstance(data.get("lora"), dict):
        data["lora"] = {k: v for k, v in data["lora"].items() if k not in LORA_SET_BY_TASK}
    return data


def config_to_yaml(config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True, width=1000)


def save_config(config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(config), encoding="utf-8")


# -- command line ----------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, cls, example: str | None = None) -> None:
    """Adds ``--config PATH`` and one flag per field with the field's docstring as help: ``--field-name``
    (``--field_name`` works too; `output_dir` is ``--out``), and for the LoRA settings ``--lora.FIELD``
    plus the older ``--lora-r``, ``--lora-alpha``, ``--lora-dropout``, ``--target-modules``. Flags left
    out do not override the YAML file."""
    docs = field_docs(cls)
    hints = _hints(cls)
    where = f"; see {example}" if example else ""
    parser.epilog = (
        f"Every flag is also a YAML key (the LoRA ones under `lora:`){where}. Flags may be spelled with "
        "dashes or underscores (--learning-rate, --learning_rate)."
    )
    parser.add_argument(
        "--config", metavar="YAML", default=None, help="YAML file of config keys (flags override it)"
    )
    group = parser.add_argument_group("configuration (YAML keys; flags override the file)")
    for f in dataclasses.fields(cls):
        if f.name == "lora":
            continue
        names = FLAG_ALIASES.get(f.name, []) + _spellings(f.name)
        help_text = f"{docs.get(f.name, '')} (default: {_default(cls, f.name)!r})"
        metavar = "DIR" if f.name == "output_dir" else None
        _add_flag(group, f.name, names, hints[f.name], help_text, f.metadata.get("repeat", False), metavar)
    if "lora" in hints:
        lora = parser.add_argument_group(
            "LoRA (YAML keys under `lora:`; PEFT's LoraConfig fields)", docs.get("lora")
        )
        defaults, lora_hints, texts = _default(cls, "lora"), _hints(LoraConfig), lora_docs(cls)
        alias_of = {v: k for k, v in LORA_ALIASES.items()}
        for name in lora_field_names():
            names = _spellings(alias_of[name]) if name in alias_of else []
            names += [f"--lora.{s[2:]}" for s in _spellings(name)]
            help_text = f"{texts.get(name, '')} (default: {getattr(defaults, name)!r})"
            _add_flag(lora, f"lora.{name}", names, lora_hints[name], help_text, False, None)


def _spellings(name: str) -> list[str]:
    """--field-name first (the command line's dialect), then --field_name."""
    dashed, plain = f"--{name.replace('_', '-')}", f"--{name}"
    return [dashed] if dashed == plain else [dashed, plain]


def _add_flag(group, dest: str, names: list[str], tp, help_text: str, repeat: bool, metavar: str | None):
    """The first spelling of each kind is shown in --help; the underscore spellings are accepted too."""
    kwargs: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS)
    if repeat:
        kwargs.update(action="append", metavar="VALUE")
    elif tp is bool:
        # `--packing` alone means true; `--packing false` is accepted too.
        kwargs.update(nargs="?", const="true", metavar="BOOL")
    elif typing.get_origin(tp) is Literal:
        kwargs.update(choices=list(typing.get_args(tp)))
    elif typing.get_origin(tp) is list or list in [typing.get_origin(a) for a in typing.get_args(tp)]:
        kwargs.update(metavar="A,B,...")
    else:
        kwargs.update(metavar=metavar or _metavar(tp))
    shown = [n for n in names if "_" not in n.split(".")[-1]] or names[:1]
    hidden = [n for n in names if n not in shown]
    group.add_argument(*shown, help=help_text.replace("%", "%%"), **kwargs)
    if hidden:
        group.add_argument(*hidden, help=argparse.SUPPRESS, **kwargs)


def _metavar(tp) -> str:
    if typing.get_origin(tp) is dict:
        return "MAPPING"
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return {int: "N", float: "X", str: "STR"}.get(args[0], "VALUE")


def overrides_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names or (k.startswith("lora.") and "lora" in names)}


def config_from_args(cls, args: argparse.Namespace):
    """The config for parsed arguments from a parser set up by `add_config_arguments`."""
    return load_config(cls, getattr(args, "config", None), overrides_from_args(cls, args))


# -- example file ----------------------------------------------------------------------------------


def example_yaml(cls, header: str | None = None) -> str:
    """A YAML file with every field at its default, each preceded by its documentation as comments;
    the LoRA settings nested under `lora:`, documented as LoraConfig documents them."""
    docs = field_docs(cls)
    lines = []
    title = header or (inspect.getdoc(cls) or cls.__name__).splitlines()[0]
    lines += [
        f"# {title}",
        "# Generated from the dataclass by loraforge.train.config.example_yaml; every key is optional.",
        "",
    ]
    for f in dataclasses.fields(cls):
        default = _default(cls, f.name)
        lines += _commented(docs.get(f.name, ""), "")
        if isinstance(default, LoraConfig):
            lines.append(f"{f.name}:")
            texts = lora_docs(cls)
            for name in lora_field_names():
                lines += _commented(texts.get(name, ""), "  ")
                lines.append("  " + _yaml_line(name, getattr(default, name)))
                lines.append("")
            continue
        lines.append(_yaml_line(f.name, default))
        lines.append("")
    return "\n".join(lines)


def _commented(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width=100 - len(indent))]


def _yaml_line(key: str, value: Any) -> str:
    dumped = yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False, width=1000).strip()
    # safe_dump in flow style wraps the mapping in braces; write the plain `key: value` line.
    if dumped.startswith("{") and dumped.endswith("}"):
        dumped = dumped[1:-1]
    return dumped
