"""Continuous-batching text decoder: many generation jobs, each with its own adapter mix, decoded together.

    engine = TextEngine(rt.model, rt.tokenizer, max_batch=32, max_loras=8)
    engine.start()                                           # background step thread
    handle = engine.submit(TextJob(ids, mix=(("style", 0.7), ("tone", 0.3)), max_tokens=64, stop=["\\n"]))
    for delta in handle:                                     # or `async for delta in handle`
        print(delta.text, end="")
    handle.finish_reason, handle.usage                       # "stop" | "length" | "cancelled" | "error"
    engine.stop()                                            # finishes running and waiting jobs first

**The running batch.** Up to `max_batch` sequences (rows) decode together. Each step runs one forward
over every running row, each row with its own mix (`LoraModel.forward(..., adapter_names=rows)`: one
gathered low-rank product per adapted layer, whatever the mixes), samples one token per row, and
lets rows leave (finished, cancelled, failed) and waiting jobs join. A join runs the new prompts
through one prefill forward of their own (several arriving together share it), whose first token is
sampled at once; the new rows then take part in that same step's decoding forward.

**The KV cache.** Every layer holds the keys and values of all running rows in one tensor
``(rows, heads, width, head_dim)``, left-padded: row i's ``n_i`` cached tokens sit in the last ``n_i``
columns, the columns before them are zeros that the attention mask hides (``mask[i, c] = c >= width -
n_i``), and each row's position ids count its own tokens only. Left padding puts the newest token of
every row in the same (last) column, so a decoding step appends one column to every layer for all
rows at once and the causal mask over columns stays the ordinary one; with right padding every row's
next token would land in a different column. Each layer's tensor is a view into a buffer with spare
columns on the right (`_KVLayer`), so a step writes one column in place instead of concatenating the
whole cache as transformers' `DynamicLayer` does; a full buffer grows by a quarter.

**Re-packing** happens only when the set of rows changes, never on an ordinary step: a join
concatenates the prefilled rows' K/V below the running ones (the narrower side left-padded to the
wider width); a leave gathers the remaining rows and drops the columns that are padding in all of
them (the leftmost ``min_i(width - n_i)``), so a long sequence that finished does not leave its width
behind. Rows keep their order between changes, so the mixed batch's per-layer stacked adapter weights
stay cached too.

**Sampling** per row: temperature 0 is greedy (argmax, as `generate` without sampling); otherwise
softmax(logits / temperature), cut to the smallest set of tokens whose probability reaches `top_p`,
and one uniform draw per token from the row's own `torch.Generator` (seeded from `seed`), so a seeded
job gives the same text alone or in any batch. Text is decoded incrementally (the last prompt tokens
give the first new token its context); stop strings are matched on the decoded text, and text that
could be the start of a stop string is held back until it is known not to be, so no client ever sees
a partial stop string that is then taken back. Stop token ids (eos) end a job without adding text.

**Scheduling**: waiting jobs are admitted in arrival order while there is a free row and the
running batch would use at most `max_loras` distinct adapters (mix members count one each; the base
counts none). A job that would exceed `max_loras` waits; jobs behind it may pass only if they need no
adapter beyond those it needs and those already running, so the adapters it waits for drain and it
cannot starve. A job whose adapter is missing (or is DoRA, which mixed batches cannot run) finishes
with an error; if a batched forward raises, the rows are retried one by one and only those that fail
alone finish with an error. `TextHandle.cancel` (or leaving an iteration early) frees the row at the
next step. All model work happens under `TextEngine.lock`; the step thread hands it over between
steps to any thread waiting for it (the registry adding or deleting adapters).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import math
import operator
import random
import threading
import time
from dataclasses import dataclass, field

import torch

try:
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # transformers before the layered caches (4.56)
    DynamicCache = DynamicLayer = None

from loraforge.errors import UserError
from loraforge.layers import dora_mixed_error
from loraforge.model import LoraModel, Mix, as_mix

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")
DETOKENIZE_CONTEXT = 5  # prompt tokens decoded before the first new one, so it gets its leading space


@dataclass
class TextJob:
    """One generation request: a tokenized prompt continued under one adapter mix."""

    prompt_ids: list[int]
    mix: Mix  # () = base; a name or ``"__base__"`` is accepted too (see `loraforge.model.as_mix`)
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # seeded sampling gives the same text whatever else is in the batch
    stop: list[str] = ()  # stop strings: the text before the first one is kept
    stop_token_ids: set[int] = ()  # eos etc.: end the job, add no text


@dataclass(frozen=True)
class TextDelta:
    """A piece of a job's output: the new tokens and the text they released (possibly "", while text
    that may begin a stop string is held back, or for a token without text)."""

    text: str
    token_ids: list[int]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class EngineClosed(RuntimeError):
    """`submit` after `stop`: the engine takes no new jobs."""


class TextHandle:
    """What `TextEngine.submit` returns: the job's output as it is produced, and how it ended.

    Iterate it (``for`` or ``async for``, one consumer) to receive `TextDelta` pieces; iteration ends
    when the job has finished. Leaving the iteration before that (``break``, a closed stream, a
    cancelled task) cancels the job. `text`, `token_ids`, `usage` accumulate whether or not anyone
    iterates; `wait` blocks until the job is done."""

    def __init__(self, job: TextJob):
        self.job = job
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.usage = Usage(len(job.prompt_ids))
        self.token_ids: list[int] = []
        self._text: list[str] = []
        self._pending: collections.deque[TextDelta] = collections.deque()
        self._cond = threading.Condition()
        self._done = False
        self._cancelled = False
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    @property
    def text(self) -> str:
        """All text released so far (the whole completion once done)."""
        return "".join(self._text)

    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the job has finished (True) or `timeout` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done, timeout)

    def cancel(self) -> None:
        """Ends the job: its row is freed at the next step and it finishes "cancelled" (no effect once
        finished). Safe from any thread."""
        self._cancelled = True

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self):
        finished = False
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending or self._done)
                    if not self._pending:
                        finished = True
                        return
                    delta = self._pending.popleft()
                yield delta
        finally:
            if not finished:
                self.cancel()

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        loop = asyncio.get_running_loop()
        finished = False
        try:
            while True:
                with self._cond:
                    if self._pending:
                        delta, waiter = self._pending.popleft(), None
                    elif self._done:
                        finished = True
                        return
                    else:
                        delta, waiter = None, loop.create_future()
                        self._async_waiters.append((loop, waiter))
                if waiter is not None:
                    await waiter
                    continue
                yield delta
        finally:
            if not finished:
                self.cancel()

    # -- called by the engine ---------------------------------------------------------------------

    def _push(self, delta: TextDelta | None, finish: str | None = None, error: str | None = None):
        with self._cond:
            if self._done:
                return
            if delta is not None and (delta.text or delta.token_ids):
                self._pending.append(delta)
                self._text.append(delta.text)
                self.token_ids.extend(delta.token_ids)
                self.usage.completion_tokens += len(delta.token_ids)
            if finish is not None:
                self.finish_reason, self.error, self._done = finish, error, True
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _StepLock:
    """A re-entrant lock (the `threading.RLock` interface) that the step thread hands over between
    steps: a thread waiting for it (the registry loading or deleting an adapter) gets it before the
    next step starts, however busy the engine is. A plain RLock would mostly be re-taken by the step
    thread at once."""

    def __init__(self):
        self._lock = threading.RLock()
        self._waiting = 0
        self._count = threading.Lock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._count:
            self._waiting += 1
        try:
            return self._lock.acquire(blocking, timeout)
        finally:
            with self._count:
                self._waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _let_waiters_in(self) -> None:
        while self._waiting:
            time.sleep(0.0002)


# -- decoding state of one row ----------------------------------------------------------------------


class _Detokenizer:
    """Incremental decoding: the text of each new token, released once it is complete (a token that
    ends inside a multi-byte character waits for the next). Decodes a short window, from the last
    token already shown, so the cost does not grow with the length of the output."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-DETOKENIZE_CONTEXT:])
        self.prefix = 0  # window start: context for the tokenizer's spacing rules
        self.read = len(self.ids)  # tokens before this are shown

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        shown = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(shown) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the very end)."""
        shown = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(shown) :]


class _StopMatcher:
    """Finds stop strings in the decoded text and holds back any tail that could begin one."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to release, whether a stop string was found: everything from it on is dropped)."""
        if not self.stops:
            return text, False
        held = self.held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return held[: min(hits)], True
        keep = 0
        for k in range(min(len(held), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(held[-k:]) for s in self.stops):
                keep = k
                break
        self.held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass(eq=False)
class _Row:
    """A job in the engine: waiting, then a row of the running batch."""

    job: TextJob
    handle: TextHandle
    mix: Mix
    prompt: list[int]
    generator: torch.Generator | None
    detok: _Detokenizer
    stops: _StopMatcher
    stop_ids: frozenset = frozenset()
    length: int = 0  # tokens of this row in the KV cache
    pending: int | None = None  # sampled token not yet fed to the model
    generated: int = 0
    names: frozenset = field(default_factory=frozenset)  # adapters of the mix


# -- KV cache ---------------------------------------------------------------------------------------


class _BatchCache:
    """The running rows' K/V: every layer ``(rows, heads, width, head_dim)``, left-padded (module
    docstring). `cache` is the transformers `DynamicCache` handed to the model."""

    def __init__(self):
        self.cache = None
        self.width = 0

    def merge(self, fresh, keep: list[int], lengths: list[int]) -> None:
        """Adds rows `keep` of `fresh` (a prefill's DynamicCache, width = its input's) below the running
        rows; `lengths`: tokens of each kept row."""
        new = [(layer.keys, layer.values) for layer in fresh.layers]
        new_width = new[0][0].shape[-2]
        index = torch.tensor(keep, device=new[0][0].device)
        trim = new_width - max(lengths)  # columns that are padding in every kept row
        new = [(k[index, :, trim:], v[index, :, trim:]) for k, v in new]
        new_width -= trim
        if self.cache is None:
            layers = [_KVLayer.packed([(k, 0)], [(v, 0)], new_width) for k, v in new]
            self.cache, self.width = DynamicCache(), new_width
            self.cache.layers = layers
            return
        width = max(self.width, new_width)
        layers = []
        for layer, (k, v) in zip(self.cache.layers, new):
            keys = [(layer.keys, width - self.width), (k, width - new_width)]
            values = [(layer.values, width - self.width), (v, width - new_width)]
            layers.append(_KVLayer.packed(keys, values, width))
        self.cache.layers, self.width = layers, width

    def select(self, keep: list[int], lengths: list[int]) -> None:
        """Keeps rows `keep` (in that order) and drops the columns that are padding in all of them."""
        if not keep:
            self.cache, self.width = None, 0
            return
        trim = self.width - max(lengths)
        index = torch.tensor(keep, device=self.cache.layers[0].keys.device)
        for i, layer in enumerate(self.cache.layers):
            k, v = layer.keys[index, :, trim:], layer.values[index, :, trim:]
            self.cache.layers[i] = _KVLayer.packed([(k, 0)], [(v, 0)], self.width - trim)
        self.width -= trim

    def rollback(self) -> None:
        """Forgets columns that a failed forward appended to some layers."""
        for layer in self.cache.layers:
            layer.truncate(self.width)

    def row(self, i: int, length: int):
        """A DynamicCache holding row i alone, unpadded (a copy)."""
        cache = DynamicCache()
        for layer in self.cache.layers:
            single = DynamicLayer()
            single.update(
                layer.keys[i : i + 1, :, self.width - length :],
                layer.values[i : i + 1, :, self.width - length :],
            )
            cache.layers.append(single)
        return cache


class _KVLayer(DynamicLayer or object):
    """A cache layer whose `keys`/`values` are views of the first `width` columns of buffers with spare
    columns on the right, so `update` (one column per decoding step) writes in place."""

    @classmethod
    def packed(cls, keys, values, width: int):
        """A layer holding `keys` (a list of (tensor, left padding), stacked along the rows), each
        right-aligned in `width` columns, zeros elsewhere; likewise `values`."""
        layer = cls()
        layer._k = _stack_padded(keys, width, _spare(width))
        layer._v = _stack_padded(values, width, _spare(width))
        layer.device = layer._k.device
        layer.is_initialized = True
        layer._width = width
        layer._view()
        return layer

    def _view(self):
        self.keys = self._k[:, :, : self._width]
        self.values = self._v[:, :, : self._width]

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self._width + n > self._k.shape[-2]:
            grow = n + _spare(self._width + n)
            self._k = torch.cat([self.keys, _columns(self._k, grow)], 2)
            self._v = torch.cat([self.values, _columns(self._v, grow)], 2)
        self._k[:, :, self._width : self._width + n] = key_states
        self._v[:, :, self._width : self._width + n] = value_states
        self._width += n
        self._view()
        return self.keys, self.values

    def truncate(self, width: int) -> None:
        """Forgets the columns after the first `width`."""
        self._width = min(self._width, width)
        self._view()


def _columns(like: torch.Tensor, n: int) -> torch.Tensor:
    return like.new_zeros((like.shape[0], like.shape[1], n, like.shape[3]))


def _spare(width: int) -> int:
    return max(32, width // 4)


def _stack_padded(parts, width: int, spare: int) -> torch.Tensor:
    first = parts[0][0]
    rows = sum(t.shape[0] for t, _ in parts)
    out = first.new_zeros((rows, first.shape[1], width + spare, first.shape[3]))
    r = 0
    for t, pad in parts:
        out[r : r + t.shape[0], :, pad:width] = t
        r += t.shape[0]
    return out


# -- the engine -------------------------------------------------------------------------------------


class TextEngine:
    """Continuous batching over a `LoraModel` (module docstring).

    Args:
        model: the base with its adapters loaded (`LoraModel.load_adapter`); jobs name them in `mix`.
        tokenizer: its tokenizer (for decoding text and matching stop strings).
        max_batch: rows decoded together at most.
        max_loras: distinct adapters in the running batch at most.
        max_prefill_tokens: padded prompt tokens (rows x longest prompt) one prefill forward takes at
            most (one prompt always fits); further jobs join at the next step.
    """

    def __init__(
        self,
        model: LoraModel,
        tokenizer,
        max_batch: int = 32,
        max_loras: int = 8,
        max_prefill_tokens: int = 8192,
    ):
        if not isinstance(model, LoraModel):
            raise TypeError(f"TextEngine needs a LoraModel, got {type(model).__name__}")
        if max_batch < 1 or max_loras < 0 or max_prefill_tokens < 1:
            raise UserError("max_batch and max_prefill_tokens must be >= 1 and max_loras >= 0")
        if DynamicLayer is None:
            raise UserError("loraforge serve needs transformers >= 4.56 (caches made of layers)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_loras, self.max_prefill_tokens = max_batch, max_loras, max_prefill_tokens
        self.lock = _StepLock()
        config = model.model.config
        embedding = model.get_input_embeddings()
        embedding = getattr(embedding, "base_layer", None) or getattr(embedding, "original_module", embedding)
        self.vocab_size = embedding.weight.shape[0]  # (a LoRA or modules_to_save wrapper holds the base one)
        self.max_length = getattr(config, "max_position_embeddings", None)  # positions the model has
        params = inspect.signature(model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        self.device = next(model.parameters()).device
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._rows: list[_Row] = []  # the running batch, in cache order (replaced, never mutated)
        self._cache = _BatchCache()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- public interface -------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> set[int]:
        """The tokens that end a text for this model (tokenizer's and generation config's eos): what
        callers usually pass as `TextJob.stop_token_ids`."""
        ids = set()
        for value in (
            getattr(self.tokenizer, "eos_token_id", None),
            getattr(getattr(self.model.model, "generation_config", None), "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple | set):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    def start(self) -> TextEngine:
        """Starts the background step thread (idempotent)."""
        with self._cv:
            if self._closed:
                raise EngineClosed("this text engine was stopped")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="loraforge-text-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Takes no new jobs; with `drain` finishes every job already submitted (running and waiting),
        else cancels them. Returns when the step thread has ended (or after `timeout` seconds). Without a
        started thread, runs the remaining steps in the calling thread."""
        with self._cv:
            self._closed = True
            if not drain:
                for row in [*self._waiting, *self._rows]:
                    row.handle.cancel()
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        else:
            while self._has_work():
                self.step()

    def __enter__(self) -> TextEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, job: TextJob) -> TextHandle:
        """Queues `job` and returns its handle at once. Thread-safe; never waits for `lock`.

        Raises UserError for a job that can never run (empty prompt, a token id outside the
        vocabulary, a prompt as long as the model's context, bad sampling settings, a mix of more than
        `max_loras` adapters) and EngineClosed after `stop`. An adapter that is not loaded is found at
        admission: the job then finishes with an error."""
        row = self._make_row(job)
        with self._cv:
            if self._closed:
                raise EngineClosed("the text engine is shutting down and takes no new jobs")
            self._waiting.append(row)
            self._cv.notify_all()
        return row.handle

    def adapters_in_use(self) -> set[str]:
        """Adapters named by waiting or running jobs: not to be deleted or evicted now."""
        with self._cv:
            rows = [*self._waiting, *self._rows]
        return {name for row in rows for name in row.names}

    def stats(self) -> dict:
        """Rows running and jobs waiting now, and the cache's width (columns)."""
        return {"running": len(self._rows), "waiting": len(self._waiting), "width": self._cache.width}

    # -- jobs -------------------------------------------------------------------------------------

    def _make_row(self, job: TextJob) -> _Row:
        try:
            ids = [operator.index(t) for t in job.prompt_ids]
        except TypeError:
            raise UserError("prompt_ids must be a list of token ids") from None
        if not ids:
            raise UserError("prompt_ids is empty: a prompt needs at least one token")
        if not all(0 <= t < self.vocab_size for t in ids):
            raise UserError(f"prompt_ids must be token ids in [0, {self.vocab_size})")
        if self.max_length is not None and len(ids) >= self.max_length:
            raise UserError(
                f"the prompt has {len(ids)} tokens; this model takes {self.max_length} in all, "
                "prompt and completion together"
            )
        if not isinstance(job.max_tokens, int) or job.max_tokens < 1:
            raise UserError(f"max_tokens must be an integer >= 1, got {job.max_tokens!r}")
        if not (
            isinstance(job.temperature, int | float)
            and math.isfinite(job.temperature)
            and job.temperature >= 0
        ):
            raise UserError(f"temperature must be a number >= 0, got {job.temperature!r}")
        if not (isinstance(job.top_p, int | float) and 0 < job.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {job.top_p!r}")
        if job.seed is not None and not isinstance(job.seed, int):
            raise UserError(f"seed must be an integer, got {job.seed!r}")
        stops = [job.stop] if isinstance(job.stop, str) else list(job.stop or ())
        if not all(isinstance(s, str) for s in stops):
            raise UserError("stop must be a list of strings")
        try:
            stop_ids = frozenset(operator.index(t) for t in job.stop_token_ids or ())
        except TypeError:
            raise UserError("stop_token_ids must be token ids") from None
        mix = as_mix(job.mix)
        names = frozenset(name for name, _ in mix)
        if len(names) > self.max_loras:
            raise UserError(
                f"the mix uses {len(names)} adapters; this server runs at most {self.max_loras} in one batch"
            )
        generator = None
        if job.temperature > 0:
            seed = random.SystemRandom().getrandbits(63) if job.seed is None else job.seed % 2**64
            generator = torch.Generator().manual_seed(seed)
        return _Row(
            job=job,
            handle=TextHandle(job),
            mix=mix,
            generator=generator,
            detok=_Detokenizer(self.tokenizer, ids),
            stops=_StopMatcher(stops),
            prompt=ids,
            stop_ids=stop_ids,
            names=names,
        )

    def _has_work(self) -> bool:
        return bool(self._waiting or self._rows)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._has_work() or self._closed)
                if not self._has_work():
                    return
            self.lock._let_waiters_in()
            self.step()

    # -- one step ---------------------------------------------------------------------------------

    def step(self) -> bool:
        """One scheduling step; True while jobs remain (running or waiting).

        1. Rows whose handle was cancelled leave.
        2. Waiting jobs are admitted (free rows, `max_loras`, `max_prefill_tokens`) and prefilled in
           one forward: input_ids, attention_mask, position_ids ``(n, L)`` (L = the longest new prompt,
           shorter ones left-padded), logits ``(n, vocab)`` of each prompt's last token; the first token
           of each is sampled, and the rows' K/V ``(n, heads, L, head_dim)`` per layer join the cache.
        3. One decoding forward over all B running rows: input_ids and position_ids ``(B, 1)`` (each
           row's pending token at its own position), attention_mask ``(B, W + 1)`` over the cache's W
           columns plus the new one, K/V per layer ``(B, heads, W, head_dim)`` -> ``(B, heads, W + 1,
           head_dim)``, logits ``(B, vocab)``; one token sampled per row.
        4. Finished rows leave (the cache is re-packed only then).

        An unexpected error fails the running jobs (not the waiting ones) and keeps the engine going.
        Called by the step thread after `start`; may be called directly instead (tests, benchmarks)."""
        admitted: list[_Row] = []
        with self.lock._lock, torch.no_grad():
            try:
                self._retire_cancelled()
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
                if self._rows:
                    self._decode()
            except Exception as e:  # a bug: keep serving, but these rows' state is unknown
                log.exception("text engine step failed")
                for row in admitted + self._rows:  # (a finished handle ignores this)
                    row.handle._push(None, "error", f"internal error: {type(e).__name__}: {e}")
                self._rows, self._cache = [], _BatchCache()
        return self._has_work()

    def _retire_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.handle._cancelled]
        if len(keep) == len(self._rows):
            return
        for row in self._rows:
            if row.handle._cancelled:
                row.handle._push(None, "cancelled")
        self._set_rows([self._rows[i] for i in keep], keep)

    def _set_rows(self, rows: list[_Row], keep: list[int]) -> None:
        """The running batch becomes `rows` (= old rows `keep`); the cache follows."""
        self._cache.select(keep, [row.length for row in rows])
        self._rows = rows

    def _admit(self) -> list[_Row]:
        admitted: list[_Row] = []
        free = self.max_batch - len(self._rows)
        in_use = {name for row in self._rows for name in row.names}
        waiting_for: frozenset | None = None  # adapters of the first job blocked by max_loras
        longest = 0
        with self._cv:
            for row in list(self._waiting):
                if row.handle._cancelled:
                    self._waiting.remove(row)
                    row.handle._push(None, "cancelled")
                    continue
                if free == 0:
                    break
                problem = self._adapter_problem(row)
                if problem:
                    self._waiting.remove(row)
                    row.handle._push(None, "error", problem)
                    continue
                if waiting_for is not None and not row.names <= (waiting_for & in_use):
                    continue  # would keep other adapters busy (or take a slot) ahead of the blocked job
                if len(in_use | row.names) > self.max_loras:
                    waiting_for = waiting_for or row.names
                    continue
                n = len(row.prompt)
                if admitted and (len(admitted) + 1) * max(longest, n) > self.max_prefill_tokens:
                    break
                self._waiting.remove(row)
                admitted.append(row)
                in_use |= row.names
                free -= 1
                longest = max(longest, n)
        return admitted

    def _adapter_problem(self, row: _Row) -> str | None:
        config = self.model.peft_config
        for name in row.names:
            if name not in config:
                return f"unknown adapter {name!r}; loaded: {', '.join(config) or 'none'}"
            if config[name].use_dora:
                return dora_mixed_error(name)
        return None

    # -- forwards ---------------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, lengths: list[int], mixes: list[Mix], cache, width: int):
        """Logits ``(n, vocab)`` after feeding `ids` ``(n, q)``, the last q of `width` columns; row i
        then has lengths[i] real tokens, right-aligned."""
        n, q = ids.shape
        columns = torch.arange(width, device=self.device)
        start = width - torch.tensor(lengths, device=self.device)
        mask = (columns[None, :] >= start[:, None]).long()
        positions = (columns[None, width - q :] - start[:, None]).clamp_(min=0)
        kwargs = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask,
            "position_ids": positions,
            self._cache_kw: cache,
            "use_cache": True,
        }
        if self._keep_kw:
            kwargs[self._keep_kw] = 1
        if all(not mix for mix in mixes):
            with self.model.disable_adapter():
                out = self.model(**kwargs)
        else:
            out = self.model(**kwargs, adapter_names=mixes)
        return out.logits[:, -1].float()

    def _prefill_forward(self, rows: list[_Row]):
        lengths = [len(row.prompt) for row in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - lengths[i] :] = torch.tensor(row.prompt)
        cache = DynamicCache()
        logits = self._forward(ids, lengths, [row.mix for row in rows], cache, width)
        return logits, cache

    def _prefill(self, rows: list[_Row]) -> None:
        try:
            groups = [(rows, *self._prefill_forward(rows))]
        except Exception as e:
            if len(rows) == 1:
                self._fail(rows[0], e)
                return
            groups = []
            for row in rows:  # find the culprit(s): each alone
                try:
                    groups.append(([row], *self._prefill_forward([row])))
                except Exception as e_row:
                    self._fail(row, e_row)
        for group, logits, cache in groups:
            for row in group:
                row.length = len(row.prompt)
            tokens = self._sample(logits, group)
            keep = [i for i, (row, token) in enumerate(zip(group, tokens)) if not self._accept(row, token)]
            if keep:
                self._cache.merge(cache, keep, [group[i].length for i in keep])
                self._rows = self._rows + [group[i] for i in keep]

    def _decode(self) -> None:
        rows, width = self._rows, self._cache.width
        ids = torch.tensor([[row.pending] for row in rows])
        lengths = [row.length + 1 for row in rows]
        mixes = [row.mix for row in rows]
        try:
            logits = self._forward(ids, lengths, mixes, self._cache.cache, width + 1)
            ok = list(range(len(rows)))
        except Exception:
            self._cache.rollback()
            logits, ok = self._decode_alone(rows, ids, lengths, mixes)
        self._cache.width += 1
        for row in rows:
            row.length += 1
        tokens = self._sample(logits, [rows[i] for i in ok]) if ok else []
        finished = {i for i, token in zip(ok, tokens) if self._accept(rows[i], token)}
        keep = [i for i in ok if i not in finished]
        if len(keep) < len(rows):
            self._set_rows([rows[i] for i in keep], keep)

    def _decode_alone(self, rows, ids, lengths, mixes):
        """After a batched decoding forward raised: each row alone; rows that fail alone finish with an
        error, the others' new K/V columns are appended to the batch cache."""
        ok, logits, columns = [], [], []
        for i, row in enumerate(rows):
            cache = self._cache.row(i, row.length)
            try:
                logits.append(self._forward(ids[i : i + 1], [lengths[i]], [mixes[i]], cache, lengths[i]))
            except Exception as e:
                self._fail(row, e)
                continue
            ok.append(i)
            columns.append([(layer.keys[:, :, -1:], layer.values[:, :, -1:]) for layer in cache.layers])
        for n, layer in enumerate(self._cache.cache.layers):
            k = layer.keys.new_zeros((len(rows), *layer.keys.shape[1:2], 1, layer.keys.shape[3]))
            v = layer.values.new_zeros((len(rows), *layer.values.shape[1:2], 1, layer.values.shape[3]))
            for i, cols in zip(ok, columns):
                k[i], v[i] = cols[n][0][0], cols[n][1][0]
            layer.update(k, v)
        return (torch.cat(logits) if logits else None), ok

    def _fail(self, row: _Row, e: Exception) -> None:
        log.warning("text job failed: %s: %s", type(e).__name__, e)
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        row.handle._push(None, "error", message)

    # -- sampling and output ----------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """One token per row: argmax where temperature is 0, else a draw from the row's generator."""
        tokens = logits.argmax(-1)
        sampled = [i for i, row in enumerate(rows) if row.job.temperature > 0]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            temps = torch.tensor([rows[i].job.temperature for i in sampled], device=logits.device)
            top_p = torch.tensor([rows[i].job.top_p for i in sampled], device=logits.device)
            probs = torch.softmax(logits[index] / temps[:, None], dim=-1)
            probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            kept = (probs.cumsum(-1) - probs) < top_p[:, None]  # the smallest head reaching top_p
            kept[:, 0] = True
            cdf = (probs * kept).cumsum(-1)
            u = torch.stack([torch.rand((), generator=rows[i].generator) for i in sampled]).to(logits.device)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            pick = torch.minimum(pick, kept.sum(-1, keepdim=True) - 1)
            tokens[index] = order.gather(1, pick)[:, 0]
        return tokens.tolist()

    def _accept(self, row: _Row, token: int) -> bool:
        """Takes `token` as the row's next: releases its text, checks the stop conditions; True if the
        job has finished."""
        row.generated, row.pending = row.generated + 1, token
        reason, text = None, ""
        if token in row.stop_ids:
            reason = "stop"
        else:
            text, hit = row.stops.feed(row.detok.add(token))
            if hit:
                reason = "stop"
            elif row.generated >= row.job.max_tokens:
                reason = "length"
            elif self.max_length is not None and row.length >= self.max_length:
                reason = "length"  # no position left for the next token
        if reason is not None and not (reason == "stop" and token not in row.stop_ids):
            # Ended by a stop token or the length: release what was held (it may still hold a stop).
            tail, hit = row.stops.feed(row.detok.flush())
            text += tail if hit else tail + row.stops.flush()
            reason = "stop" if hit else reason
        row.handle._push(TextDelta(text, [token]), reason)
        return reason is not None
