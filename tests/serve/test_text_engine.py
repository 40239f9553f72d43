"""TextEngine: continuous batching with a mix per row, against the same jobs alone, the unbatched model
and PEFT's `generate`; sampling, stops, cancellation, scheduling limits and failures."""

import asyncio
import threading

import pytest
import torch
from peft import PeftModel
from tiny_text import make_tokenizer
from transformers import AutoModelForCausalLM

from loraforge import LoraConfig, LoraModel, get_lora_model
from loraforge.bases import resolve_base
from loraforge.errors import UserError
from loraforge.runtime import load_text
from loraforge.serve.text import EngineClosed, TextEngine, TextJob, _BatchCache, _Detokenizer, _StopMatcher

BASE = resolve_base("tiny-llama")
PROMPTS = [
    "The cat sat on the mat. The dog",
    "Describe as JSON: Sam read under the round yard.\n",
    "hello",
    "Tom jumped over the red box. Lily walked to the blue house with Ben and",
    "Anna sang near the old tree",
    "Once upon a time",
]
ADAPTERS = {
    "attn": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "mlp": dict(r=8, lora_alpha=4, target_modules=["up_proj", "down_proj"]),
    "head": dict(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "emb": dict(r=4, lora_alpha=64, target_modules=["embed_tokens"]),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """tiny-llama with four saved adapters loaded: plain attention and MLP LoRA, a trained lm_head
    copy (modules_to_save) and an embedding LoRA."""
    root = tmp_path_factory.mktemp("text_engine")
    torch.manual_seed(0)
    for name, kwargs in ADAPTERS.items():
        model = get_lora_model(
            AutoModelForCausalLM.from_pretrained(BASE), LoraConfig(init_lora_weights=False, **kwargs)
        )
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "modules_to_save" in pname:
                    p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(root / name)
    rt = load_text("tiny-llama")
    for name in ADAPTERS:
        rt.model.load_adapter(root / name, name)
    return {"rt": rt, "root": root}


def ids(env, i):
    return env["rt"].tokenizer(PROMPTS[i])["input_ids"]


def engine(env, **kw):
    return TextEngine(env["rt"].model, env["rt"].tokenizer, **kw)


def run(eng, schedule, seen=None):
    """Submits schedule[k] (a list of jobs) before step k, steps until idle; the handles in order.
    `seen` (a list) gets the running rows' mixes after each step."""
    handles, k, more = [], 0, True
    while k < len(schedule) or more:
        if k < len(schedule):
            handles += [eng.submit(job) for job in schedule[k]]
            k += 1
        more = eng.step()
        if seen is not None:
            seen.append([row.mix for row in eng._rows])
    return handles


def alone(env, job):
    h = run(engine(env), [[job]])[0]
    assert h.finish_reason in ("stop", "length"), h.error
    return h.token_ids


def unbatched(env, prompt_ids, mix, n, eos):
    """Greedy `generate` of the model itself, with the mix activated the ordinary way (no batch rows)."""
    model = env["rt"].model
    x = torch.tensor([prompt_ids])
    kwargs = dict(max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos), pad_token_id=3)
    with torch.no_grad():
        if mix:
            model.set_adapters([m for m, _ in mix], [w for _, w in mix])
            out = model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
        else:
            with model.disable_adapter():
                out = model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
    return out[0, x.shape[1] :].tolist()


def test_greedy_in_busy_mixed_batch_equals_alone_unbatched_and_peft(env):
    eng = engine(env, max_batch=8)
    eos = eng.eos_token_ids

    def job(i, mix, n):
        return TextJob(ids(env, i), mix, max_tokens=n, temperature=0, stop_token_ids=eos)

    target = job(0, "attn", 14)
    others = [
        [job(1, "mlp", 6), job(2, (("attn", 0.6), ("mlp", 0.4)), 20)],  # before the target
        [target, job(3, "head", 3)],  # leaves early
        [job(4, (), 9)],  # the base
        [],
        [job(5, "emb", 12), job(3, (("head", 1.0), ("emb", -0.5)), 10)],  # joins late, longer prompt
    ]
    seen = []
    handles = run(eng, others, seen)
    jobs = [j for step in others for j in step]
    assert eng.stats() == {"running": 0, "waiting": 0, "width": 0}
    assert max(len(set(mixes)) for mixes in seen) >= 5  # a busy batch: rows of five kinds at once
    assert (("head", 1.0),) in seen[1] and (("emb", 1.0),) in seen[4] and len(seen[4]) >= 5
    for j, h in zip(jobs, handles):
        assert h.finish_reason in ("stop", "length"), h.error
        mix = [(j.mix, 1.0)] if isinstance(j.mix, str) else list(j.mix)
        expected = unbatched(env, j.prompt_ids, mix, j.max_tokens, eos)
        assert h.token_ids == expected, (j.mix, h.token_ids, expected)
        assert h.usage.completion_tokens == len(expected)
    for name, i in (("head", 3), ("emb", 5)):  # these adapters change the output (the check above can fail)
        assert unbatched(env, ids(env, i), [(name, 1.0)], 8, eos) != unbatched(env, ids(env, i), [], 8, eos)
    mine = handles[jobs.index(target)]
    assert len(mine.token_ids) > 5 and mine.token_ids == alone(env, target)
    # PEFT's generate with the same adapter file
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), env["root"] / "attn").eval()
    x = torch.tensor([target.prompt_ids])
    with torch.no_grad():
        out = peft.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=14, do_sample=False
        )
    assert mine.token_ids == out[0, x.shape[1] :].tolist()
    assert mine.text == env["rt"].tokenizer.decode(mine.token_ids, skip_special_tokens=True)


