"""The training loop shared by every `loraforge train*` command: `train(task, config) -> TrainResult`.

It knows nothing about text or images: what it trains is a `loraforge.train.task.Task`. `train`
reads as the outline of a run; each phase is a method of `_Run`, in the order they run::

    set up    threads, accelerator, seed, task.build, optimizer, learning-rate schedule
    resume    weights, optimizer, schedule, RNG states and data position of a checkpoint
    start     metrics, progress bar, the eval of the fresh adapter
    step      accumulate (forward + backward of each micro-batch), clip, step, zero
    after     metrics row, eval, samples and checkpoint, each when due
    finish    the final eval, samples and checkpoint; the adapter; the loss curve

Gradients are token-weighted across micro-batches and processes: each micro-batch contributes
``mean_loss * n`` and the summed gradient is divided once by the step's total n, so a step over
batches of different sizes computes exactly the mean over all its tokens, as one big batch would.

What the run leaves under `config.output_dir` (written by the main process only):
``adapter/`` (final), ``checkpoints/step-N/`` (resumable, newest `keep_last`), ``metrics.csv``,
``tensorboard/``, ``loss.png``, ``samples/``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from loraforge.errors import UserError
from loraforge.optim import loraplus_groups, make_optimizer
from loraforge.train import rundir
from loraforge.train.charts import draw_loss_curve
from loraforge.train.checkpoint import (
    capture_rng_state,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from loraforge.train.config import TrainConfig, config_to_dict, save_config
from loraforge.train.metrics import METRICS_NAME, MetricsWriter, read_metrics
from loraforge.train.signals import StopRequest, stop_requests
from loraforge.train.task import Task


class LossNotFinite(UserError):
    """The loss (or gradient) became NaN or infinite; the weights were not updated."""


@dataclass
class TrainResult:
    """What a training run produced."""

    adapter_dir: Path | None
    """The final adapter (None when the run was interrupted: see `checkpoint`)."""
    steps: int
    """Optimizer steps done, counting those of the run that was resumed."""
    total_steps: int
    train_loss: float | None
    """Loss of the last step."""
    eval_loss: float | None
    """Eval loss at the end (None when the task has none)."""
    interrupted: bool = False
    elapsed_s: float = 0.0
    tokens: int = 0
    """Input tokens (or the task's `throughput_unit`) trained on, over all processes."""
    step_time_s: float = 0.0
    """Time in training steps only (no eval, samples, checkpoints)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """The rows of metrics.csv (main process only)."""
    output_dir: Path | None = None
    start_step: int = 0
    """The step this run started from: 0, or the step of the checkpoint it resumed."""
    already_finished: bool = False
    """Resumed a run that had finished: nothing was trained or written."""
    checkpoint: Path | None = None
    """The newest complete checkpoint directory (``output_dir/checkpoints/step-N``), or None."""
    checkpoints: list[Path] = field(default_factory=list)
    """Every checkpoint kept, oldest first."""
    task: Task | None = field(default=None, repr=False, compare=False)
    """The task that was trained: its model stays loaded, with the adapter's final weights."""

    def done_line(self, unit: str = "tokens") -> str:
        """One line on what this run did: the steps run now and where that leaves the total."""
        if self.already_finished:
            return (
                f"the run in {self.output_dir} already finished at step {self.steps} of {self.total_steps}; "
                "nothing was trained or changed"
            )
        ran = self.steps - self.start_step
        where = f"steps {self.start_step + 1}-{self.steps} of {self.total_steps}" if ran else "no step left"
        losses = [f"final train loss {self.train_loss:.4f}"] if self.train_loss is not None else []
        if self.eval_loss is not None:
            losses.append(f"eval loss {self.eval_loss:.4f}")
        return (
            f"done: {ran} step{'s' if ran != 1 else ''} in {self.elapsed_s:.0f}s ({where}; {self.tokens:,} {unit})"
            + (f"; {', '.join(losses)}" if losses else "")
        )


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


def train(task: Task, config: TrainConfig) -> TrainResult:
    """Trains `task` as `config` says; returns where the adapter went and the final losses.

    The output directory is checked first (see `loraforge.train.rundir`): a new run never replaces
    an earlier one by accident, a resumed run must keep the settings that shape its result, and a
    finished run is only reported. The resolved config is written when training starts."""
    finished = _prepare_run_dir(config)
    if finished is not None:
        return finished
    run = _Run(task, config)  # set up: threads, accelerator, seed, build, optimizer, schedule
    run.resume()  # from config.resume's checkpoint, if any
    with stop_requests() as stop:  # first Ctrl-C / SIGTERM: finish the step, checkpoint, stop
        try:
            run.start()  # metrics, progress bar, the eval of the fresh adapter
            while run.step < run.total_steps:
                done = run.train_step(stop)  # accumulate, backward, clip, step, zero
                run.after_step(done)  # metrics row, eval, samples, checkpoint: each when due
                if done.stop_requested and run.step < run.total_steps:
                    run.interrupted = True
                    break
        except KeyboardInterrupt:  # a second Ctrl-C: the step under way is dropped
            run.abandon_step()
        finally:
            run.close_outputs()
    # stop_early: a checkpoint of the last step done, and how to resume; finish: final eval, samples
    # and checkpoint, the adapter, the loss curve.
    result = run.stop_early() if run.interrupted else run.finish()
    _leave_process_group()
    return result


def _leave_process_group() -> None:
    """Ends a multi-process run's process group once every process is done with it, as PyTorch asks:
    a process that exits with it still up may abort (gloo's threads) and take the launch down."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _prepare_run_dir(config: TrainConfig) -> TrainResult | None:
    from accelerate import PartialState

    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    finished = rundir.prepare(config, main=main)
    if finished is not None:
        return TrainResult(
            finished.adapter_dir,
            finished.step,
            finished.total_steps,
            finished.loss,
            None,
            output_dir=Path(config.output_dir),
            start_step=finished.step,
            already_finished=True,
            checkpoint=finished.checkpoint,
            checkpoints=[path for _, path in list_checkpoints(config.output_dir)],
        )
    if main:
        save_config(config, Path(config.output_dir) / rundir.CONFIG_NAME)
    return None


class _Step(NamedTuple):
    """What one optimizer step measured."""

    loss: float
    lr: float
    grad_norm: float
    throughput: float  # input tokens per second over the current metrics window
    stop_requested: bool  # on any process


@dataclass
class _Window:
    """Sums since the last metrics row."""

    loss: float = 0.0
    items: int = 0
    tokens: int = 0
    time: float = 0.0


class _Run:
    """One training run: its state, and its phases as methods (see the module docstring)."""

    # -- set up ------------------------------------------------------------------------------------

    def __init__(self, task: Task, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        if config.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
        self.task, self.config = task, config
        self.threads = choose_threads(config.threads)
        if self.threads != torch.get_num_threads():
            torch.set_num_threads(self.threads)
        if config.low_memory:
            from loraforge.runtime import return_freed_memory

            return_freed_memory()
        self.out = Path(config.output_dir)
        self.resume_from = resolve_resume(self.out, config.resume)  # fail before loading anything

        # cpu=True without a GPU: that is how accelerate recognises a multi-process CPU (gloo) launch.
        # accelerate keeps one global state per process; forget the previous run's settings (mixed
        # precision) so a notebook or test can train several times. The distributed state stays.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available()
        )
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.say = self.accelerator.print

        # Same seed on every process: identical adapter initialisation everywhere (DDP also broadcasts
        # rank 0's weights), and the same data order, of which each process takes its share.
        set_seed(config.seed)
        task.build(self.accelerator)
        if config.gradient_checkpointing:
            task.enable_gradient_checkpointing()
        self.optimizer, self.params = self._setup_optimizer()

        self.group = config.grad_accum * self.world  # micro-batches per optimizer step, all processes
        self.num_batches = task.num_batches()
        if self.num_batches <= 0:
            raise UserError("the training data yields no batches")
        self.total_steps = config.max_steps or max(1, int(config.epochs * self.num_batches / self.group))
        # The schedule is ours (not accelerate's, which steps once per process): one step per update.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config, self.total_steps)
        )
        task.model, self.optimizer = self.accelerator.prepare(task.model, self.optimizer)
        self.unwrapped = self.accelerator.unwrap_model(task.model)

        # Where the run stands.
        self.step, self.position, self.tokens_seen = 0, (0, 0), 0
        self.start_step = 0
        self.last_loss: float | None = None
        self.last_eval: float | None = None
        self.saved_at = self.evaluated_at = self.sampled_at = -1
        self.interrupted = False
        self.metrics: MetricsWriter | None = None
        self.progress = None
        self.window = _Window()
        self.step_time = 0.0
        self.started = time.perf_counter()

    def _setup_optimizer(self):
        """AdamW (or 8-bit AdamW, config `optimizer`) over the task's parameter groups (a group's own
        "lr" / "weight_decay" override the config's; the schedule scales every group alike), without
        parameters that do not train; with `loraplus_lr_ratio`, B matrices at that multiple of the
        learning rate (LoRA+, see `loraforge.optim`)."""
        groups = [
            dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in self.task.parameter_groups()
        ]
        groups = [g for g in groups if g["params"]]
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise UserError("the task has no trainable parameters")
        c = self.config
        if c.loraplus_lr_ratio:
            groups = loraplus_groups(
                self.task.model, groups, c.learning_rate, c.loraplus_lr_ratio, c.loraplus_lr_embedding
            )
        return make_optimizer(c.optimizer, groups, c.learning_rate, c.weight_decay), params

    # -- resume ------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continues from `config.resume`'s checkpoint: trainable weights, optimizer, schedule, grad
        scaler, this process's RNG states, data position, tokens seen and the task's extra state."""
        if self.resume_from is None:
            return
        state = load_checkpoint(self.resume_from)
        self.step, self.position = state["step"], tuple(state["data_position"])
        self.start_step = self.step
        self.tokens_seen = state.get("tokens", 0)
        named = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                if name not in named:
                    raise UserError(
                        f"checkpoint {self.resume_from} does not fit this model: no parameter {name}"
                    )
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        restore_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        self.task.load_extra_state(state.get("extra") or {})
        if state.get("total_steps") != self.total_steps:
            self.say(
                f"note: the checkpoint was made for {state.get('total_steps')} steps, this run has {self.total_steps}"
            )
        self.say(f"resumed from {self.resume_from} at step {self.step}")
        if self.step >= self.total_steps:
            self.say("the checkpoint is already at or past the last step; nothing left to train")

    # -- start -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Opens the metrics and the progress bar, and evaluates the starting point."""
        c = self.config
        if self.main:
            resume_step = self.step if self.resume_from else None
            self.metrics = MetricsWriter(self.out, resume_step=resume_step, tensorboard=c.tensorboard)
        self.progress = _progress(c, self.total_steps, self.step, disabled=not self.main)
        processes = f"{self.world} process{'es' if self.world > 1 else ''}"
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        self.say(
            f"training: {self.total_steps} steps of {self.group} x {c.batch_size} examples "
            f"({self.num_batches} batches per epoch, {processes}, {threads} each)"
        )
        if self.resume_from is None and c.eval_every:
            # The starting point of the eval curve: the base with the fresh (no-op) adapter.
            self._evaluate_and_log()
        self.task.model.train()
        self.batches = _micro_batches(self.task, self.position)
        self.started = time.perf_counter()

    # -- one optimizer step ------------------------------------------------------------------------

    def train_step(self, stop: StopRequest) -> _Step:
        """One optimizer step over the next `group` micro-batches, of which this process takes every
        world-th one (the data position advances past all of them on every process)."""
        t0 = time.perf_counter()
        step_batches = [next(self.batches) for _ in range(self.group)]
        position = _advance(step_batches[-1][0], self.num_batches)
        # accumulate: forward and backward of this process's micro-batches; .grad sums loss x n
        mine = [batch for _, batch in step_batches[self.rank :: self.world]]
        loss_sum, items, tokens = self._accumulate(mine)
        loss, items, tokens, stop_requested = self._reduce(loss_sum, items, tokens, stop.requested)
        if not math.isfinite(loss):
            raise self._not_finite("loss", loss, position)
        # backward done: the summed gradient becomes the mean over every item of the step (DDP has
        # averaged it over processes already, hence the factor world)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(self.world / items)
        # clip
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm) and self.accelerator.scaler is None:
            raise self._not_finite("gradient norm", grad_norm, position)
        # step
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        # zero
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.position, self.last_loss = self.step + 1, position, loss
        self.tokens_seen += tokens
        throughput = self._count(loss, items, tokens, time.perf_counter() - t0)
        return _Step(loss, lr, grad_norm, throughput, stop_requested)

    def _accumulate(self, batches: list) -> tuple[torch.Tensor, int, int]:
        """Loss x items summed over `batches` (float64), the items and the input tokens."""
        loss_sum = torch.zeros((), dtype=torch.float64)
        items = tokens = 0
        for k, batch in enumerate(batches):
            # Only the last micro-batch of the step all-reduces gradients (DDP's no_sync before it).
            loss, n = self._loss_step(batch, sync=k == len(batches) - 1 or self.world == 1)
            loss_sum += loss.double().cpu() * n
            items += n
            counted = self.task.input_tokens(batch)
            tokens += n if counted is None else int(counted)
        return loss_sum, items, tokens

    def _loss_step(self, batch, sync: bool) -> tuple[torch.Tensor, int]:
        """Forward and backward of one micro-batch: (its mean loss, detached, and its item count)."""
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.task.model):
            with self.accelerator.autocast():
                loss, n = self.task.loss(batch)
            n = int(n)
            if n <= 0:
                raise UserError("task.loss returned a batch with no loss items (n = 0)")
            # Backward the *sum* over items; dividing by the step's total makes the update the exact
            # mean over every item of the step, whatever the batch sizes.
            self.accelerator.backward(loss * n)
        return loss.detach(), n

    def _reduce(self, loss_sum, items: int, tokens: int, stop: bool) -> tuple[float, int, int, bool]:
        """The step's mean loss, items and tokens over all processes, and whether any must stop."""
        totals = torch.stack(
            [
                loss_sum,
                torch.tensor(float(items), dtype=torch.float64),
                torch.tensor(float(tokens), dtype=torch.float64),
                torch.tensor(float(stop), dtype=torch.float64),
            ]
        ).to(self.accelerator.device)
        if self.world > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        loss = (totals[0] / totals[1]).item()
        return loss, int(totals[1].item()), int(totals[2].item()), totals[3].item() > 0

    def _clip_gradients(self) -> float:
        """Clips to config.max_grad_norm (0: no clipping); returns the norm before clipping."""
        if self.config.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.params if p.grad is not None])
            )
        return float(norm)

    def _count(self, loss: float, items: int, tokens: int, elapsed: float) -> float:
        """Adds the step to the metrics window and the progress bar; returns the window's throughput."""
        self.step_time += elapsed
        w = self.window
        w.loss += loss * items
        w.items += items
        w.tokens += tokens
        w.time += elapsed
        throughput = w.tokens / w.time if w.time else 0.0
        unit = self.task.throughput_unit
        self.progress.set_postfix({"loss": f"{loss:.4f}", f"{unit}/s": f"{throughput:,.0f}"}, refresh=False)
        self.progress.update(1)
        return throughput

    def _not_finite(self, what: str, value: float, position) -> LossNotFinite:
        latest = find_latest(self.out)
        where = (
            f"the last good checkpoint is {latest} (resume with --resume latest)"
            if latest
            else "no checkpoint was written yet"
        )
        return LossNotFinite(
            f"{what} is {value} at step {self.step + 1} (epoch {_epoch_float(position, self.num_batches)}); "
            f"stopped before updating the weights; {where}. Try a lower learning_rate, a smaller "
            "max_grad_norm, or mixed_precision no."
        )

    # -- after a step: metrics, eval, samples, checkpoint ------------------------------------------

    def after_step(self, done: _Step) -> None:
        c, step = self.config, self.step
        final = step == self.total_steps
        if self.main and (step % c.log_every == 0 or final):
            w = self.window
            row = dict(
                epoch=_epoch_float(self.position, self.num_batches),
                loss=w.loss / w.items,
                lr=done.lr,
                grad_norm=done.grad_norm,
                tokens=self.tokens_seen,
                tokens_per_s=done.throughput,
                elapsed_s=time.perf_counter() - self.started,
            )
            self.metrics.log(step, row)
            self.window = _Window()
        if (c.eval_every and step % c.eval_every == 0) or final:
            self.last_eval = self._evaluate_and_log()
        if (c.sample_every and step % c.sample_every == 0) or final:
            self.write_samples()
        if (c.save_every and step % c.save_every == 0) or final:
            self.checkpoint()

    def evaluate(self) -> float | None:
        """The task's eval loss (computed by the main process; the others wait)."""
        value = None
        if self.main:
            self.unwrapped.eval()
            with torch.no_grad():
                value = self.task.eval_loss()
            self.unwrapped.train()
        self.accelerator.wait_for_everyone()
        self.evaluated_at = self.step
        return value

    def _evaluate_and_log(self) -> float | None:
        value = self.evaluate()
        if self.main and value is not None:
            epoch = _epoch_float(self.position, self.num_batches)
            self.metrics.log(self.step, dict(epoch=epoch, eval_loss=value))
            self.progress.write(f"step {self.step}: eval loss {value:.4f}")
        return value

    def write_samples(self) -> None:
        if self.main:
            self.unwrapped.eval()
            with torch.no_grad():
                self.task.sample(self.step, self.out / "samples")
            self.unwrapped.train()
        self.accelerator.wait_for_everyone()
        self.sampled_at = self.step

    def checkpoint(self) -> None:
        """Saves ``checkpoints/step-N`` (main process; every process contributes its RNG states)."""
        from accelerate.utils import gather_object

        rngs = gather_object([capture_rng_state()]) if self.world > 1 else [capture_rng_state()]
        if self.main:
            scaler = self.accelerator.scaler
            state = {
                "step": self.step,
                "data_position": list(self.position),
                "total_steps": self.total_steps,
                "tokens": self.tokens_seen,
                "world_size": self.world,
                "trainable": {
                    n: p.detach().cpu().clone()
                    for n, p in self.unwrapped.named_parameters()
                    if p.requires_grad
                },
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs,
                "extra": self.task.extra_state(),
                "config": config_to_dict(self.config),
            }
            info = {
                "epoch": _epoch_float(self.position, self.num_batches),
                "data_position": list(self.position),
                "loss": self.last_loss,
            }
            path = save_checkpoint(
                self.out,
                self.step,
                state,
                save_adapter=self.task.save_adapter,
                info=info,
                keep_last=self.config.keep_last,
            )
            self.progress.write(f"checkpoint: {path}")
        self.accelerator.wait_for_everyone()
        self.saved_at = self.step

    # -- finish ------------------------------------------------------------------------------------

    def abandon_step(self) -> None:
        """A second Ctrl-C (or no handler) interrupted a step: its gradients are dropped; the weights
        are as after the last completed step, which is what gets saved."""
        self.interrupted = True
        self.optimizer.zero_grad(set_to_none=True)

    def close_outputs(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.metrics is not None:
            self.metrics.close()

    def stop_early(self) -> TrainResult:
        """After an interruption: a checkpoint of the last completed step, and how to continue."""
        if self.saved_at != self.step and self.step > 0:
            self.checkpoint()
        if self.main:
            print(
                f"interrupted at step {self.step}/{self.total_steps}; checkpoint saved. Continue with: "
                f"--resume latest (newest checkpoint: {find_latest(self.out)})"
            )
        return self._result(None, interrupted=True)

    def finish(self) -> TrainResult:
        """The final eval, samples and checkpoint (unless the last step made them), the adapter and
        the loss curve. A run resumed from its last checkpoint only does this."""
        if self.evaluated_at != self.step:
            self.last_eval = self.evaluate()
        if self.sampled_at != self.step:
            self.write_samples()
        if self.saved_at != self.step and self.step > 0:
            self.checkpoint()
        adapter_dir = self.out / "adapter"
        history = []
        if self.main:
            self.task.save_adapter(adapter_dir)
            history = read_metrics(self.out / METRICS_NAME)
            label = self.task.eval_loss_label
            draw_loss_curve(history, self.out / "loss.png", eval_label=label)
        self.accelerator.wait_for_everyone()
        return self._result(adapter_dir, history=history)

    def _result(self, adapter_dir: Path | None, interrupted: bool = False, history=()) -> TrainResult:
        return TrainResult(
            adapter_dir,
            self.step,
            self.total_steps,
            self.last_loss,
            self.last_eval,
            interrupted=interrupted,
            elapsed_s=time.perf_counter() - self.started,
            tokens=self.tokens_seen,
            step_time_s=self.step_time,
            history=list(history),
            output_dir=self.out,
            start_step=self.start_step,
            checkpoint=find_latest(self.out),
            checkpoints=[path for _, path in list_checkpoints(self.out)],
            task=self.task,
        )


# -- helpers ---------------------------------------------------------------------------------------


def choose_threads(requested: int) -> int:
    """`requested` if set; else one thread per core this process may run on (its CPU affinity, which
    containers and `taskset` narrow), shared among the processes of this machine in a multi-process
    run (torchrun / accelerate set LOCAL_WORLD_SIZE). Runs that must be bit-identical should set
    `threads` explicitly, since results can depend on the thread count."""
    if requested:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, cores // local_processes)


def _micro_batches(task: Task, position):
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
