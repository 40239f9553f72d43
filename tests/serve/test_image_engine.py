"""ImageEngine: jobs with different LoRAs, weighted mixes and learned tokens share one UNet batch and give
the same images as alone and as the single-request path (`loraforge.runtime.render`).

Tolerances: float images (``output="np"``, [0, 1]) agree within ATOL = 1e-4 (measured: about 2e-6;
batched kernels round differently from single-row ones); 8-bit images within one level (a value on a
rounding boundary). Images that should differ must differ by more than DIFFERENT = 100 x ATOL.
"""

import asyncio
from functools import partial

import numpy as np
import pytest
import torch
from image_adapters import random_lora, write_adapter

from loraforge.errors import NotFound, UserError
from loraforge.runtime import GenerationSettings, PipelineAdapters, apply_adapters, load_pipeline, render
from loraforge.serve.image import EngineStopped, ImageEngine, ImageJob, job_mix

ATOL = 1e-4
DIFFERENT = 100 * ATOL
PROMPT = "a circle, in the style of <s1><s2>"
STEPS = 3


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """a: UNet + text-encoder LoRA, tokens <s1><s2> (diffusers files); b: other LoRA, the same two tokens
    with other vectors (kohya file); b2: b's LoRA with a's token vectors; c: UNet-only LoRA, no tokens."""
    root = tmp_path_factory.mktemp("adapters")
    pipe = load_pipeline("tiny-sd")
    a = random_lora(pipe, 1, tokens=("<s1>", "<s2>"))
    b = random_lora(pipe, 2, tokens=("<s1>", "<s2>"))
    b2 = random_lora(pipe, 2, tokens=("<s1>", "<s2>"))
    b2.embeddings = a.embeddings
    return {
        "a": write_adapter(root / "a", a),
        "b": write_adapter(root / "b", b, "kohya"),
        "b2": write_adapter(root / "b2", b2),
        "c": write_adapter(root / "c", random_lora(pipe, 3, text=())),
    }


def make_engine(adapter_dirs, names=("a", "b", "c"), **kwargs):
    pipe = load_pipeline("tiny-sd")
    engine = ImageEngine(pipe, PipelineAdapters(pipe), **kwargs)
    for name in names:
        engine.load(name, adapter_dirs[name])
    return engine


def reference(adapter_dirs, job: ImageJob, scheduler=None):
    """The job through the single-request path: a fresh pipeline with the job's adapters applied at its
    weights, then the pipeline's own call, image k seeded seed + k: (float images, render's PIL images)."""
    mix = job_mix(job.mix)
    pipe = load_pipeline("tiny-sd")
    apply_adapters(pipe, [(str(adapter_dirs[name]), weight) for name, weight in mix])
    if scheduler is not None:
        pipe.scheduler = scheduler(pipe.scheduler.config)
    floats = [
        pipe(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt or None,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            generator=torch.Generator("cpu").manual_seed(job.seed + k),
            output_type="np",
        ).images[0]
        for k in range(job.n)
    ]
    settings = GenerationSettings(job.prompt, job.negative_prompt or None, job.seed, job.steps, job.guidance)
    return floats, render(pipe, settings, job.n)


def alone(engine, job):
    return engine.submit(job).result(60)


def run_together(engine, jobs):
    """Submits every job before the worker starts, so they are all waiting when the first batch forms."""
    handles = [engine.submit(job) for job in jobs]
    engine.start()
    return [h.result(60) for h in handles]