def test_gpt2_batched_equals_alone_and_generate():
    tokenizer = make_tokenizer()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ).eval()
    model = LoraModel(gpt2)
    model.add_adapter("a", LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["c_proj", "c_fc"], init_lora_weights=False))
    prompts = [tokenizer(p)["input_ids"] for p in ("The cat sat", "hello world, this is", "Tom")]
    mixes = ["a", (), (("a", 0.5), ("b", 1.5))]
    jobs = [
        TextJob(p, m, max_tokens=8 + 2 * i, temperature=0) for i, (p, m) in enumerate(zip(prompts, mixes))
    ]
    eng = TextEngine(model, tokenizer)
    handles = run(eng, [[jobs[0]], [jobs[1], jobs[2]]])
    for j, h in zip(jobs, handles):
        assert h.finish_reason == "length"
        alone_h = run(TextEngine(model, tokenizer), [[j]])[0]
        x = torch.tensor([j.prompt_ids])
        with torch.no_grad():
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=j.max_tokens,
                do_sample=False,
                adapter_names=[j.mix],
                eos_token_id=None,
                pad_token_id=0,
            )
        assert h.token_ids == alone_h.token_ids == out[0, x.shape[1] :].tolist()


def test_seeded_sampling_alone_equals_in_a_batch(env):
    job = TextJob(
        ids(env, 1), (("attn", 0.7), ("mlp", 0.3)), max_tokens=12, temperature=1.5, top_p=0.95, seed=7
    )
    by_itself = alone(env, job)
    others = [
        TextJob(ids(env, i), m, max_tokens=6 + i, temperature=1.2, seed=i) for i, m in ((0, "mlp"), (3, ()))
    ]
    handles = run(
        engine(env), [[others[0]], [job], [others[1], TextJob(ids(env, 2), "emb", 4, temperature=0)]]
    )
    assert handles[1].token_ids == by_itself
    other_seed = alone(env, TextJob(ids(env, 1), job.mix, max_tokens=12, temperature=1.5, top_p=0.95, seed=8))
    assert other_seed != by_itself  # the seed, not the batch, decides
    greedy = alone(env, TextJob(ids(env, 1), job.mix, max_tokens=12, temperature=0))
    assert by_itself != greedy


