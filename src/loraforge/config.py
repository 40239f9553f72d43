"""`LoraConfig`: which modules get an adapter, and how it is shaped. Field names follow PEFT's.

The dataclass is written to and read from PEFT's `adapter_config.json`, so a file made here loads in
PEFT and a file made by PEFT loads here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from loraforge.errors import NotFound, UserError

CONFIG_NAME = "adapter_config.json"
INIT_CHOICES = (True, False, "gaussian", "pissa")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter.

    Args:
        r: Rank of the update B·A. Default 8.
        lora_alpha: Scale numerator: the update is multiplied by lora_alpha / r
            (lora_alpha / sqrt(r) with `use_rslora`). Default 8.
        lora_dropout: Dropout applied to the adapter's input during training. Default 0.0.
        target_modules: Which modules get an adapter: a list of exact module names or name suffixes
            (``["q_proj", "v_proj"]``), a regular expression matched against the full name, or
            ``"all-linear"`` for every linear layer except the output head. Default None (required
            unless the model type has known defaults).
        exclude_modules: Names, suffixes or a regex of modules never to adapt. Default None.
        bias: Which biases train: ``"none"``, ``"all"`` or ``"lora_only"`` (biases of adapted layers).
            Default ``"none"``.
        modules_to_save: Modules trained in full and saved with the adapter, e.g. a new classifier
            head. Default None.
        layers_to_transform: Only adapt these layer indices. Default None (all layers).
        layers_pattern: Name of the module list holding the layers (e.g. ``"layers"``, ``"h"``), used
            with `layers_to_transform`. Default None (any ``.<digits>.`` in the name).
        rank_pattern: Per-module rank overrides, ``{name or regex: r}``. Default empty.
        alpha_pattern: Per-module alpha overrides, ``{name or regex: alpha}``. Default empty.
        use_rslora: Scale by lora_alpha / sqrt(r) (rank-stabilised LoRA). Default False.
        init_lora_weights: True: A Kaiming-uniform and B zero, so a new adapter changes nothing.
            ``"gaussian"``: A normal(0, 1/r), B zero. ``"pissa"``: A and B from the top-r singular
            vectors of W, which keeps the rest as the frozen residual. False: A and B both random
            (tests only). Default True.
        use_dora: Weight-decomposed LoRA (DoRA): a trained magnitude per output channel times the
            direction of W + ΔW, as PEFT implements it (saved as ``lora_magnitude_vector``). Linear and
            convolution layers. Default False.
        fan_in_fan_out: The base weight is stored (in, out), as GPT-2's Conv1D does. Set
            automatically for Conv1D. Default False.
        base_model_name_or_path: Recorded in the file so a user knows which base the adapter is for.
        task_type: PEFT's task type string (e.g. ``"CAUSAL_LM"``), recorded in the file.
        inference_mode: Recorded in the file; True once saved.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    use_dora: bool = False
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        def fail(name, why):
            raise UserError(f"LoraConfig.{name}: {why} (got {getattr(self, name)!r})")

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            fail("r", "must be a positive integer")
        if (
            not isinstance(self.lora_alpha, int | float)
            or isinstance(self.lora_alpha, bool)
            or self.lora_alpha <= 0
        ):
            fail("lora_alpha", "must be a positive number")
        if not isinstance(self.lora_dropout, int | float) or not 0 <= self.lora_dropout < 1:
            fail("lora_dropout", "must be in [0, 1)")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, set | tuple):
                setattr(self, name, sorted(value))
                value = getattr(self, name)
            if value is None or isinstance(value, str):
                if isinstance(value, str) and value != "all-linear":
                    try:
                        re.compile(value)
                    except re.error as e:
                        fail(name, f"is not a valid regular expression: {e}")
                continue
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                fail(name, "must be a non-empty list of module names, a regex string or 'all-linear'")
        if self.bias not in BIAS_CHOICES:
            fail("bias", f"must be one of {BIAS_CHOICES}")
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(m, str) for m in self.modules_to_save)
        ):
            fail("modules_to_save", "must be a list of module names")
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and not (
            isinstance(self.layers_to_transform, list)
            and all(isinstance(i, int) and i >= 0 for i in self.layers_to_transform)
        ):
            fail("layers_to_transform", "must be a non-negative integer or a list of them")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            fail("layers_pattern", "only makes sense together with layers_to_transform")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                for k, v in value.items()
            ):
                fail(name, "must map module names/patterns to positive numbers")
        if any(not isinstance(v, int) for v in self.rank_pattern.values()):
            fail("rank_pattern", "ranks must be integers")
        if self.init_lora_weights not in INIT_CHOICES:
            fail("init_lora_weights", f"must be one of {INIT_CHOICES}")
        if not isinstance(self.use_rslora, bool):
            fail("use_rslora", "must be true or false")
        if not isinstance(self.use_dora, bool):
            fail("use_dora", "must be true or false")

    # -- per-module values -------------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        return int(_pattern_lookup(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return _pattern_lookup(self.alpha_pattern, module_name, self.lora_alpha)

    # -- PEFT's adapter_config.json ----------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        # PEFT reads these extra keys; writing them keeps its loader on the plain LoRA path.
        d.update(peft_type="LORA", revision=None)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        d = dict(d)
        peft_type = d.pop("peft_type", "LORA")
        if peft_type != "LORA":
            raise UserError(f"adapter config is of type {peft_type!r}; loraforge reads LoRA adapters only")
        if d.get("use_dora") is None:
            d.pop("use_dora", None)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for key in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(key) is None:
                kwargs[key] = {}
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LoraConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise NotFound(f"no {CONFIG_NAME} in {directory}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


def name_matches(name: str, key: str) -> bool:
    """True when `key` is the module's full name, a dotted suffix of it, or a regex matching a suffix."""
    if name == key or name.endswith("." + key):
        return True
    try:
        return re.fullmatch(rf"(.*\.)?(?:{key})", name) is not None
    except re.error:
        return False


def _pattern_lookup(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if name_matches(module_name, key):
            return value
    return default
