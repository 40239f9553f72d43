"""Training configuration: one dataclass per kind of run, documented field by field.

Each field's documentation is the string literal written right under it (an "attribute docstring").
That one text becomes the `--field` help of the command line, the comment above the key in
`examples/*.yaml`, and nothing else has to be kept in sync.

Values come from three layers, later ones winning::

    dataclass defaults  <  YAML file (--config run.yaml)  <  command-line flags (--learning_rate 3e-4)

and every value is checked against the field's type; an unknown key or a value of the wrong type is
an error that names the key.

    config = load_config(TextTrainConfig, "run.yaml", overrides={"max_steps": "200"})
    add_config_arguments(parser, TextTrainConfig)       # --output_dir, --learning_rate, ...
    config = config_from_args(TextTrainConfig, args)     # --config PATH plus the flags given
    print(example_yaml(TextTrainConfig))
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loraforge.errors import NotFound, UserError


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

    max_grad_norm: float = 1.0
    """Clip the gradient to this global L2 norm before each step. 0 turns clipping off."""

    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast the forward pass: no, bf16 or fp16 (fp16 needs a GPU). The adapter weights stay float32."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, ~30% slower."""

    eval_every: int = 0
    """Compute the held-out loss every N steps (and always at the end). 0: only at the end."""

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
    directory. The rest of the configuration should match the interrupted run."""

    strict: bool = False
    """Stop at the first bad data row instead of skipping it (bad rows are always reported)."""

    lora_r: int = 8
    """Rank of each LoRA update."""

    lora_alpha: float = 16.0
    """LoRA scale numerator: updates are multiplied by lora_alpha / lora_r."""

    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training."""

    target_modules: list[str] | str | None = None
    """Modules that get an adapter: a list of names or suffixes, a regular expression, or "all-linear".
    Empty: the task's default."""

    tensorboard: bool = True
    """Also write metrics as TensorBoard events under output_dir/tensorboard."""

    progress_bar: bool = True
    """Show a progress bar with loss, tokens/s and the time left."""

    threads: int = 0
    """CPU threads for PyTorch on each process. 0: PyTorch's default, lowered to the cores the other
    processes on the machine leave free (a busy shared CPU runs faster with fewer threads). Set it
    for bit-identical reruns."""

    def validate(self) -> None:
        """Checks relations between values; raises ValueError naming the field."""
        positive = ("batch_size", "grad_accum", "lora_r", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                _bad(name, getattr(self, name), "must be > 0")
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
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "must be >= 0")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            _bad("learning_rate", self.learning_rate, "must be a positive number")
        if self.max_steps == 0 and self.epochs == 0:
            _bad("epochs", self.epochs, "must be > 0 when max_steps is 0")
        if not 0 <= self.lora_dropout < 1:
            _bad("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if self.lora_alpha <= 0:
            _bad("lora_alpha", self.lora_alpha, "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            _bad("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if not self.output_dir:
            _bad("output_dir", self.output_dir, "must not be empty")
        if isinstance(self.target_modules, list) and not self.target_modules:
            self.target_modules = None
        if isinstance(self.target_modules, list) and len(self.target_modules) == 1:
            # `--target_modules all-linear` or `--target_modules '.*\.(q|v)_proj'` from the command line.
            only = self.target_modules[0]
            if only == "all-linear" or any(ch in only for ch in "*+?[]()|\\^$"):
                self.target_modules = only
        if self.target_modules == "":
            self.target_modules = None


@dataclass
class TextTrainConfig(TrainConfig):
    """`loraforge train`: LoRA on a causal language model."""

    output_dir: str = "runs/text"
    """Directory for the run: the final adapter (`adapter/`), checkpoints, metrics, samples, loss curve."""

    learning_rate: float = 5e-3
    """Peak learning rate of AdamW (reached after the warmup). The default suits the small embedded
    base; for billion-parameter bases 1e-4 to 3e-4 is the usual range."""

    batch_size: int = 16
    """Examples per micro-batch on each process."""

    epochs: float = 3.0
    """Passes over the training data, used when max_steps is 0. Fractions are allowed (0.5 = half)."""

    warmup_steps: int = 20
    """Steps over which the learning rate rises linearly from 0 to learning_rate."""

    eval_every: int = 100
    """Compute the held-out loss every N steps (and always at the end). 0: only at the end."""

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
    """Dtype the base weights are loaded in. The adapter always trains in float32."""

    trust_remote_code: bool = False
    """Allow models whose code lives in their hub repository (only for bases you trust)."""

    def validate(self) -> None:
        super().validate()
        if self.max_length < 2:
            _bad("max_length", self.max_length, "must be >= 2")
        if self.sample_max_new_tokens <= 0:
            _bad("sample_max_new_tokens", self.sample_max_new_tokens, "must be > 0")
        if not self.base:
            _bad("base", self.base, "must not be empty")


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


# -- types -----------------------------------------------------------------------------------------


def _bad(name: str, value: Any, why: str):
    raise UserError(f"config key {name!r}: {why} (got {value!r})")


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
            # `--target_modules q_proj,v_proj`
            return _coerce([v.strip() for v in value.split(",") if v.strip()], tp, False)
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


def _check_keys(cls, data: dict, source: str):
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise UserError(f"unknown config key {key!r} in {source}{hint}")


def load_config(cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Builds a validated `cls` from its defaults, then the YAML file, then `overrides`.

    Override values may be strings (from the command line): they are read as YAML scalars, so
    ``"3e-4"`` becomes a float, ``"true"`` a bool and ``"q_proj,v_proj"`` a list where the field is one.
    """
    hints = _hints(cls)
    values: dict[str, Any] = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise NotFound(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid YAML: {e}") from e
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{path} must hold a mapping of config keys, not {type(data).__name__}")
        _check_keys(cls, data, str(path))
        for key, value in data.items():
            try:
                values[key] = _coerce(value, hints[key], from_text=False)
            except _Mismatch:
                raise UserError(
                    f"config key {key!r} in {path}: expected {_describe(hints[key])}, got {value!r}"
                ) from None
    for key, value in (overrides or {}).items():
        _check_keys(cls, {key: value}, "the overrides")
        try:
            values[key] = _coerce(value, hints[key], from_text=isinstance(value, str))
        except _Mismatch:
            raise UserError(f"config key {key!r}: expected {_describe(hints[key])}, got {value!r}") from None
    config = cls(**values)
    config.validate()
    return config


def config_to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_to_yaml(config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True, width=1000)


def save_config(config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(config), encoding="utf-8")


# -- command line ----------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Adds ``--config PATH`` and one ``--field VALUE`` flag per field (``--field-name`` works too),
    with the field's docstring as help. Flags left out do not override the YAML file."""
    docs = field_docs(cls)
    hints = _hints(cls)
    parser.add_argument(
        "--config", metavar="YAML", default=None, help="YAML file of config keys (flags override it)"
    )
    group = parser.add_argument_group("configuration (YAML keys; flags override the file)")
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if f.metadata.get("repeat"):
            kwargs.update(action="append", metavar="VALUE")
        elif tp is bool:
            # `--packing` alone means true; `--packing false` is accepted too.
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif typing.get_origin(tp) is Literal:
            kwargs.update(choices=list(typing.get_args(tp)))
        elif typing.get_origin(tp) is list or list in [typing.get_origin(a) for a in typing.get_args(tp)]:
            kwargs.update(metavar="A,B,...")
        else:
            kwargs.update(metavar=_metavar(tp))
        group.add_argument(*names, **kwargs)


def _metavar(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return {int: "N", float: "X", str: "STR"}.get(args[0], "VALUE")


def overrides_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(cls, args: argparse.Namespace):
    """The config for parsed arguments from a parser set up by `add_config_arguments`."""
    return load_config(cls, getattr(args, "config", None), overrides_from_args(cls, args))


# -- example file ----------------------------------------------------------------------------------


def example_yaml(cls, header: str | None = None) -> str:
    """A YAML file with every field at its default, each preceded by its documentation as comments."""
    docs = field_docs(cls)
    lines = []
    title = header or (inspect.getdoc(cls) or cls.__name__).splitlines()[0]
    lines += [
        f"# {title}",
        "# Generated from the dataclass by loraforge.train.config.example_yaml; every key is optional.",
        "",
    ]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for line in textwrap.wrap(docs.get(f.name, ""), width=100):
            lines.append(f"# {line}")
        dumped = yaml.safe_dump(
            {f.name: default}, default_flow_style=True, sort_keys=False, width=1000
        ).strip()
        # safe_dump in flow style wraps the mapping in braces; write the plain `key: value` line.
        if dumped.startswith("{") and dumped.endswith("}"):
            dumped = dumped[1:-1]
        lines.append(dumped)
        lines.append("")
    return "\n".join(lines)