def test_stop_strings_stop_tokens_and_max_tokens(env):
    eng = engine(env)
    full = run(eng, [[TextJob(ids(env, 0), "attn", max_tokens=16, temperature=0)]])[0]
    assert full.finish_reason == "length" and full.usage.completion_tokens == 16 and len(full.token_ids) == 16
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    assert len(stop.strip()) >= 2
    h = run(eng, [[TextJob(ids(env, 0), "attn", max_tokens=16, temperature=0, stop=["zzz", stop])]])[0]
    assert h.finish_reason == "stop"
    assert h.text == text[: text.index(stop)]
    assert "".join(d.text for d in _deltas(eng, env, stop)) == text[: text.index(stop)]
    # a stop token ends the job: its id counts, its text is not added
    k = next(i for i, t in enumerate(full.token_ids) if i >= 3 and t not in full.token_ids[:i])
    s = run(eng, [[TextJob(ids(env, 0), "attn", 16, temperature=0, stop_token_ids={full.token_ids[k]})]])[0]
    assert s.finish_reason == "stop" and s.token_ids == full.token_ids[: k + 1]
    assert s.text == env["rt"].tokenizer.decode(full.token_ids[:k], skip_special_tokens=True)


def _deltas(eng, env, stop):
    h = eng.submit(TextJob(ids(env, 0), "attn", max_tokens=16, temperature=0, stop=[stop]))
    while eng.step():
        pass
    return list(h)


def test_stop_matcher_holds_back_possible_starts():
    m = _StopMatcher(["###", "END"])
    assert m.feed("abc#") == ("abc", False)  # "#" may start "###"
    assert m.feed("#") == ("", False)
    assert m.feed("x E") == ("##x ", False)  # not a stop after all: released
    assert m.feed("NDtail") == ("", True)  # "END" found: nothing after it
    assert _StopMatcher([]).feed("###") == ("###", False)


def test_detokenizer_releases_whole_characters():
    tokenizer = make_tokenizer()
    target = "héllo → wörld"
    tokens = tokenizer(target, add_special_tokens=False)["input_ids"]
    d = _Detokenizer(tokenizer, tokenizer("x")["input_ids"])
    pieces = [d.add(t) for t in tokens]
    assert "".join(pieces) + d.flush() == target
    assert all("\ufffd" not in p for p in pieces)


def test_cancel_frees_a_slot_for_a_waiting_job(env):
    eng = engine(env, max_batch=2)
    a, b, c, d = (eng.submit(TextJob(ids(env, i), "attn", max_tokens=30, temperature=0)) for i in range(4))
    eng.step()
    assert eng.stats()["running"] == 2 and eng.stats()["waiting"] == 2
    d.cancel()  # waiting behind a full batch: leaves the queue at the next step
    eng.step()
    assert d.finish_reason == "cancelled" and d.token_ids == [] and eng.stats()["waiting"] == 1
    a.cancel()
    eng.step()
    assert a.finish_reason == "cancelled" and eng.stats()["running"] == 2 and eng.stats()["waiting"] == 0
    assert len(c.token_ids) == 2  # admitted: prefill and one decoding step
    for _ in b:  # leaving an iteration early cancels the job too
        break
    eng.step()
    assert b.finish_reason == "cancelled" and eng.stats()["running"] == 1
    eng.stop(drain=False)
    assert c.finish_reason == "cancelled"
    with pytest.raises(EngineClosed):
        eng.submit(TextJob(ids(env, 0), (), 2))


def test_max_loras_respected_and_no_job_starves(env):
    eng = engine(env, max_batch=8, max_loras=1)
    jobs = [
        TextJob(ids(env, 0), "attn", 6, temperature=0),
        TextJob(ids(env, 1), "mlp", 3, temperature=0),  # must wait for "attn" to leave
        TextJob(ids(env, 2), "attn", 3, temperature=0),  # may not pass the blocked "mlp" job
        TextJob(ids(env, 3), (), 3, temperature=0),  # the base needs no slot: passes
    ]
    handles = [eng.submit(j) for j in jobs]
    admitted_at = {}
    for step in range(20):
        eng.step()
        running = eng._rows
        assert len({n for row in running for n in row.names}) <= 1
        for row in running:
            admitted_at.setdefault(id(row.handle), step)
        if not eng.stats()["running"] and not eng.stats()["waiting"]:
            break
    order = [admitted_at[id(h)] for h in handles]
    assert order[0] == order[3] == 0 and order[0] < order[1] < order[2]
    assert [h.finish_reason for h in handles] == ["length"] * 4
    with pytest.raises(UserError, match="at most 1"):
        eng.submit(TextJob(ids(env, 0), (("attn", 0.5), ("mlp", 0.5)), 2))


