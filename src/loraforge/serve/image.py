"""`ImageEngine`: image requests for different LoRAs, and weighted mixes of them, in one UNet batch.

    engine = ImageEngine(pipe, PipelineAdapters(pipe))          # pipe from loraforge.runtime.load_pipeline
    engine.load("style", "runs/image/adapter")                  # any image adapter format
    engine.start()
    handle = engine.submit(ImageJob("a circle, in the style of <s1><s2>", mix=(("style", 0.8),), seed=7))
    images = handle.result(timeout=60)                          # PIL images; `await handle` in asyncio code
    engine.stop()

Jobs submitted within `window_ms` of each other that share size and steps run as one batch (at most
`max_batch` UNet rows, at most `max_loras` distinct adapters), on a background thread. A batch runs its
own denoising loop over the pipeline's text encoder(s), UNet, scheduler and VAE:

* **Text**: one forward per text encoder over the prompt (and negative prompt) of every job, each row
  carrying its job's mix on the text-encoder LoRA (`LoraModel`'s mixed batch). Learned tokens
  (``<s1><s2>``) are per job: each job's prompt is tokenized by a tokenizer that knows that job's
  tokens only, and the token embedding's output is overwritten, row by row, with that job's vectors
  (the weighted average when several of its adapters define the same token, as
  `PipelineAdapters.activate` does). Another job's tokens, or the same token with other vectors,
  never reach it; the pipeline's own tokenizer and embedding are never changed.
* **UNet**: one forward per step over all rows of all jobs; a job with classifier-free guidance has
  an unconditional and a conditional row per image, both with the job's mix (what the pipeline does
  with the adapter active). Guidance is combined per job, then one scheduler step moves the batch.
* **Noise**: image k of a job starts from its own CPU generator seeded ``seed + k`` (as
  `loraforge.runtime.render` does), which also feeds the scheduler's per-step noise row by row, so
  ancestral samplers (Euler a, DDPM) stay exact in a batch.

Exactness: a job gives the same image alone, in any batch, and through `loraforge.runtime.render`
with its adapters applied at its weights (float rounding aside: batched kernels may round
differently; the tests bound it). Schedulers outside `BATCHABLE_SCHEDULERS` (not checked to step every
row independently) run one image per batch. An empty negative prompt means none (for SDXL: zero
embeddings, the pipeline's default).

Failures are per job: a job that cannot run (unknown adapter, bad size, ...) fails alone; if a shared
batch fails unexpectedly, each of its jobs is run again on its own, so only the culprit fails.
`load` / `unload` take `lock`, which a batch holds from start to end, so they happen between batches;
a failed load leaves the pipeline as it was.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import inspect
import math
import random
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.errors import NotFound, UserError
from loraforge.layers import dora_mixed_error
from loraforge.model import BASE_ROW, Mix
from loraforge.runtime import AdapterSpec, PipelineAdapters, native_size, size_step, text_models

# Schedulers whose step was checked to treat every batch row on its own (elementwise updates, per-image
# thresholding, noise drawn per row from a list of generators).
BATCHABLE_SCHEDULERS = frozenset(
    {
        "DDIMScheduler",
        "DDPMScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
    }
)
OUTPUTS = ("pil", "np")
MAX_SEED = 2**63 - 1
TOKENIZER_CACHE = 64  # tokenizers with a job's learned tokens added, kept by token list


class EngineStopped(UserError):
    """A job submitted to (or left waiting in) an engine that is stopping."""


@dataclass
class ImageJob:
    """One image request. `mix`: an adapter name, ``()`` / ``BASE_ROW`` for the base, or (name, weight)
    pairs. Image k uses seed ``seed + k`` (a random seed when None; see `ImageHandle.seed`).
    `width` / `height` default to the pipeline's native size. `output`: "pil" (PIL images) or "np"
    (float32 HxWx3 arrays in [0, 1], before rounding to 8 bits)."""

    prompt: str
    negative_prompt: str = ""
    mix: Mix | str = ()
    seed: int | None = None
    steps: int = 20
    guidance: float = 7.0
    width: int | None = None
    height: int | None = None
    n: int = 1
    output: str = "pil"


def job_mix(mix) -> Mix:
    """A job's adapters as a Mix: a name, ``()``/``BASE_ROW``/None for the base, or (name, weight)
    pairs (a bare name in the list counts as weight 1). A name given twice adds its weights; weight-0
    entries are dropped, as `loraforge.runtime.apply_adapters` skips weight-0 adapters (tokens too)."""
    if mix is None:
        return ()
    if isinstance(mix, str):
        return () if mix in (BASE_ROW, "") else ((mix, 1.0),)
    weights: dict[str, float] = {}
    try:
        entries = list(mix)
    except TypeError:
        raise UserError(f"mix must be an adapter name or (name, weight) pairs, not {mix!r}") from None
    for entry in entries:
        try:
            name, weight = (entry, 1.0) if isinstance(entry, str) else entry
            weight = float(weight)
        except (TypeError, ValueError):
            raise UserError(f"mix entries must be (name, weight) pairs, not {entry!r}") from None
        if not isinstance(name, str) or not name:
            raise UserError(f"mix entries must name an adapter, not {name!r}")
        if not math.isfinite(weight):
            raise UserError(f"adapter {name!r}: weight must be a finite number, not {weight}")
        if name != BASE_ROW:
            weights[name] = weights.get(name, 0.0) + weight
    return tuple((name, w) for name, w in weights.items() if w != 0)


class ImageHandle:
    """A submitted job: `result(timeout)` blocks, ``await handle`` suspends; both give the images in
    order (image k from seed ``seed + k``) or raise the job's error. `error` is its message once failed."""

    def __init__(self, job: ImageJob):
        self.job = job
        self.seed: int | None = None  # seed of image 0, set when the job is accepted
        self.mix: Mix = ()
        self.width = self.height = 0
        self.cfg = False  # whether the job has an unconditional row per image
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._images: list = []
        self._left = 0

    def result(self, timeout: float | None = None) -> list:
        """The images; raises TimeoutError if not done within `timeout` seconds, or the job's error."""
        return self._future.result(timeout)

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def done(self) -> bool:
        return self._future.done()

    @property
    def error(self) -> str | None:
        if not self._future.done():
            return None
        if self._future.cancelled():
            return "cancelled"
        e = self._future.exception()
        return None if e is None else str(e) or type(e).__name__

    def cancel(self) -> bool:
        """Gives up on the job (a client that went away): images not yet started are not made."""
        return self._future.cancel()

    # -- engine side -------------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._future.set_exception(error)

    def _deliver(self, k: int, image) -> None:
        if self._future.done():
            return
        self._images[k] = image
        self._left -= 1
        if self._left == 0:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                self._future.set_result(list(self._images))