def close(x, y, atol=ATOL):
    return len(x) == len(y) and all(np.abs(u - v).max() <= atol for u, v in zip(x, y))


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_mixed_batch_equals_alone_and_the_single_request_path(adapter_dirs):
    jobs = [
        ImageJob(PROMPT, negative_prompt="blurry", mix="a", seed=3, steps=STEPS, guidance=5.0, output="np"),
        ImageJob(PROMPT, mix=(("b", 0.6),), seed=4, steps=STEPS, guidance=4.0, output="np"),
        ImageJob(PROMPT, mix=(("a", 0.5), ("c", 0.7)), seed=5, steps=STEPS, guidance=5.0, output="np"),
        ImageJob(PROMPT, seed=6, steps=STEPS, guidance=5.0, output="np"),  # base: "<s1>" is just characters
        ImageJob(PROMPT, mix="c", seed=7, steps=STEPS, guidance=1.0, output="np", n=2),  # no guidance rows
    ]
    engine = make_engine(adapter_dirs)
    batched = run_together(engine, jobs)
    # One batch: 5 jobs, 6 images, 2 rows per guided image + 2 unguided rows.
    assert list(engine.batches) == [(5, 6, 10)]
    for job, images in zip(jobs, batched):
        assert close(images, alone(engine, job)), job
        floats, pil = reference(adapter_dirs, job)
        assert close(images, floats), job
        mine = [engine.pipe.image_processor.numpy_to_pil(x[None])[0] for x in images]
        assert all(np.abs(pixels(u) - pixels(v)).max() <= 1 for u, v in zip(mine, pil)), job
    assert len(engine.batches) == 1 + len(jobs)  # each job alone was a batch of its own
    # The jobs really differ: other LoRA and token vectors, the base, the mix.
    firsts = [images[0] for images in batched]
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            assert np.abs(firsts[i] - firsts[j]).max() > DIFFERENT, (i, j)
    engine.stop()


def test_learned_tokens_stay_with_their_job(adapter_dirs):
    """a, b and b2 define the same tokens; b2 is b's LoRA with a's vectors; the base has no tokens. In one
    batch each job sees only its own vectors (and the base job sees plain characters)."""
    engine = make_engine(adapter_dirs, names=("a", "b", "b2"))
    jobs = [
        ImageJob(PROMPT, mix=name, seed=1, steps=STEPS, output="np") for name in ("a", "b", "b2", "__base__")
    ]
    batched = run_together(engine, jobs)
    assert list(engine.batches) == [(4, 4, 8)]
    for job, images in zip(jobs, batched):
        assert close(images, reference(adapter_dirs, job)[0]), job.mix
    # b and b2 differ only in their token vectors, so vectors shared across the batch would show.
    assert np.abs(batched[1][0] - batched[2][0]).max() > DIFFERENT
    engine.stop()


def test_seeds_and_n(adapter_dirs):
    engine = make_engine(adapter_dirs, names=("a",)).start()
    two = alone(engine, ImageJob(PROMPT, mix="a", seed=10, n=2, steps=STEPS, output="np"))
    for k in range(2):
        one = alone(engine, ImageJob(PROMPT, mix="a", seed=10 + k, steps=STEPS, output="np"))
        assert close([two[k]], one)
    assert np.abs(two[0] - two[1]).max() > DIFFERENT
    handle = engine.submit(ImageJob(PROMPT, mix="a", steps=STEPS))  # no seed: one is drawn and reported
    images = handle.result(60)
    assert isinstance(handle.seed, int) and images[0].size == (32, 32) and images[0].mode == "RGB"
    again = alone(engine, ImageJob(PROMPT, mix="a", seed=handle.seed, steps=STEPS))
    assert np.abs(pixels(images[0]) - pixels(again[0])).max() <= 1
    engine.stop()


def test_a_bad_job_fails_alone(adapter_dirs, monkeypatch):
    engine = make_engine(adapter_dirs, names=("a", "c"))
    good = ImageJob(PROMPT, mix="a", seed=2, steps=STEPS, output="np")
    expected = reference(adapter_dirs, good)[0]
    rejected = {
        "unknown adapter": ImageJob(PROMPT, mix="nope"),
        "multiple of 4": ImageJob(PROMPT, width=30),
        "steps must be": ImageJob(PROMPT, steps=0),
        "guidance must be": ImageJob(PROMPT, guidance=float("nan")),
        "(name, weight) pairs": ImageJob(PROMPT, mix=[("a", "heavy")]),
    }
    for message, job in rejected.items():
        handle = engine.submit(job)
        assert handle.done() and message in handle.error
        with pytest.raises(UserError):
            handle.result(0)

    # A failure inside a shared batch: the batch is re-run job by job and only the culprit fails.
    encode = engine._encode

    def failing(jobs, device):
        if any(h.job.prompt == "boom" for h in jobs):
            raise RuntimeError("the text encoder broke on boom")
        return encode(jobs, device)

    monkeypatch.setattr(engine, "_encode", failing)
    # c is unloaded after its job was accepted: that job fails when its batch forms.
    handles = [
        engine.submit(good),
        engine.submit(ImageJob("boom", mix="a", seed=3, steps=STEPS)),
        engine.submit(ImageJob(PROMPT, mix="c", seed=4, steps=STEPS)),
    ]
    engine.unload("c")
    engine.start()
    assert close(handles[0].result(60), expected)
    with pytest.raises(RuntimeError, match="boom"):
        handles[1].result(60)
    with pytest.raises(NotFound, match="unknown adapter 'c'"):
        handles[2].result(60)
    assert handles[0].error is None and "boom" in handles[1].error
    assert list(engine.batches) == [(2, 2, 4), (1, 1, 2), (1, 1, 2)]  # shared try, then one by one
    assert close(alone(engine, good), expected)  # and the engine goes on
    engine.stop()