def test_bad_jobs_fail_alone(env):
    eng = engine(env)
    good = [TextJob(ids(env, i), m, 5, temperature=0) for i, m in ((0, "attn"), (1, ()), (3, "mlp"))]
    expected = [alone(env, j) for j in good]
    poison = (("mlp", 0.125),)
    armed = {"on": True}

    def hook(module, args, kwargs):
        if armed["on"] and poison in (kwargs.get("adapter_names") or []):
            raise RuntimeError("injected failure")

    handle = env["rt"].model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        # a missing adapter, and a forward that raises in the batched prefill
        jobs = [good[0], TextJob(ids(env, 2), "nope", 5), TextJob(ids(env, 4), poison, 5), good[1]]
        hs = run(eng, [jobs])
        assert hs[1].finish_reason == "error" and "nope" in hs[1].error and "attn" in hs[1].error
        assert hs[2].finish_reason == "error" and "injected" in hs[2].error
        assert [hs[0].token_ids, hs[3].token_ids] == [expected[0], expected[1]]
        # a forward that raises in the batched decoding step, after the rows are running
        armed["on"] = False
        hs = [eng.submit(j) for j in (good[0], TextJob(ids(env, 4), poison, 5), good[2])]
        eng.step()
        armed["on"] = True
        while eng.step():
            pass
        assert hs[1].finish_reason == "error" and len(hs[1].token_ids) == 2
        assert [hs[0].token_ids, hs[2].token_ids] == [expected[0], expected[2]]
    finally:
        handle.remove()
    # a token the tokenizer fails to decode fails that job only
    bad = next(t for t in expected[0] if t not in expected[2] + good[2].prompt_ids)
    tokenizer = env["rt"].tokenizer

    class Picky:
        pad_token_id = tokenizer.pad_token_id

        def decode(self, ids, **kw):
            if bad in ids:
                raise ValueError("cannot decode")
            return tokenizer.decode(ids, **kw)

    hs = run(TextEngine(env["rt"].model, Picky()), [[good[0], good[2]]])
    assert hs[0].finish_reason == "error" and "cannot decode" in hs[0].error
    assert hs[1].token_ids == expected[2] and hs[1].finish_reason == "length"
    with pytest.raises(UserError, match="token ids"):
        eng.submit(TextJob([1, 10**6], (), 2))
    with pytest.raises(UserError, match="takes 256"):
        eng.submit(TextJob([1] * 256, (), 2))
    with pytest.raises(UserError, match="temperature"):
        eng.submit(TextJob([1, 5], (), 2, temperature=-1))


def test_background_thread_sync_and_async_iteration_and_lock(env):
    job = TextJob(ids(env, 0), "attn", 10, temperature=0)
    expected = alone(env, job)
    eng = engine(env).start()
    try:
        streamed = [t for d in eng.submit(job) for t in d.token_ids]

        async def consume():
            h = eng.submit(job)
            return [t for d in [d async for d in h] for t in d.token_ids], h

        got, h = asyncio.run(consume())
        assert streamed == got == h.token_ids == expected and h.finish_reason == "length"
        # the lock is handed over between steps, and no step runs while it is held
        long = eng.submit(TextJob(ids(env, 1), "mlp", 200, temperature=0))
        assert eng.lock.acquire(timeout=5)
        try:
            before = len(long.token_ids)
            threading.Event().wait(0.2)
            assert len(long.token_ids) == before
            assert eng.adapters_in_use() == {"mlp"}
        finally:
            eng.lock.release()
        long.cancel()
        assert long.wait(5) and long.finish_reason == "cancelled"
    finally:
        eng.stop()
    assert eng._thread is not None and not eng._thread.is_alive()


