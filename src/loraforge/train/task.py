"""`Task`: what the shared training loop (`loraforge.train.loop.train`) trains.

The loop knows nothing about text or images; a task does. Subclass `Task` and implement the six
abstract methods; everything else has a default that suits a task without it::

    class MyTask(Task):
        def build(self, accelerator): ...             # load the base, put the adapter on, load the data
        def trainable_parameters(self): ...            # the adapter's parameters
        def num_batches(self): ...                     # micro-batches in one epoch
        def train_batches(self, epoch, start=0): ...   # those micro-batches, deterministically
        def loss(self, batch): ...                     # -> (mean loss, number of loss items)
        def save_adapter(self, directory): ...         # write the adapter's files

`loraforge.train.text.TextTask` and `loraforge.train.image.ImageTask` are the two tasks of the
command line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraforge.errors import UserError


class Task(ABC):
    """The contract between a kind of training and the shared loop.

    The loop calls, in this order: `build` (once, after seeding, on every process), then
    `enable_gradient_checkpointing` when the config asks, `parameter_groups`, `num_batches`; on
    resume `load_extra_state`; then per micro-batch `loss` and `input_tokens`, and on the main process
    only `eval_loss`, `sample`, `save_adapter` and `extra_state` when they are due.
    """

    model: nn.Module | None = None
    """The module to train (e.g. the LoraModel); set it in `build`. After build the loop replaces it
    with its prepared module (DDP-wrapped when distributed, autocasting under mixed precision), so keep
    your own reference to the unwrapped model for saving, evaluation and sampling."""

    throughput_unit: str = "tok"
    """What `input_tokens` counts, as the progress bar shows it ("tok/s")."""

    eval_loss_label: str = "eval loss"
    """How loss.png names the curve of `eval_loss` (say what it is measured on)."""

    # -- required --------------------------------------------------------------------------------------

    @abstractmethod
    def build(self, accelerator) -> None:
        """Loads the base, puts the adapter on and loads the data; sets `self.model`. Runs after the
        seed is set, on every process, so adapter initialisation is the same everywhere."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise (the adapter's)."""

    @abstractmethod
    def num_batches(self) -> int:
        """Micro-batches in one epoch (the same every epoch)."""

    @abstractmethod
    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """The epoch's micro-batches from index `start` on. Deterministic given (seed, epoch), as
        resuming skips to `start`. Every process yields the same batches; the loop hands micro-batch j
        of an optimizer step to process j % num_processes."""

    @abstractmethod
    def loss(self, batch) -> tuple[torch.Tensor, int]:
        """(loss, n): the mean loss over the batch's n > 0 loss items (tokens for text, images for
        diffusion). Runs the forward through `self.model`."""

    @abstractmethod
    def save_adapter(self, directory: Path) -> None:
        """Writes the adapter in its interchange format into `directory` (main process only)."""

    # -- optional, with defaults -----------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: dicts with "params" and optionally "lr" / "weight_decay", which
        override the config's for that group. Default: one group of `trainable_parameters()`."""
        return [{"params": self.trainable_parameters()}]

    def input_tokens(self, batch) -> int | None:
        """Input tokens (or other units, see `throughput_unit`) a micro-batch processes, for the
        throughput figure. Default None: the n that `loss` returned."""
        return None

    def enable_gradient_checkpointing(self) -> None:
        """Turns on activation checkpointing (config `gradient_checkpointing`). Default: the model's
        own (transformers' `gradient_checkpointing_enable`), non-reentrant."""
        enable_activation_checkpointing(self.model)

    def eval_loss(self) -> float | None:
        """Held-out loss (main process only, under no_grad, model in eval mode). Default None: none."""
        return None

    def sample(self, step: int, out_dir: Path) -> None:
        """Writes samples for `step` under `out_dir` (main process only). Default: nothing."""
        return None

    def extra_state(self) -> dict:
        """Anything else a resumed run needs, torch.save-able. Default: nothing."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Takes back what `extra_state` saved, when resuming. Default: nothing."""
        return None


def enable_activation_checkpointing(model) -> None:
    """Turns on a transformers model's activation (gradient) checkpointing, non-reentrant: that kind
    works with frozen inputs (no need to make the embeddings require grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise UserError("gradient_checkpointing: this model does not support it")