def _snapshot(engine):
    pipe = engine.pipe
    state = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        state.update({f"{component}.{k}": v.clone() for k, v in model.state_dict().items()})
        state[f"{component} modules"] = [type(m).__name__ for m in model.modules()]
    return state, engine.names(), len(pipe.tokenizer)


def _same(a, b):
    (sa, na, ta), (sb, nb, tb) = a, b
    return (
        na == nb
        and ta == tb
        and sa.keys() == sb.keys()
        and all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)
    )


def test_load_failure_leaves_the_pipeline_unchanged(adapter_dirs, tmp_path):
    engine = make_engine(adapter_dirs, names=()).start()
    pristine = _snapshot(engine)
    engine.load("a", adapter_dirs["a"])
    job = ImageJob(PROMPT, mix="a", seed=8, steps=STEPS, output="np")
    before, state = alone(engine, job), _snapshot(engine)

    pipe = load_pipeline("tiny-sd")
    # One component fits, the other does not (either way round): the part put on must come off again.
    misfits = {}
    for broken in ("text_encoder", "unet"):
        misfits[broken] = random_lora(pipe, 4)
        module = next(m for m in misfits[broken].components[broken].values() if m.down.dim() == 2)
        module.down = torch.zeros(4, 7)
    # Another base's module names.
    foreign = random_lora(pipe, 5, text=())
    foreign.components["unet"] = {
        "down_blocks.7.attentions.0.proj_in": next(iter(foreign.components["unet"].values()))
    }
    # Fits the models but its learned token vectors do not fit the text encoder.
    tokens = random_lora(pipe, 6, tokens=("<t1>",))
    tokens.embeddings["text_encoder"] = torch.zeros(1, 3)
    cases = {
        "misfit1": (write_adapter(tmp_path / "m1", misfits["text_encoder"]), UserError, "does not fit"),
        "misfit2": (write_adapter(tmp_path / "m2", misfits["unet"]), UserError, "does not fit"),
        "foreign": (write_adapter(tmp_path / "foreign", foreign), UserError, "down_blocks.7"),
        "tokens": (write_adapter(tmp_path / "tokens", tokens), UserError, "token vectors"),
        "missing": (tmp_path / "missing", NotFound, "not found"),
        "a": (adapter_dirs["b"], UserError, "already loaded"),  # the name is taken
    }
    for name, (path, error, message) in cases.items():
        with pytest.raises(error, match=message):
            engine.load(name, path)
        assert _same(_snapshot(engine), state), name
    assert np.array_equal(alone(engine, job)[0], before[0])

    engine.unload("a")
    assert _same(_snapshot(engine), pristine)  # LoRA wrappers gone with the last adapter
    with pytest.raises(NotFound):
        engine.unload("a")
    engine.stop()


# diffusers' KDPM2 scheduler calls NumPy on tensors, which NumPy 2 warns about thousands of times.
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
def test_ancestral_and_unlisted_schedulers(adapter_dirs):
    """Euler a draws noise at every step: per-row generators keep batched jobs exact. PNDM keeps a history
    of past model outputs, per row. A scheduler not checked for batching runs one image per batch."""
    from diffusers import EulerAncestralDiscreteScheduler, KDPM2AncestralDiscreteScheduler, PNDMScheduler

    for scheduler, batches in (
        (EulerAncestralDiscreteScheduler.from_config, [(2, 3, 6)]),
        (partial(PNDMScheduler.from_config, skip_prk_steps=True), [(2, 3, 6)]),  # as SD configs have it
        (KDPM2AncestralDiscreteScheduler.from_config, [(1, 1, 2)] * 3),
    ):
        engine = make_engine(adapter_dirs, names=("a", "c"))
        engine.pipe.scheduler = scheduler(engine.pipe.scheduler.config)
        jobs = [
            ImageJob(PROMPT, mix="a", seed=11, steps=STEPS, output="np", n=2),
            ImageJob(PROMPT, mix="c", seed=12, steps=STEPS, output="np"),
        ]
        batched = run_together(engine, jobs)
        assert list(engine.batches) == batches
        for job, images in zip(jobs, batched):
            assert close(images, reference(adapter_dirs, job, scheduler)[0]), batches
        engine.stop()


