"""The training loop shared by every `loraforge train*` command: one function, `train(task, config)`.

It knows nothing about text or images. What it trains is a *task*, any object with these members
(`loraforge.train.text.TextTask` is the reference implementation)::

    build(accelerator)         load the base, put the adapter on, load the data. Called once, after
                               the seed is set, on every process. Set `task.model` there.
    model                      the nn.Module to train (e.g. the LoraModel). After build the loop
                               replaces it with the prepared module (DDP-wrapped when distributed,
                               autocasting under mixed precision): keep your own reference to the
                               unwrapped model for saving, eval and sampling.
    trainable_parameters()     the parameters to optimise (the adapter's).
    parameter_groups()         optional, instead: AdamW groups, dicts with "params" and optionally
                               "lr" / "weight_decay" overriding the config's.
    num_batches()              micro-batches in one epoch (the same every epoch).
    train_batches(epoch, start=0)
                               iterator over the epoch's micro-batches from index `start` on. Must be
                               deterministic given (seed, epoch): resuming skips to `start`. Every
                               process yields the same batches; the loop hands micro-batch j of an
                               optimizer step to process j % num_processes.
    loss(batch)                -> (loss, n): the mean loss over the batch's n loss items (tokens for
                               text, examples for images), n > 0. Runs the forward via `task.model`.
    eval_loss()                -> float or None: held-out loss (main process only, no gradients).
    sample(step, out_dir)      write samples for this step under out_dir (main process only).
    save_adapter(directory)    write the adapter in its interchange format (main process only).
    extra_state() / load_extra_state(state)
                               anything else a resumed run needs (a dict; torch.save-able).
    input_tokens(batch)        optional: tokens processed, for tokens/s (default: n from loss()).
    throughput_unit            optional: what input_tokens counts, for the progress bar (default "tok").

Gradients are token-weighted across micro-batches and processes: each micro-batch contributes
``mean_loss * n`` and the summed gradient is divided once by the step's total n, so a step over
batches of different sizes computes exactly the mean over all its tokens, as one big batch would.

What the run leaves under `config.output_dir` (written by the main process only):
``adapter/`` (final), ``checkpoints/step-N/`` (resumable, newest `keep_last`), ``metrics.csv``,
``tensorboard/``, ``loss.png``, ``samples/``.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from loraforge.errors import UserError
from loraforge.train.checkpoint import (
    capture_rng_state,
    find_latest,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from loraforge.train.config import TrainConfig, config_to_dict

METRICS_NAME = "metrics.csv"
METRIC_COLUMNS = [
    "step",
    "epoch",
    "loss",
    "eval_loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "elapsed_s",
]


class Task(Protocol):  # documentation and type hints only; see the module docstring
    model: torch.nn.Module

    def build(self, accelerator) -> None: ...
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...
    def num_batches(self) -> int: ...
    def train_batches(self, epoch: int, start: int = 0): ...
    def loss(self, batch) -> tuple[torch.Tensor, int]: ...
    def eval_loss(self) -> float | None: ...
    def sample(self, step: int, out_dir: Path) -> None: ...
    def save_adapter(self, directory: Path) -> None: ...
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...


class LossNotFinite(UserError):
    """The loss (or gradient) became NaN or infinite; the weights were not updated."""


@dataclass
class TrainResult:
    adapter_dir: Path | None
    steps: int
    total_steps: int
    train_loss: float | None
    eval_loss: float | None
    interrupted: bool = False
    elapsed_s: float = 0.0
    tokens: int = 0
    step_time_s: float = 0.0  # time in training steps only (no eval, samples, checkpoints)
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step `step`."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    progress = min(1.0, progress)
    floor = config.min_lr_ratio
    if config.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train(task, config: TrainConfig) -> TrainResult:
    """Trains `task` as `config` says; returns where the adapter went and the final losses."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import gather_object, set_seed

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    threads = choose_threads(config.threads)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    out = Path(config.output_dir)
    resume_from = resolve_resume(out, config.resume)  # fail before loading anything

    # cpu=True without a GPU: that is how accelerate recognises a multi-process CPU (gloo) launch.
    # accelerate keeps one global state per process; forget the previous run's settings (mixed
    # precision) so a notebook or test can train several times. The distributed state stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    say = accelerator.print

    # Same seed on every process: identical adapter initialisation everywhere (DDP also broadcasts
    # rank 0's weights), and the same data order, of which each process takes its share.
    set_seed(config.seed)
    task.build(accelerator)
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(task)

    # A task may split its parameters into optimizer groups with their own "lr" / "weight_decay"
    # (e.g. learned token embeddings); the schedule scales every group alike.
    groups = (
        task.parameter_groups()
        if hasattr(task, "parameter_groups")
        else [{"params": task.trainable_parameters()}]
    )
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise UserError("the task has no trainable parameters")
    optimizer = _adamw(groups, config)

    group = config.grad_accum * world  # micro-batches per optimizer step, over all processes
    num_batches = task.num_batches()
    if num_batches <= 0:
        raise UserError("the training data yields no batches")
    total_steps = config.max_steps or max(1, int(config.epochs * num_batches / group))
    # The schedule is ours (not accelerate's, which steps once per process): one step per update.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, total_steps))
    task.model, optimizer = accelerator.prepare(task.model, optimizer)
    unwrapped = accelerator.unwrap_model(task.model)

    # -- resume ------------------------------------------------------------------------------------
    step, position, tokens_seen = 0, (0, 0), 0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        step, position, tokens_seen = state["step"], tuple(state["data_position"]), state.get("tokens", 0)
        named = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                if name not in named:
                    raise UserError(f"checkpoint {resume_from} does not fit this model: no parameter {name}")
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        restore_rng_state(rng[rank] if rank < len(rng) else rng[0])
        task.load_extra_state(state.get("extra") or {})
        if state.get("total_steps") != total_steps:
            say(
                f"note: the checkpoint was made for {state.get('total_steps')} steps, this run has {total_steps}"
            )
        say(f"resumed from {resume_from} at step {step}")
        if step >= total_steps:
            say("the checkpoint is already at or past the last step; nothing left to train")

    # -- outputs -----------------------------------------------------------------------------------
    metrics = (
        _Metrics(out, resume_step=step if resume_from else None, tensorboard=config.tensorboard)
        if main
        else None
    )
    progress = _progress(config, total_steps, step, disabled=not main)
    unit = getattr(task, "throughput_unit", "tok")

    stop_requested = {"flag": False}
    previous_handlers = _install_interrupt_handlers(stop_requested)

    def checkpoint(at_step: int, pos, last_loss: float | None):
        rngs = gather_object([capture_rng_state()]) if world > 1 else [capture_rng_state()]
        if main:
            state = {
                "step": at_step,
                "data_position": list(pos),
                "total_steps": total_steps,
                "tokens": tokens_seen,
                "world_size": world,
                "trainable": {
                    n: p.detach().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad
                },
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": rngs,
                "extra": task.extra_state(),
                "config": config_to_dict(config),
            }
            info = {"epoch": _epoch_float(pos, num_batches), "data_position": list(pos), "loss": last_loss}
            path = save_checkpoint(
                out, at_step, state, save_adapter=task.save_adapter, info=info, keep_last=config.keep_last
            )
            progress.write(f"checkpoint: {path}")
        accelerator.wait_for_everyone()

    def run_eval() -> float | None:
        value = None
        if main:
            unwrapped.eval()
            with torch.no_grad():
                value = task.eval_loss()
            unwrapped.train()
        accelerator.wait_for_everyone()
        return value

    def run_sample(at_step: int):
        if main:
            unwrapped.eval()
            with torch.no_grad():
                task.sample(at_step, out / "samples")
            unwrapped.train()
        accelerator.wait_for_everyone()

    # -- the loop ----------------------------------------------------------------------------------
    say(
        f"training: {total_steps} steps of {group} x {config.batch_size} examples "
        f"({num_batches} batches per epoch, {world} process{'es' if world > 1 else ''}, {threads} thread{'s' if threads > 1 else ''} each)"
    )
    if resume_from is None and config.eval_every:
        # The starting point of the eval curve: the base with the fresh (no-op) adapter.
        before = run_eval()
        if main and before is not None:
            metrics.log(0, dict(epoch=0.0, eval_loss=before))
            progress.write(f"step 0: eval loss {before:.4f}")
    task.model.train()
    batches = _micro_batches(task, position, num_batches)
    interrupted = False
    last_loss = last_eval = None
    window = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}  # since the last metrics row
    started = time.perf_counter()
    step_time = 0.0
    saved_at = evaluated_at = sampled_at = -1
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            # One optimizer step = `group` consecutive micro-batches; this process takes every
            # world-th one. Data position advances past all of them on every process.
            step_batches = [next(batches) for _ in range(group)]
            mine = step_batches[rank::world]
            loss_sum = torch.zeros((), dtype=torch.float64)
            n_total = input_total = 0
            for k, (_, batch) in enumerate(mine):
                # Only the last micro-batch of the step all-reduces gradients (DDP's no_sync).
                sync = k == len(mine) - 1 or world == 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(task.model):
                    with accelerator.autocast():
                        loss, n = task.loss(batch)
                    n = int(n)
                    if n <= 0:
                        raise UserError("task.loss returned a batch with no loss items (n = 0)")
                    # Backward the *sum* over items; dividing by the step's total below makes the
                    # update the exact mean over every token of the step, whatever the batch sizes.
                    accelerator.backward(loss * n)
                loss_sum += loss.detach().double().cpu() * n
                n_total += n
                input_total += int(task.input_tokens(batch)) if hasattr(task, "input_tokens") else n
            position = _advance(step_batches[-1][0], num_batches)

            totals = torch.stack(
                [
                    loss_sum,
                    torch.tensor(float(n_total), dtype=torch.float64),
                    torch.tensor(float(input_total), dtype=torch.float64),
                    torch.tensor(float(stop_requested["flag"]), dtype=torch.float64),
                ]
            ).to(accelerator.device)
            if world > 1:
                totals = accelerator.reduce(totals, reduction="sum")
            step_loss = (totals[0] / totals[1]).item()
            global_items, global_tokens = int(totals[1].item()), int(totals[2].item())
            if not math.isfinite(step_loss):
                raise _not_finite("loss", step_loss, step + 1, position, num_batches, out)

            # DDP averaged the gradient over processes; turn the sum into the mean over all items.
            scale = world / global_items
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            if config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params if p.grad is not None])
                )
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm) and accelerator.scaler is None:
                raise _not_finite("gradient norm", grad_norm, step + 1, position, num_batches, out)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += global_tokens
            last_loss = step_loss

            elapsed = time.perf_counter() - t0
            step_time += elapsed
            window["loss"] += step_loss * global_items
            window["n"] += global_items
            window["tokens"] += global_tokens
            window["time"] += elapsed
            tps = window["tokens"] / window["time"] if window["time"] else 0.0
            progress.set_postfix({"loss": f"{step_loss:.4f}", f"{unit}/s": f"{tps:,.0f}"}, refresh=False)
            progress.update(1)

            final = step == total_steps
            if main and (step % config.log_every == 0 or final):
                metrics.log(
                    step,
                    dict(
                        epoch=_epoch_float(position, num_batches),
                        loss=window["loss"] / window["n"],
                        lr=lr,
                        grad_norm=grad_norm,
                        tokens=tokens_seen,
                        tokens_per_s=tps,
                        elapsed_s=time.perf_counter() - started,
                    ),
                )
                window = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
            if (config.eval_every and step % config.eval_every == 0) or final:
                last_eval = run_eval()
                evaluated_at = step
                if main and last_eval is not None:
                    metrics.log(step, dict(epoch=_epoch_float(position, num_batches), eval_loss=last_eval))
                    progress.write(f"step {step}: eval loss {last_eval:.4f}")
            if (config.sample_every and step % config.sample_every == 0) or final:
                run_sample(step)
                sampled_at = step
            if (config.save_every and step % config.save_every == 0) or final:
                checkpoint(step, position, last_loss)
                saved_at = step
            if totals[3].item() > 0 and not final:
                interrupted = True
                break
    except KeyboardInterrupt:
        # A second Ctrl-C (or no handler): the current step is abandoned, its gradients dropped; the
        # weights are as after the last completed step, which is what we save.
        interrupted = True
        optimizer.zero_grad(set_to_none=True)
    finally:
        _restore_interrupt_handlers(previous_handlers)
        progress.close()
        if metrics is not None:
            metrics.close()

    if interrupted:
        if saved_at != step and step > 0:
            checkpoint(step, position, last_loss)
        if main:
            print(
                f"interrupted at step {step}/{total_steps}; checkpoint saved. Continue with: --resume latest "
                f"(newest checkpoint: {find_latest(out)})"
            )
        return TrainResult(
            None,
            step,
            total_steps,
            last_loss,
            last_eval,
            interrupted=True,
            elapsed_s=time.perf_counter() - started,
            tokens=tokens_seen,
            step_time_s=step_time,
        )

    # A run resumed from its last checkpoint has nothing left to do but write the outputs.
    if evaluated_at != step:
        last_eval = run_eval()
    if sampled_at != step:
        run_sample(step)
    if saved_at != step and step > 0:
        checkpoint(step, position, last_loss)
    adapter_dir = out / "adapter"
    history = []
    if main:
        task.save_adapter(adapter_dir)
        history = read_metrics(out / METRICS_NAME)
        draw_loss_curve(history, out / "loss.png")
    accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir,
        step,
        total_steps,
        last_loss,
        last_eval,
        elapsed_s=time.perf_counter() - started,
        tokens=tokens_seen,
        step_time_s=step_time,
        history=history,
    )