def test_rows_leaving_trim_padding_columns(env):
    eng = engine(env)
    short, long = ids(env, 2), ids(env, 3)
    assert len(long) > len(short) + 5
    h = eng.submit(TextJob(short, "mlp", 5, temperature=0))
    eng.step()
    eng.submit(TextJob(long, "attn", 3, temperature=0))
    eng.step()
    assert eng.stats()["width"] == len(long) + 1  # the short row is left-padded to the long one
    eng.step()  # the long row leaves: its padding columns go with it
    assert eng.stats() == {"running": 1, "waiting": 0, "width": len(short) + 3}
    while eng.step():
        pass
    assert h.token_ids == alone(env, TextJob(short, "mlp", 5, temperature=0))


def test_batch_cache_keeps_each_rows_tokens_through_joins_leaves_and_growth():
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    cache, rows = _BatchCache(max_rows=7), []  # rows[i]: row i's keys (heads, tokens, dim); values = -keys
    ops = ["join"] * 3 + ["step", "join", "leave", "step", "step", "leave", "join", "step"] * 12
    for op in ops:
        if op == "join" and len(rows) < 7:
            lengths = torch.randint(
                1, 50, (int(torch.randint(1, 8 - len(rows), (), generator=g)),), generator=g
            )
            width = int(lengths.max())
            fresh = DynamicCache()
            k = torch.randn(
                len(lengths), 2, width, 3, generator=g
            )  # padding holds garbage, as after a prefill
            for layer in range(2):
                fresh.update(k, -k, layer)
            keep = sorted(torch.randperm(len(lengths), generator=g)[: max(1, len(lengths) - 1)].tolist())
            cache.append(fresh, keep, [int(lengths[i]) for i in keep])
            rows += [fresh.layers[0].keys[i, :, width - int(lengths[i]) :] for i in keep]
        elif op == "step" and rows:
            new = torch.randn(len(rows), 2, 1, 3, generator=g)
            for layer in cache.cache.layers:
                layer.update(new, -new)
            cache.grew()
            rows = [torch.cat([r, new[i]], 1) for i, r in enumerate(rows)]
        elif op == "leave" and rows:
            drop = torch.randperm(len(rows), generator=g)[
                : int(torch.randint(1, len(rows) + 1, (), generator=g))
            ]
            order = cache.remove(drop.tolist())
            rows = [rows[i] for i in order]
            cache.trim(max((r.shape[1] for r in rows), default=0))
        if rows:
            assert cache.width == max(r.shape[1] for r in rows)
            for layer in cache.cache.layers:
                assert layer.keys.shape == (len(rows), 2, cache.width, 3) and layer.keys.isfinite().all()
                for i, r in enumerate(rows):
                    assert torch.equal(layer.keys[i, :, cache.width - r.shape[1] :], r)
                    assert torch.equal(layer.values[i, :, cache.width - r.shape[1] :], -r)
        else:
            assert cache.cache is None and cache.width == 0


def test_many_threads_submitting_and_cancelling(env):
    """Jobs from several threads at once, a third of them cancelled at random points: every other
    job ends with exactly the tokens it gets alone, and the engine ends empty."""
    mixes = ["attn", (), "mlp", (("attn", 0.5), ("emb", 0.5)), "head"]
    combos = [(i % 4, mixes[i % 5], 3 + i % 4) for i in range(30)]
    expected = {c: alone(env, TextJob(ids(env, c[0]), c[1], c[2], temperature=0)) for c in set(combos)}
    eng = engine(env, max_batch=6, max_loras=3).start()
    results = []

    def client(part):
        for n, c in enumerate(part):
            h = eng.submit(TextJob(ids(env, c[0]), c[1], c[2], temperature=0))
            if n % 3 == 1:
                h.cancel()
            results.append((c, h))

    threads = [threading.Thread(target=client, args=(combos[k::3],)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c, h in results:
        assert h.wait(30), c
        if h.finish_reason == "cancelled":
            assert h.token_ids == expected[c][: len(h.token_ids)]
        else:
            assert h.finish_reason == "length" and h.token_ids == expected[c], c
    eng.stop()
    assert len(results) == 30 and eng.stats() == {"running": 0, "waiting": 0, "width": 0}
    assert sum(h.finish_reason == "cancelled" for _, h in results) >= 5