def test_batch_limits(adapter_dirs):
    jobs = [ImageJob(PROMPT, mix=name, seed=20, steps=STEPS, output="np") for name in ("a", "b", "c", "")]
    jobs.append(ImageJob(PROMPT, mix="a", seed=21, steps=STEPS + 1, output="np"))  # other steps: own batch
    # max_batch 4 rows: two guided jobs per batch.
    engine = make_engine(adapter_dirs, max_batch=4)
    results = run_together(engine, jobs)
    assert list(engine.batches) == [(2, 2, 4), (2, 2, 4), (1, 1, 2)]
    engine.stop()
    # max_loras 2: a, b and the base; then c.
    engine = make_engine(adapter_dirs, max_loras=2)
    again = run_together(engine, jobs)
    assert list(engine.batches) == [(3, 3, 6), (1, 1, 2), (1, 1, 2)]
    for x, y in zip(results, again):
        assert close(x, y)
    engine.stop()


def test_await_stop_and_drain(adapter_dirs):
    engine = make_engine(adapter_dirs, names=("a",))
    job = ImageJob(PROMPT, mix="a", seed=30, steps=STEPS, output="np")
    handles = [engine.submit(job), engine.submit(ImageJob(PROMPT, seed=31, steps=STEPS))]
    assert engine.adapters_in_use() == {"a"}

    async def both():
        return await asyncio.gather(*handles)

    engine.start()
    awaited = asyncio.run(both())
    assert close(awaited[0], handles[0].result(0)) and len(awaited[1]) == 1
    assert engine.adapters_in_use() == set()

    queued = [engine.submit(ImageJob(PROMPT, seed=s, steps=STEPS)) for s in range(3)]
    engine.stop(drain=True)  # finishes what was submitted
    assert all(len(h.result(0)) == 1 for h in queued)
    late = engine.submit(job)
    with pytest.raises(EngineStopped):
        late.result(0)

    idle = make_engine(adapter_dirs, names=())
    waiting = idle.submit(ImageJob(PROMPT, steps=STEPS))
    cancelled = idle.submit(ImageJob(PROMPT, steps=STEPS))
    assert cancelled.cancel() and cancelled.error == "cancelled"
    idle.stop(drain=False)
    assert "stopped" in waiting.error


def test_sdxl_batch_equals_the_pipeline(tmp_path):
    """SDXL: two text encoders (learned tokens in both), pooled embeddings and time ids per row."""
    from image.tiny_pipelines import build_tiny_sdxl

    base = str(build_tiny_sdxl(tmp_path / "xl"))
    pipe = load_pipeline(base)
    dirs = {
        "x": write_adapter(tmp_path / "x", random_lora(pipe, 7, tokens=("<s1>", "<s2>"))),
        "y": write_adapter(tmp_path / "y", random_lora(pipe, 8, tokens=("<s1>", "<s2>")), "kohya"),
    }
    engine = ImageEngine(pipe, PipelineAdapters(pipe))
    for name, path in dirs.items():
        engine.load(name, path)
    jobs = [
        ImageJob(PROMPT, mix="x", seed=1, steps=STEPS, output="np"),
        ImageJob(PROMPT, mix=(("y", 0.7),), negative_prompt="dark", seed=2, steps=STEPS, output="np"),
        ImageJob(PROMPT, seed=3, steps=STEPS, output="np"),
    ]
    batched = run_together(engine, jobs)
    assert list(engine.batches) == [(3, 3, 6)]
    for job, images in zip(jobs, batched):
        mix = ((job.mix, 1.0),) if isinstance(job.mix, str) else job.mix
        ref = load_pipeline(base)
        apply_adapters(ref, [(str(dirs[n]), w) for n, w in mix])
        expected = ref(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt or None,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="np",
        ).images
        assert close(images, expected), job.mix
    assert np.abs(batched[0][0] - batched[2][0]).max() > DIFFERENT
    engine.stop()