@dataclass(eq=False)
class _Item:
    """Image k of a job: the unit the scheduler packs into batches."""

    handle: ImageHandle
    k: int
    arrived: float

    @property
    def key(self) -> tuple:
        h = self.handle
        return h.width, h.height, h.job.steps

    @property
    def rows(self) -> int:
        return 2 if self.handle.cfg else 1


class ImageEngine:
    """Serves a Stable Diffusion pipeline (SD 1.x/2.x or SDXL, text to image) with many adapters;
    see the module docstring. `adapters` wraps the pipeline's models (created if None); adapters
    already loaded on it are served under their names."""

    decode_batch = 8  # images per VAE decode call

    def __init__(
        self,
        pipe,
        adapters: PipelineAdapters | None = None,
        max_batch: int = 16,
        max_loras: int = 8,
        window_ms: float = 5,
    ):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if not isinstance(pipe, StableDiffusionPipeline | StableDiffusionXLPipeline):
            raise UserError(
                f"the image engine runs Stable Diffusion (1.x/2.x, XL) text-to-image pipelines, "
                f"not {type(pipe).__name__}"
            )
        if max_batch < 1 or max_loras < 1 or window_ms < 0:
            raise UserError("max_batch and max_loras must be at least 1 and window_ms at least 0")
        self.pipe = pipe
        self.adapters = adapters if adapters is not None else PipelineAdapters(pipe)
        self.max_batch, self.max_loras, self.window = int(max_batch), int(max_loras), window_ms / 1000
        self.lock = threading.RLock()  # held while a batch runs and while adapters are added or removed
        self.batches: deque = deque(maxlen=1000)  # (jobs, images, UNet rows) of each batch run, newest last
        self._xl = isinstance(pipe, StableDiffusionXLPipeline)
        self._text = text_models(pipe)
        # The tokenizers as they are now: jobs get copies with their own learned tokens added.
        self._base_tokenizers = {c: copy.deepcopy(tok) for c, tok, _ in self._text}
        self._tokenizers: OrderedDict = OrderedDict()
        self._cv = threading.Condition()  # guards the queue, the running batch and the stop flags
        self._queue: list[_Item] = []
        self._running: list[_Item] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> ImageEngine:
        with self._cv:
            if self._stopping:
                raise EngineStopped("the image engine was stopped; make a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="loraforge-images", daemon=True)
                self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking jobs. `drain`: finish every job already submitted; otherwise fail the waiting
        ones (the running batch still finishes). Returns when the worker has ended."""
        with self._cv:
            self._stopping = True
            if not drain or self._thread is None:
                for item in self._queue:
                    item.handle._fail(EngineStopped("the image engine stopped before this job ran"))
                self._queue.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ImageEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- adapters ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the loaded adapters."""
        return [a.name for a in self.adapters.adapters]

    def adapters_in_use(self) -> set[str]:
        """Adapters named by waiting or running jobs (not to be unloaded or evicted now)."""
        with self._cv:
            return {name for item in self._queue + self._running for name, _ in item.handle.mix}

    def load(self, name: str, path: str | Path):
        """Loads an image adapter (diffusers, kohya or cloneofsimo files; a store CID) as `name`.
        Raises UserError (the pipeline unchanged) if it cannot be served: another base, a name in
        use, DoRA (no mixed batches), learned tokens that do not fit the text encoders."""
        if not isinstance(name, str) or not name or "." in name or name == BASE_ROW:
            raise UserError(f"invalid adapter name {name!r}: a non-empty string without dots")
        with self.lock:
            if name in self.names():
                raise UserError(f"an adapter named {name!r} is already loaded; unload it first")
            loaded = self.adapters.load(AdapterSpec(str(path), 1.0), name)
            try:
                self._check_servable(name, loaded.lora)
            except BaseException:
                self._remove(name)
                raise
            return loaded

    def unload(self, name: str) -> None:
        """Removes adapter `name`. Jobs still waiting for it fail when their batch is formed."""
        with self.lock:
            if name not in self.names():
                raise NotFound(f"unknown adapter {name!r}; loaded: {', '.join(self.names()) or 'none'}")
            self._remove(name)

    def _remove(self, name: str) -> None:
        for model in self.adapters.models.values():
            if name in model.peft_config:
                model.delete_adapter(name)
        self.adapters.adapters = [a for a in self.adapters.adapters if a.name != name]

    def _check_servable(self, name: str, lora) -> None:
        for model in self.adapters.models.values():
            if name in model.peft_config and model.peft_config[name].use_dora:
                raise UserError(dora_mixed_error(name))
        for component, _, encoder in self._text if lora.tokens else ():
            rows, dim = lora.embeddings[component], encoder.get_input_embeddings().weight.shape[1]
            if tuple(rows.shape) != (len(lora.tokens), dim):
                raise UserError(
                    f"adapter {name!r}: learned token vectors of shape {tuple(rows.shape)} do not fit "
                    f"{component} ({len(lora.tokens)} tokens x {dim})"
                )

    # -- jobs --------------------------------------------------------------------------------------

    def submit(self, job: ImageJob) -> ImageHandle:
        """Queues `job`; returns at once. A job that cannot run comes back as a failed handle."""
        handle = ImageHandle(job)
        try:
            self._accept(handle)
        except UserError as e:
            handle._fail(e)
            return handle
        now = time.monotonic()
        with self._cv:
            if self._stopping:
                handle._fail(EngineStopped("the image engine is stopping"))
                return handle
            self._queue.extend(_Item(handle, k, now) for k in range(job.n))
            self._cv.notify_all()
        return handle

    def _accept(self, handle: ImageHandle) -> None:
        """Checks a job's fields and fixes its seed, size and mix on the handle."""
        job = handle.job
        if not isinstance(job, ImageJob):
            raise UserError(f"submit takes an ImageJob, not {type(job).__name__}")
        if not isinstance(job.prompt, str):
            raise UserError("prompt must be a string")
        if job.negative_prompt is not None and not isinstance(job.negative_prompt, str):
            raise UserError("negative_prompt must be a string")
        for field, value, least in (("n", job.n, 1), ("steps", job.steps, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise UserError(f"{field} must be an integer of at least {least}, got {value!r}")
        if (
            not isinstance(job.guidance, int | float)
            or isinstance(job.guidance, bool)
            or not math.isfinite(job.guidance)
            or job.guidance < 0
        ):
            raise UserError(f"guidance must be a number >= 0, got {job.guidance!r}")
        if job.output not in OUTPUTS:
            raise UserError(f"output must be one of {', '.join(OUTPUTS)}, got {job.output!r}")
        native_w, native_h = native_size(self.pipe)
        step = size_step(self.pipe)
        for field, value in (("width", job.width), ("height", job.height)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % step
            ):
                raise UserError(
                    f"{field} must be a positive multiple of {step} for this pipeline, got {value!r}"
                )
        seed = job.seed
        if seed is None:
            seed = random.randrange(0, 2**32)
        elif not isinstance(seed, int) or isinstance(seed, bool) or seed < 0 or seed + job.n - 1 > MAX_SEED:
            raise UserError(f"seed must be an integer from 0 to {MAX_SEED - job.n + 1}, got {seed!r}")
        mix = job_mix(job.mix)
        self._check_names(mix)
        handle.seed, handle.mix = seed, mix
        handle.width, handle.height = job.width or native_w, job.height or native_h
        handle.cfg = job.guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        handle._images, handle._left = [None] * job.n, job.n

    def _check_names(self, mix: Mix) -> None:
        names = self.names()
        for name, _ in mix:
            if name not in names:
                raise NotFound(f"unknown adapter {name!r}; loaded: {', '.join(names) or 'none'}")
            for model in self.adapters.models.values():
                if name in model.peft_config and model.peft_config[name].use_dora:
                    raise UserError(dora_mixed_error(name))

    # -- scheduling --------------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._cv:
                batch = self._next_batch()
                if batch is None:
                    return
                self._running = batch
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - the worker must outlive any batch
                for item in batch:
                    item.handle._fail(e)
            finally:
                with self._cv:
                    self._running = []

    def _next_batch(self) -> list[_Item] | None:
        """Waits (holding `_cv`) for jobs and for the batching window; None once stopped and empty."""
        while True:
            self._queue = [i for i in self._queue if not i.handle.done()]
            if self._queue:
                first = self._queue[0]
                until = first.arrived + self.window
                while not self._stopping and time.monotonic() < until and not self._full(first.key):
                    self._cv.wait(until - time.monotonic())
                batch = self._take()
                if batch:
                    return batch
                continue
            if self._stopping:
                return None
            self._cv.wait()

    def _full(self, key) -> bool:
        return sum(i.rows for i in self._queue if i.key == key) >= self.max_batch

    def _take(self) -> list[_Item]:
        """The oldest job's image first, then, in order of arrival, every waiting image of the same size
        and steps that fits in `max_batch` rows and `max_loras` adapters."""
        live = [i for i in self._queue if not i.handle.done()]
        if not live:
            self._queue = []
            return []
        key = live[0].key
        batchable = type(self.pipe.scheduler).__name__ in BATCHABLE_SCHEDULERS
        taken, rest, rows, names = [], [], 0, set()
        for item in live:
            mine = {n for n, _ in item.handle.mix}
            fits = item.key == key and (
                not taken
                or (batchable and rows + item.rows <= self.max_batch and len(names | mine) <= self.max_loras)
            )
            if fits:
                taken.append(item)
                rows += item.rows
                names |= mine
            else:
                rest.append(item)
        self._queue = rest
        return taken

    def _run(self, batch: list[_Item]) -> None:
        with self.lock, torch.no_grad():
            for handle in _handles(batch):
                try:
                    self._check_names(handle.mix)  # adapters may have been unloaded since submit
                except UserError as e:
                    handle._fail(e)
            items = [i for i in batch if not i.handle.done()]
            if not items:
                return
            try:
                self._deliver(items, self._generate(items))
                return
            except Exception as e:  # noqa: BLE001 - whose fault is found below
                jobs = _handles(items)
                if len(jobs) == 1:
                    jobs[0]._fail(e)
                    return
            # A shared batch failed: run each job on its own, so only the one at fault fails.
            for handle in jobs:
                mine = [i for i in items if i.handle is handle]
                try:
                    self._deliver(mine, self._generate(mine))
                except Exception as e:  # noqa: BLE001
                    handle._fail(e)

    @staticmethod
    def _deliver(items: list[_Item], images: list) -> None:
        for item, image in zip(items, images, strict=True):
            item.handle._deliver(item.k, image)

    # -- one batch ---------------------------------------------------------------------------------

    def _generate(self, items: list[_Item]) -> list:
        """The images of `items` (same size and steps), one per item, made in one batch."""
        pipe, unet = self.pipe, self.adapters.models["unet"]
        device = pipe._execution_device
        jobs = _handles(items)
        first = items[0].handle
        width, height, steps = first.width, first.height, first.job.steps
        text = self._encode(jobs, device)

        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        if self._xl and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as the SDXL pipeline does

        from diffusers.utils.torch_utils import randn_tensor

        dtype = text[first][0].dtype
        factor = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, height // factor, width // factor)
        generators = [torch.Generator("cpu").manual_seed(i.handle.seed + i.k) for i in items]
        latents = torch.cat(
            [randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators]
        )
        latents = latents * scheduler.init_noise_sigma

        # Rows: per image, (unconditional, conditional) with guidance, else conditional only.
        row_item, embeds, pooled, mixes, guidance_rows = [], [], [], [], []
        for n, item in enumerate(items):
            cond, uncond, cond_pooled, uncond_pooled = text[item.handle]
            parts = (
                [(uncond, uncond_pooled), (cond, cond_pooled)] if item.handle.cfg else [(cond, cond_pooled)]
            )
            for emb, pool in parts:
                row_item.append(n)
                embeds.append(emb)
                pooled.append(pool)
                mixes.append(self._row(unet, item.handle.mix))
                guidance_rows.append(item.handle.job.guidance)
        row_item = torch.tensor(row_item, device=latents.device)
        embeds = torch.cat(embeds)
        kwargs = {}
        if self._xl:
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.cat(pooled).to(device),
                "time_ids": time_ids.to(device).repeat(len(mixes), 1),
            }
        if pipe.unet.config.time_cond_proj_dim is not None:  # guidance-distilled UNets (LCM)
            w = torch.tensor([g - 1 for g in guidance_rows])
            kwargs["timestep_cond"] = pipe.get_guidance_scale_embedding(
                w, embedding_dim=pipe.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        self.batches.append((len(jobs), len(items), len(mixes)))

        step_args = set(inspect.signature(scheduler.step).parameters)
        extra = {}
        if "eta" in step_args:
            extra["eta"] = 0.0
        if "generator" in step_args:
            extra["generator"] = generators if len(generators) > 1 else generators[0]
        starts = [row_item.tolist().index(n) for n in range(len(items))]
        for t in timesteps:
            model_input = scheduler.scale_model_input(latents[row_item], t)
            out = unet(
                model_input, t, encoder_hidden_states=embeds, return_dict=False, adapter_names=mixes, **kwargs
            )[0]
            noise = []
            for item, r in zip(items, starts):
                if item.handle.cfg:
                    uncond, cond = out[r : r + 1], out[r + 1 : r + 2]
                    noise.append(uncond + item.handle.job.guidance * (cond - uncond))
                else:
                    noise.append(out[r : r + 1])
            latents = scheduler.step(torch.cat(noise), t, latents, **extra, return_dict=False)[0]
        return self._decode(latents, [i.handle.job.output for i in items])

    def _decode(self, latents: torch.Tensor, outputs: list[str]) -> list:
        pipe, vae = self.pipe, self.pipe.vae
        upcast = self._xl and vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(torch.float32)
        config = vae.config
        if self._xl and getattr(config, "latents_mean", None) is not None and config.latents_std is not None:
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        try:
            images = torch.cat(
                [vae.decode(chunk, return_dict=False)[0] for chunk in latents.split(self.decode_batch)]
            )
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            images = pipe.watermark.apply_watermark(images)
        arrays = pipe.image_processor.postprocess(
            images, output_type="np", do_denormalize=[True] * len(images)
        )
        return [
            a if out == "np" else pipe.image_processor.numpy_to_pil(a[None])[0]
            for a, out in zip(arrays, outputs)
        ]

    # -- text --------------------------------------------------------------------------------------

    def _encode(self, jobs: list[ImageHandle], device) -> dict:
        """Per job: (conditional embeddings, unconditional or None, pooled, unconditional pooled),
        batch dimension 1, from one forward per text encoder over every job's texts."""
        texts = []  # (job, text); a job's unconditional text right after its prompt
        zero_negative = {}
        for h in jobs:
            texts.append((h, h.job.prompt))
            zero_negative[h] = (
                h.cfg
                and self._xl
                and not h.job.negative_prompt
                and self.pipe.config.force_zeros_for_empty_prompt
            )
            if h.cfg and not zero_negative[h]:
                texts.append((h, h.job.negative_prompt or ""))
        tokens = {h: self._job_tokens(h.mix) for h in jobs}
        hidden, pooled = [], None
        for component, _, encoder in self._text:
            ids, masks, replace, rows = [], [], [], []
            model = self.adapters.models[component]
            for h, text in texts:
                order, vectors = tokens[h]
                tokenizer = self._tokenizer(component, order)
                enc = tokenizer(
                    [text],
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                ids.append(enc.input_ids)
                masks.append(enc.attention_mask)
                replace.append(
                    dict(zip(tokenizer.convert_tokens_to_ids(order), vectors[component])) if order else {}
                )
                rows.append(self._row(model, h.mix))
            ids = torch.cat(ids)
            mask = (
                torch.cat(masks).to(device) if getattr(encoder.config, "use_attention_mask", False) else None
            )
            with _token_vectors(encoder.get_input_embeddings(), ids, replace):
                out = model(
                    ids.to(device), attention_mask=mask, output_hidden_states=self._xl, adapter_names=rows
                )
            if self._xl:
                if pooled is None and out[0].ndim == 2:
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
            else:
                hidden.append(out[0])
        emb = torch.cat(hidden, dim=-1) if self._xl else hidden[0]
        emb = emb.to(dtype=self._text[-1][2].dtype, device=device)
        result, row = {}, 0
        for h in jobs:
            cond = emb[row : row + 1]
            cond_pooled = pooled[row : row + 1] if pooled is not None else None
            row += 1
            uncond = uncond_pooled = None
            if zero_negative[h]:
                uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(cond_pooled)
            elif h.cfg:
                uncond = emb[row : row + 1]
                uncond_pooled = pooled[row : row + 1] if pooled is not None else None
                row += 1
            result[h] = (cond, uncond, cond_pooled, uncond_pooled)
        return result

    def _job_tokens(self, mix: Mix) -> tuple[tuple[str, ...], dict[str, list[torch.Tensor]]]:
        """The learned tokens of a mix's adapters, in order, and their vectors per text encoder: the
        |weight|-weighted average where several adapters define a token (as `PipelineAdapters.activate`)."""
        loaded = {a.name: a.lora for a in self.adapters.adapters}
        found: dict[str, list] = {}
        for name, weight in mix:
            lora = loaded[name]
            for i, token in enumerate(lora.tokens):
                found.setdefault(token, []).append((weight, {c: v[i] for c, v in lora.embeddings.items()}))
        order = tuple(found)
        vectors = {}
        for component, _, _ in self._text:
            rows = []
            for token in order:
                total = sum(abs(w) for w, _ in found[token])
                rows.append(sum(abs(w) / total * v[component].float() for w, v in found[token]))
            vectors[component] = rows
        return order, vectors

    def _tokenizer(self, component: str, tokens: tuple[str, ...]):
        """The pipeline's tokenizer (as it was when the engine started) with `tokens` added in order."""
        base = self._base_tokenizers[component]
        if not tokens:
            return base
        key = (component, tokens)
        tokenizer = self._tokenizers.get(key)
        if tokenizer is None:
            tokenizer = copy.deepcopy(base)
            new = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
            if new:
                tokenizer.add_tokens(new)
            self._tokenizers[key] = tokenizer
            while len(self._tokenizers) > TOKENIZER_CACHE:
                self._tokenizers.popitem(last=False)
        else:
            self._tokenizers.move_to_end(key)
        return tokenizer

    @staticmethod
    def _row(model, mix: Mix):
        """A job's mix as a mixed-batch row of one component: only the adapters that component has."""
        row = tuple((n, w) for n, w in mix if n in model.peft_config)
        return row if row else BASE_ROW


def _handles(items: list[_Item]) -> list[ImageHandle]:
    return list(dict.fromkeys(i.handle for i in items))


@contextlib.contextmanager
def _token_vectors(embedding: torch.nn.Module, ids: torch.Tensor, replace: list[dict[int, torch.Tensor]]):
    """While inside, the token embedding gives row r's vector `replace[r][id]` wherever row r holds a
    learned token's id (ids past the embedding table are looked up as 0 and then overwritten), so
    every row sees its own job's token vectors and the model's ids (which CLIP's pooling reads) stay."""
    if not any(replace):
        yield
        return
    hit = torch.zeros(ids.shape, dtype=torch.bool)
    vectors = None
    for r, table in enumerate(replace):
        for token_id, vector in table.items():
            where = ids[r] == token_id
            if vectors is None:
                vectors = torch.zeros((*ids.shape, vector.shape[-1]), dtype=torch.float32)
            hit[r] |= where
            vectors[r, where] = vector.float()
    if vectors is None:
        yield
        return

    def before(module, args):
        if args[0].shape != ids.shape:
            raise RuntimeError("token embedding called with unexpected ids while learned tokens were set")
        return (args[0].masked_fill(hit.to(args[0].device), 0), *args[1:])

    def after(module, args, output):
        mask = hit.to(output.device)[..., None]
        return torch.where(mask, vectors.to(output.device, output.dtype), output)

    hooks = [embedding.register_forward_pre_hook(before), embedding.register_forward_hook(after)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