# -- helpers ---------------------------------------------------------------------------------------


def choose_threads(requested: int) -> int:
    """`requested` if set; else PyTorch's default, lowered to the cores other processes leave free.

    On a shared CPU, OpenMP threads that find their core busy spin and wait for each other: two
    threads on two cores that other jobs also use run a small model several times *slower* than
    one thread. So with the 1-minute load average at L on C cores, use at most round(C - L) threads
    (at least 1). A quiet machine gets the default. Runs that must be bit-identical should set
    `threads` explicitly, since results can depend on the thread count.
    """
    if requested:
        return requested
    default = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return default
    cores = os.cpu_count() or default
    return max(1, min(default, int(cores - load + 0.5)))


def _adamw(groups, config):
    """AdamW, fused into one kernel per step where PyTorch has that for these tensors (float32 on CPU
    or CUDA): the per-parameter Python loop of the default implementation costs more than the update
    itself for adapters of many small matrices. Same maths; falls back to the default elsewhere."""
    kwargs = dict(lr=config.learning_rate, weight_decay=config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(groups, **kwargs)


def _micro_batches(task, position, num_batches):
    """((epoch, index), batch) forever, from `position` on, epoch after epoch."""
    epoch, index = position
    while True:
        for i, batch in enumerate(task.train_batches(epoch, start=index), start=index):
            yield (epoch, i), batch
        epoch, index = epoch + 1, 0


def _advance(pos, num_batches):
    epoch, index = pos
    return (epoch + 1, 0) if index + 1 >= num_batches else (epoch, index + 1)


def _epoch_float(pos, num_batches) -> float:
    return round(pos[0] + pos[1] / num_batches, 4)


def _not_finite(what, value, step, position, num_batches, out) -> LossNotFinite:
    latest = find_latest(out)
    where = (
        f"the last good checkpoint is {latest} (resume with --resume latest)"
        if latest
        else "no checkpoint was written yet"
    )
    return LossNotFinite(
        f"{what} is {value} at step {step} (epoch {_epoch_float(position, num_batches)}); stopped before updating the "
        f"weights; {where}. Try a lower learning_rate, a smaller max_grad_norm, or mixed_precision no."
    )


def _enable_gradient_checkpointing(task):
    if hasattr(task, "enable_gradient_checkpointing"):
        task.enable_gradient_checkpointing()
        return
    enable_activation_checkpointing(task.model)


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


def _install_interrupt_handlers(flag: dict):
    """First Ctrl-C (or SIGTERM): finish the current step, checkpoint, exit. Second Ctrl-C: at once."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if flag["flag"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["flag"] = True
        print("\nstopping after this step (Ctrl-C again to stop at once)...", flush=True)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass
    return previous


def _restore_interrupt_handlers(previous):
    for sig, old in (previous or {}).items():
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, old)


def _progress(config, total_steps, initial, disabled):
    from tqdm.auto import tqdm

    return tqdm(
        total=total_steps,
        initial=initial,
        disable=disabled or not config.progress_bar,
        unit="step",
        dynamic_ncols=True,
        desc="train",
    )


class _Metrics:
    """metrics.csv (one row per log or eval) and TensorBoard events. Resuming drops rows past the checkpoint."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / METRICS_NAME
        rows = read_metrics(self.path) if resume_step is not None else []
        rows = [r for r in rows if r["step"] <= resume_step] if resume_step is not None else []
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in METRIC_COLUMNS})
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 - closed in close()
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_COLUMNS)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.csv only")

    def log(self, step: int, values: dict[str, float]):
        row = {"step": step, **values}
        self.writer.writerow({k: ("" if row.get(k) is None else _fmt(row[k])) for k in METRIC_COLUMNS})
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if value is not None and key != "epoch":
                    tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
                    self.tb.add_scalar(tag, value, step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.csv as dicts of floats (step as int; missing values None)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                row[key] = None if value in ("", None) else float(value)
            row["step"] = int(row["step"])
            rows.append(row)
    return rows


def draw_loss_curve(rows: list[dict[str, Any]], path: str | Path, size=(800, 450)) -> Path | None:
    """Train (blue) and eval (orange) loss against step, drawn with PIL. Returns the path, or None without data."""
    from PIL import Image, ImageDraw

    train_pts = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    eval_pts = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    pts = train_pts + eval_pts
    if not pts:
        return None
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    x_lo, x_hi = 0, max(s for s, _ in pts) or 1
    y_lo, y_hi = min(v for _, v in pts), max(v for _, v in pts)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def xy(step, value):
        x = left + (step - x_lo) / (x_hi - x_lo) * (width - left - right)
        y = top + (y_hi - value) / (y_hi - y_lo) * (height - top - bottom)
        return x, y

    # Axes, ticks and grid.
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        value = y_lo + (y_hi - y_lo) * i / 5
        _, y = xy(0, value)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.text((5, y - 6), f"{value:.3g}", fill="black")
        step = x_lo + (x_hi - x_lo) * i / 5
        x, _ = xy(step, y_lo)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{step:.0f}", fill="black")
    draw.text((width // 2 - 15, height - 20), "step", fill="black")
    draw.text((left, 8), "loss", fill="black")
    for pts_, color, label, offset in (
        (train_pts, (31, 119, 180), "train", 0),
        (eval_pts, (255, 127, 14), "eval", 1),
    ):
        if not pts_:
            continue
        coords = [xy(s, v) for s, v in pts_]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for x, y in coords if len(coords) < 40 or label == "eval" else []:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        lx = width - right - 120
        ly = top + 10 + 18 * offset
        draw.line([lx, ly + 6, lx + 25, ly + 6], fill=color, width=3)
        draw.text((lx + 32, ly), f"{label} loss", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
