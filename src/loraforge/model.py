"""`LoraModel`: a frozen base model with named LoRA adapters, and PEFT's methods to drive them.

model = get_lora_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
model.print_trainable_parameters()
... train ...
model.save_pretrained("out/adapter")          # PEFT's files
merged = model.merge_and_unload()              # plain base model with W' = W + scale * B @ A
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from loraforge.config import LoraConfig, name_matches
from loraforge.errors import IncompatibleAdapter, UserError
from loraforge.kernels import checkpointing, fused_gated_mlp, gated_mlps, patched_forwards
from loraforge.layers import (
    LoraEmbedding,
    LoraLayer,
    TrainableCopy,
    dora_mixed_error,
    is_gpt2_conv1d,
    supported,
    wrap,
)
from loraforge.quant import dequantize_model, dequantized_linear, model_quantization

BASE_ROW = "__base__"  # adapter name meaning "no adapter" for a row of a mixed batch

Mix = tuple[tuple[str, float], ...]  # a weighted combination of adapters; () is the bare base


def as_mix(entry: str | Mix) -> Mix:
    """One row of a mixed batch as a Mix: ``BASE_ROW`` is ``()``, a name is ``((name, 1.0),)``, and a
    sequence of (name, weight) pairs is kept in order (each name once)."""
    if isinstance(entry, str):
        return () if entry == BASE_ROW else ((entry, 1.0),)
    try:
        mix = tuple((str(name), float(weight)) for name, weight in entry)
    except (TypeError, ValueError):
        raise UserError(
            f"a mixed-batch row must be an adapter name or (name, weight) pairs, not {entry!r}"
        ) from None
    names = [name for name, _ in mix]
    if len(set(names)) != len(names):
        raise UserError(f"a mix names an adapter twice: {names}")
    return mix


class LoraModel(nn.Module):
    """Wraps a model; forwards to it. Attributes it does not have are looked up on the base model.

    Args:
        model: Any PyTorch model. Its modules are replaced in place by LoRA wrappers.
        config: Configuration of the first adapter, or None for a model with no adapter yet.
        adapter_name: Name of the first adapter. Default ``"default"``.
    """

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self.adapter_weights: list[float] = []
        self._gated_mlps: list[nn.Module] | None = None  # found at the first training forward
        self._batch_parts: list[nn.Module] | None = None  # LoRA layers and copies, for mixed batches
        for p in self.model.parameters():
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, *args, adapter_names: list[str | Mix] | None = None, **kwargs):
        """Calls the base model. `adapter_names` gives each batch row its own adapter: a name,
        ``"__base__"`` for none, or a `Mix` of (name, weight) pairs, which adds the weighted sum of
        those adapters' updates, as `set_adapters(names, weights)` would for the whole batch."""
        if adapter_names is None:
            with self._training_kernels():
                return self.model(*args, **kwargs)
        with self._mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def _training_kernels(self):
        """While autograd records, gated MLPs with adapters run as one fused kernel (half their activation
        memory; see `loraforge.kernels`), unless activation checkpointing would re-run the forward."""
        if not torch.is_grad_enabled() or checkpointing(self.model):
            return contextlib.nullcontext()
        if self._gated_mlps is None:
            self._gated_mlps = gated_mlps(self.model)
        return patched_forwards(self._gated_mlps, fused_gated_mlp)

    def generate(self, *args, adapter_names: list[str | Mix] | None = None, **kwargs):
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self._mixed_batch(adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str | Mix]):
        rows = [as_mix(entry) for entry in adapter_names]
        # Distinct mixes in a fixed order, so that rows moving around (a server's batch as sequences
        # join and leave) keep the layers' cached stacked weights valid.
        slots = sorted(set(rows))
        for mix in slots:
            for name, _ in mix:
                self._check_exists(name)
                if self.peft_config[name].use_dora:
                    raise UserError(dora_mixed_error(name))
        if self._batch_parts is None:  # walking every module costs ms per forward on a server
            self._batch_parts = self.lora_layers() + self._trainable_copies()
        parts = self._batch_parts
        if any(isinstance(part, LoraLayer) and part.merged for part in parts):
            raise RuntimeError("mixed-batch inference needs unmerged adapters; call unmerge_adapter() first")
        device = next(self.model.parameters()).device
        position = {mix: i for i, mix in enumerate(slots)}
        index = torch.tensor([position[mix] for mix in rows], device=device)
        for part in parts:
            part.batch_slots, part.batch_index = slots, index
        try:
            yield
        finally:
            for part in parts:
                part.batch_slots = part.batch_index = None

    # -- modules -----------------------------------------------------------------------------------

    def lora_layers(self) -> list[LoraLayer]:
        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def _named_lora_layers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def _trainable_copies(self) -> list[TrainableCopy]:
        return [m for m in self.model.modules() if isinstance(m, TrainableCopy)]

    def base_modules(self):
        """(name, module) of the base model as the user knows it: LoRA wrappers count as their base layer,
        modules_to_save copies as their original module (nothing inside either is listed)."""
        return base_modules(self.model)

    def base_parameters(self):
        """(name, parameter) of the base model under the names it has without any wrapper (no LoRA
        matrices, no modules_to_save copies)."""
        return base_parameters(self.model)

    def adapter_layers(self, adapter_name: str) -> list[tuple[str, LoraLayer]]:
        """(module path, LoRA layer) of every layer that holds adapter `adapter_name`."""
        return [(n, m) for n, m in self._named_lora_layers() if adapter_name in m.lora_A]

    def adapter_copies(self, adapter_name: str) -> list[tuple[str, nn.Module]]:
        """(module path, trained copy) of every modules_to_save module of adapter `adapter_name`."""
        return [
            (n, m.modules_to_save[adapter_name])
            for n, m in self.model.named_modules()
            if isinstance(m, TrainableCopy) and adapter_name in m.modules_to_save
        ]

    def find_targets(self, config: LoraConfig) -> list[str]:
        """Names of the modules `config` adapts in this model; an error if there are none."""
        head = self._output_head_name()
        targets, unsupported = [], []
        for name, module in self.base_modules():
            if not _targeted(name, module, config, head):
                continue
            if config.modules_to_save and any(name_matches(name, k) for k in config.modules_to_save):
                continue
            if supported(module):
                targets.append(name)
            elif config.target_modules != "all-linear" and not list(module.children()):
                unsupported.append(f"{name} ({type(module).__name__})")
        if unsupported:
            raise UserError(
                "target_modules matched layers loraforge cannot adapt (supported: Linear, Conv1d, Conv2d, "
                f"Embedding, GPT-2 Conv1D): {', '.join(unsupported[:5])}"
            )
        if not targets:
            sample = sorted({name.split(".")[-1] for name, m in self.base_modules() if supported(m)})
            raise UserError(
                f"target_modules={config.target_modules!r} matched no module of {type(self.model).__name__}. "
                f"Adaptable module names in this model include: {', '.join(sample[:25])}"
            )
        return targets

    def _output_head_name(self) -> str | None:
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        for name, module in self.base_modules():
            if module is head:
                return name
        return None

    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _replace(self, name: str, new: nn.Module):
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)
        self._gated_mlps = self._batch_parts = None  # the structure changed: find them again

    # -- adapters ----------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: LoraConfig):
        """Adds a new adapter (not yet active). The model is unchanged if this raises."""
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
        self._check_new_name(adapter_name)
        targets = self.find_targets(config)
        save_names = self.modules_to_save_for(config)
        for name in targets:
            module = self._module(name)
            if not isinstance(module, LoraLayer):
                if isinstance(module, TrainableCopy):
                    raise UserError(
                        f"{name} is in modules_to_save of another adapter and cannot also get LoRA"
                    )
                module = wrap(module)
                self._replace(name, module)
            module.add_adapter(
                adapter_name,
                r=config.rank_for(name),
                lora_alpha=config.alpha_for(name),
                lora_dropout=config.lora_dropout,
                init=config.init_lora_weights,
                use_rslora=config.use_rslora,
                use_dora=config.use_dora,
            )
        for name in save_names:
            module = self._module(name)
            if not isinstance(module, TrainableCopy):
                module = TrainableCopy(module)
                self._replace(name, module)
            module.add_adapter(adapter_name)
        config.target_modules = _compact_targets(targets, config.target_modules)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = (
                getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
            )
        self.peft_config[adapter_name] = config
        self._mark_trainable()

    def _check_new_name(self, adapter_name: str):
        if (
            not isinstance(adapter_name, str)
            or not adapter_name
            or "." in adapter_name
            or adapter_name == BASE_ROW
        ):
            raise UserError(
                f"invalid adapter name {adapter_name!r}: a non-empty string without dots, not {BASE_ROW!r}"
            )
        if adapter_name in self.peft_config:
            raise UserError(
                f"an adapter named {adapter_name!r} already exists; pick another name or delete it"
            )
        if hasattr(nn.ParameterDict(), adapter_name):
            raise UserError(
                f"invalid adapter name {adapter_name!r}: it clashes with a torch.nn.Module attribute"
            )

    def modules_to_save_for(self, config: LoraConfig) -> list[str]:
        """Paths of the modules `config` trains in full (its modules_to_save); an error if it names some
        and none matches."""
        if not config.modules_to_save:
            return []
        found = [n for n, _ in self.base_modules() if any(name_matches(n, k) for k in config.modules_to_save)]
        # Keep only outermost matches (a head and its own children would otherwise both be copied).
        found = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
        if not found:
            raise UserError(f"modules_to_save={config.modules_to_save!r} matched no module")
        return found

    def trained_biases(self, config: LoraConfig, targets: list[str] | None = None) -> dict[str, nn.Parameter]:
        """The base model's biases that an adapter with `config` trains, by the path its adapter file
        stores each under. This is the one bias rule, used for training, saving and loading.

        ``bias="lora_only"``: the biases of the layers it adapts; ``"all"``: every bias of the base model
        except those inside its modules_to_save (their copies are saved whole); ``"none"``: none.
        `targets` are the modules its LoRA layers sit on (default: those `config` selects). Paths are
        PEFT's: a bias of an adapted layer is ``<path>.base_layer.bias``, as in a model that carries only
        this adapter."""
        if config.bias == "none":
            return {}
        targets = set(self.find_targets(config) if targets is None else targets)
        copies = self.modules_to_save_for(config)
        out = {}
        for name, p in self.base_parameters():
            module, _, leaf = name.rpartition(".")
            if not leaf.endswith("bias") or any(name.startswith(c + ".") for c in copies):
                continue
            if module in targets:
                out[f"{module}.base_layer.{leaf}"] = p
            elif config.bias == "all":
                out[name] = p
        return out

    def add_adapter_with_weights(
        self,
        adapter_name: str,
        config: LoraConfig,
        lora_weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
        other_tensors: dict[str, torch.Tensor] | None = None,
        where: str = "adapter",
    ):
        """Adds adapter `adapter_name` with `config` and the given tensors, as one step: everything is
        checked before the model changes, and if copying fails the adapter is removed again and every
        base tensor it overwrote is restored.

        Args:
            lora_weights: module path (as `base_modules` names it) -> (A, B), for exactly the modules
                `config` selects; (A, B, magnitude) for a DoRA adapter (``config.use_dora``), the
                magnitude of any shape holding one value per output channel. A linear layer and a 1x1
                convolution hold the same matrix, so either shape is accepted for both.
            other_tensors: the adapter's other trained tensors, by path: biases (see `trained_biases`),
                modules_to_save (``<module>.<parameter>``, copied into this adapter's copy) and full
                embedding matrices (``<embedding>.weight``), which are base weights shared by all adapters.
                The parameters of an adapted layer may be spelled with or without ``.base_layer``.
            where: how error messages name the adapter (e.g. ``"adapter in runs/x"``).
        """
        self._check_new_name(adapter_name)
        modules = dict(self.base_modules())
        for name in lora_weights:
            if name not in modules:
                raise IncompatibleAdapter(
                    f"{where} does not fit this model: {name!r} has no matching module (the model has no "
                    "module of that name; is the adapter for another base model?)"
                )
            if not supported(modules[name]):
                raise IncompatibleAdapter(
                    f"{where}: {name} is a {type(modules[name]).__name__}, which LoRA cannot adapt"
                )
        targets = self.find_targets(config)
        missing = [n for n in targets if n not in lora_weights]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise IncompatibleAdapter(
                f"{where} does not fit this model: its config selects {missing[0]!r}{more}, "
                "but it has no LoRA weights for it"
            )
        extra = sorted(set(lora_weights) - set(targets))
        if extra:
            raise IncompatibleAdapter(
                f"{where} does not fit this model: it has LoRA weights for {extra[0]!r}, which its config "
                "does not select here"
            )
        lora = {}
        for name in targets:
            current = self._module(name)
            layer = current if isinstance(current, LoraLayer) else wrap(modules[name])
            r = config.rank_for(name)
            a_key, b_key = _lora_keys(name, layer)
            A, B, *magnitude = lora_weights[name]
            if bool(magnitude) != config.use_dora:
                raise IncompatibleAdapter(
                    f"{where}: {name} has {'a' if magnitude else 'no'} DoRA magnitude vector "
                    f"(lora_magnitude_vector) but its config says use_dora={config.use_dora}"
                )
            if config.use_dora and not layer.dora_supported:
                raise IncompatibleAdapter(
                    f"{where}: {name} is a {type(modules[name]).__name__}; loraforge supports DoRA on linear "
                    "and convolution layers only"
                )
            fitted = [_fit(A, layer.a_shape(r), where, a_key), _fit(B, layer.b_shape(r), where, b_key)]
            if magnitude:
                m = magnitude[0]
                if m.numel() != layer.out_features:
                    raise IncompatibleAdapter(
                        f"{where} does not fit this model: {name}.lora_magnitude_vector has shape "
                        f"{tuple(m.shape)} but the layer has {layer.out_features} output channels"
                    )
                fitted.append(m.reshape(-1))
            lora[name] = tuple(fitted)
        slots = self._tensor_slots(config, targets)
        others = {}
        for file_key, tensor in (other_tensors or {}).items():
            key = _unwrapped(file_key)
            if key not in slots:
                raise IncompatibleAdapter(
                    f"{where} does not fit this model: {file_key!r} has no matching module or parameter "
                    "(is the adapter for another base model?)"
                )
            shape = tuple(slots[key][-1])
            if tuple(tensor.shape) != shape:
                raise IncompatibleAdapter(
                    f"{where} does not fit this model: {file_key!r} has shape {tuple(tensor.shape)} but the "
                    f"model needs {shape}"
                )
            others[key] = tensor
        base = {key: slots[key][1] for key in others if slots[key][0] == "base"}
        backup = {key: p.detach().clone() for key, p in base.items()}
        self.add_adapter(adapter_name, config)
        try:
            with torch.no_grad():
                for name, (A, B, *magnitude) in lora.items():
                    layer = self._module(name)
                    layer.lora_A[adapter_name].copy_(A)
                    layer.lora_B[adapter_name].copy_(B)
                    if magnitude:
                        layer.lora_magnitude_vector[adapter_name].copy_(magnitude[0])
                for key, tensor in others.items():
                    kind, target, _ = slots[key]
                    if kind == "base":
                        target.copy_(tensor)
                    else:
                        module, pname = target
                        copy = self._module(module).modules_to_save[adapter_name]
                        copy.state_dict()[pname].copy_(tensor)
        except BaseException:
            with torch.no_grad():
                for key, p in base.items():
                    p.copy_(backup[key])
            self.delete_adapter(adapter_name)
            raise

    def _tensor_slots(self, config: LoraConfig, targets: list[str]) -> dict[str, tuple]:
        """Path (without ``.base_layer``) -> ("base", parameter, shape) or ("copy", (module, name in its
        state), shape): where each non-LoRA tensor of an adapter with `config` (LoRA on `targets`) goes."""
        slots: dict[str, tuple] = {}
        for key, p in self.trained_biases(config, targets).items():
            slots[_unwrapped(key)] = ("base", p, p.shape)
        modules = dict(self.base_modules())
        # Targeted embedding matrices, and the model's input/output embeddings, may be stored in full
        # (PEFT does when they were resized).
        embeddings = [n for n in targets if isinstance(modules[n], nn.Embedding)]
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            get = getattr(self.model, getter, None)
            module = get() if callable(get) else None
            embeddings += [n for n, m in modules.items() if module is not None and m is module]
        for name in embeddings:
            weight = getattr(modules[name], "weight", None)
            if isinstance(weight, nn.Parameter):
                slots[f"{name}.weight"] = ("base", weight, weight.shape)
        for name in self.modules_to_save_for(config):
            for pname, t in modules[name].state_dict().items():
                slots[f"{name}.{pname}"] = ("copy", (name, pname), t.shape)
        return slots

    def _check_exists(self, name: str):
        if name not in self.peft_config:
            raise UserError(
                f"unknown adapter {name!r}; this model has: {', '.join(self.peft_config) or 'none'}"
            )

    def set_adapter(self, adapter_name: str | list[str]):
        """Makes this adapter (or these adapters, each at weight 1) the active, trainable one(s)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self.set_adapters(names, [1.0] * len(names))

    def set_adapters(self, adapter_names: list[str], weights: list[float] | None = None):
        """Activates several adapters at once, each scaled by its weight (default 1.0)."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        weights = [1.0] * len(adapter_names) if weights is None else list(weights)
        if len(weights) != len(adapter_names):
            raise UserError(f"set_adapters got {len(adapter_names)} adapters but {len(weights)} weights")
        if len(set(adapter_names)) != len(adapter_names):
            raise UserError(f"set_adapters got a name twice: {adapter_names}")
        for name in adapter_names:
            self._check_exists(name)
        if any(layer.merged for layer in self.lora_layers()):
            raise RuntimeError("unmerge the merged adapters before changing the active ones")
        self.active_adapters, self.adapter_weights = list(adapter_names), [float(w) for w in weights]
        pairs = list(zip(self.active_adapters, self.adapter_weights))
        for layer in self.lora_layers():
            layer.active = [(n, w) for n, w in pairs if n in layer.lora_A]
        for copy in self._trainable_copies():
            copy.active = next((n for n in adapter_names if n in copy.modules_to_save), None)
        self._mark_trainable()

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else self.active_adapters

    def _mark_trainable(self):
        active = set(self.active_adapters)
        for layer in self.lora_layers():
            for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
                for name, p in store.items():
                    p.requires_grad_(name in active)
        for copy in self._trainable_copies():
            for name, module in copy.modules_to_save.items():
                module.requires_grad_(name in active)
        trained = set()
        for name in active:
            targets = [n for n, _ in self.adapter_layers(name)]
            trained.update(id(p) for p in self.trained_biases(self.peft_config[name], targets).values())
        for name, p in self.base_parameters():
            if name.endswith("bias"):
                p.requires_grad_(id(p) in trained)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: inside it the model computes as the bare base model."""
        layers, copies = self.lora_layers(), self._trainable_copies()
        if any(layer.merged for layer in layers):
            raise RuntimeError("cannot disable merged adapters; call unmerge_adapter() first")
        for m in layers + copies:
            m.disabled = True
        try:
            yield
        finally:
            for m in layers + copies:
                m.disabled = False

    def delete_adapter(self, adapter_name: str):
        self._check_exists(adapter_name)
        for name, layer in self._named_lora_layers():
            if adapter_name in layer.lora_A:
                layer.delete_adapter(adapter_name)
                if not layer.lora_A:
                    self._replace(name, layer.base_layer)
        for name, copy in [(n, m) for n, m in self.model.named_modules() if isinstance(m, TrainableCopy)]:
            if adapter_name in copy.modules_to_save:
                copy.delete_adapter(adapter_name)
                if not copy.modules_to_save:
                    self._replace(name, copy.original_module)
        del self.peft_config[adapter_name]
        if adapter_name in self.active_adapters:
            i = self.active_adapters.index(adapter_name)
            del self.active_adapters[i], self.adapter_weights[i]
        self._mark_trainable()

    # -- merging -----------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None):
        """Adds the active adapters (or those named, at weight 1) into the base weights."""
        if adapter_names is None:
            pairs = list(zip(self.active_adapters, self.adapter_weights))
        else:
            for name in adapter_names:
                self._check_exists(name)
            pairs = [(n, 1.0) for n in adapter_names]
        names = {n for n, _ in pairs}
        for layer in self.lora_layers():
            if names & set(layer.lora_A) and layer.quantized:
                layer._check_mergeable()  # refuses before any layer changed
        for layer in self.lora_layers():
            layer.merge(pairs)

    def unmerge_adapter(self):
        for layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Merges the active adapters into the weights and returns the plain base model.

        On a quantized base (bitsandbytes 4-bit / 8-bit) every quantized layer is dequantized first, so
        the result is a full-precision model (in the dtype of the model's other float weights) that holds
        exactly the dequantized base plus the updates; a warning says so."""
        kind = model_quantization(self.model)
        if kind is None:
            self.merge_adapter(adapter_names)
            return self._unwrap(keep_copies=True)
        dtype = next(
            (
                p.dtype
                for p in self.model.parameters()
                if p.dtype in (torch.float32, torch.bfloat16, torch.float16)
            ),
            torch.float32,
        )
        for layer in self.lora_layers():
            if layer.quantized:
                layer.base_layer = dequantized_linear(layer.base_layer, dtype)
                layer.quantized = False
        self.merge_adapter(adapter_names)
        model = self._unwrap(keep_copies=True)
        dequantize_model(model, dtype)
        warnings.warn(
            f"merged onto a {kind} quantized base: its layers were dequantized, so the merged model is full "
            f"precision ({str(dtype).removeprefix('torch.')}), the size of an unquantized model",
            stacklevel=2,
        )
        return model

    def unload(self) -> nn.Module:
        """Removes every adapter without merging and returns the plain base model."""
        self.unmerge_adapter()
        return self._unwrap(keep_copies=False)

    def _unwrap(self, keep_copies: bool) -> nn.Module:
        for name, layer in self._named_lora_layers():
            self._replace(name, layer.base_layer)
        for name, copy in [(n, m) for n, m in self.model.named_modules() if isinstance(m, TrainableCopy)]:
            use = copy.modules_to_save[copy.active] if keep_copies and copy.active else copy.original_module
            self._replace(name, use)
        self.peft_config.clear()
        self.active_adapters, self.adapter_weights = [], []
        return self.model

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", **kwargs):
        """Creates adapter `adapter_name` from a weighted combination of existing ones (see combine.py)."""
        from loraforge.combine import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)

    # -- parameters --------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self):
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- files -------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None):
        """Writes PEFT's files: `default` at the top, any other adapter in a sub-folder of its name."""
        from loraforge.formats.peft import save_adapter

        for name in selected_adapters or list(self.peft_config):
            self._check_exists(name)
            target = Path(save_directory) if name == "default" else Path(save_directory) / name
            save_adapter(self, name, target)

    def load_adapter(
        self,
        directory: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        allow_pickle: bool = False,
    ):
        """Loads a PEFT-format adapter as `adapter_name`; on any error the model is left as it was."""
        from loraforge.formats.peft import load_adapter

        load_adapter(self, directory, adapter_name, allow_pickle=allow_pickle)
        if is_trainable:
            self._mark_trainable()
        else:
            for layer in self.lora_layers():
                for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
                    if adapter_name in store:
                        store[adapter_name].requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        allow_pickle: bool = False,
    ) -> LoraModel:
        """Wraps `model` and loads the adapter in `directory` as the active adapter."""
        lora_model = model if isinstance(model, LoraModel) else cls(model)
        lora_model.load_adapter(directory, adapter_name, is_trainable=is_trainable, allow_pickle=allow_pickle)
        lora_model.set_adapter(adapter_name)
        if not is_trainable:
            for p in lora_model.parameters():
                p.requires_grad_(False)
        return lora_model


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Puts a new adapter on `model` (frozen) and returns the `LoraModel` driving it."""
    return LoraModel(model, config, adapter_name)


def base_modules(model: nn.Module):
    """(name, module) of `model` as the user knows it: a LoRA wrapper counts as its base layer, a
    modules_to_save wrapper as its original module, and nothing inside either is listed."""
    inner = set()
    for _, m in model.named_modules():
        if isinstance(m, LoraLayer | TrainableCopy):
            inner.update(id(x) for x in m.modules() if x is not m)
    for name, m in model.named_modules():
        if id(m) in inner or not name:
            continue
        if isinstance(m, LoraLayer):
            yield name, m.base_layer
        elif isinstance(m, TrainableCopy):
            yield name, m.original_module
        else:
            yield name, m


def base_parameters(model: nn.Module, prefix: str = ""):
    """(name, parameter) of `model`'s base weights under their names without wrappers: no LoRA
    matrices, no modules_to_save copies (their original modules' parameters are listed)."""
    if isinstance(model, LoraLayer):
        yield from base_parameters(model.base_layer, prefix)
        return
    if isinstance(model, TrainableCopy):
        yield from base_parameters(model.original_module, prefix)
        return
    for name, p in model.named_parameters(recurse=False):
        yield prefix + name, p
    for name, child in model.named_children():
        yield from base_parameters(child, f"{prefix}{name}.")


def _unwrapped(key: str) -> str:
    """A parameter path without the LoRA wrapper's ``.base_layer`` (``x.base_layer.bias`` -> ``x.bias``)."""
    return key.replace(".base_layer.", ".")


def _lora_keys(name: str, layer: LoraLayer) -> tuple[str, str]:
    """How error messages name a layer's A and B (PEFT's key names)."""
    if isinstance(layer, LoraEmbedding):
        return f"{name}.lora_embedding_A", f"{name}.lora_embedding_B"
    return f"{name}.lora_A.weight", f"{name}.lora_B.weight"


def _fit(tensor: torch.Tensor, shape: tuple[int, ...], where: str, key: str) -> torch.Tensor:
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    # A 1x1 convolution and a linear layer hold the same matrix; files disagree on which they store.
    if tensor.numel() == math.prod(shape) and tuple(tensor.shape[:2]) == tuple(shape[:2]):
        return tensor.reshape(shape)
    raise IncompatibleAdapter(
        f"{where} does not fit this model: {key} has shape {tuple(tensor.shape)} but the model needs "
        f"{tuple(shape)}"
    )


def _layer_index(name: str, pattern) -> int | None:
    if pattern:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        m = re.search(rf"(?:^|\.)(?:{'|'.join(map(re.escape, patterns))})\.(\d+)(?:\.|$)", name)
    else:
        m = re.search(r"\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _targeted(name: str, module: nn.Module, config: LoraConfig, head: str | None) -> bool:
    targets = config.target_modules
    if targets is None:
        raise UserError(
            "LoraConfig.target_modules is required: name the modules to adapt, or use 'all-linear'"
        )
    if targets == "all-linear":
        hit = (isinstance(module, nn.Linear) or is_gpt2_conv1d(module)) and name != head
    elif isinstance(targets, str):
        hit = re.fullmatch(targets, name) is not None
    else:
        hit = any(name == t or name.endswith("." + t) for t in targets)
    if not hit:
        return False
    excluded = config.exclude_modules
    if excluded is not None:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, name):
                return False
        elif any(name == t or name.endswith("." + t) for t in excluded):
            return False
    if config.layers_to_transform is not None:
        idx = _layer_index(name, config.layers_pattern)
        if idx is None or idx not in config.layers_to_transform:
            return False
    return True


def _compact_targets(targets: list[str], spec):
    """What to record as target_modules in the file: the user's regex as given, else the shortest
    list of name suffixes that selects the same modules (PEFT stores 'all-linear' expanded likewise)."""
    if spec != "all-linear":
        return spec
    return sorted({t.split(".")[-1] for t in targets})
