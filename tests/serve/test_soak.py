"""Soak: a few hundred concurrent requests over several adapters and mixes, streamed and not, chat and
completions, with bad ones mixed in (unknown adapters, wrong types, malformed JSON, bodies too large,
missing tokens, over-limit values, an adapter that fails to load, clients that hang up mid-stream).

Every good request must get exactly the text the same request got alone on an idle server (greedy),
every bad one its status, and the server must end with nothing in flight and memory flat.

Memory bound: the process RSS may grow by at most 48 MiB between the end of the warm-up (which has
touched every adapter, route and code path once) and the end of the soak. Leaking what one request
holds would exceed it: a request's KV cache on tiny-llama is ~8 KiB per token (4 layers x K and V x
256 floats), ~250 KiB for a 30-token sequence, so leaking it for 320 requests is ~80 MiB; what is left
under the bound is allocator and thread-stack noise (the Python and glibc allocators keep freed pages).
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from server_fixtures import post, request, stream, text_adapters

from loraforge.serve.app import ServerThread, create_app

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [
    "Describe as JSON: Tom ran in the park.\n",
    "The cat sat on the",
    "hello world, this is",
    "Lily walked to the blue house",
]
MODELS = ["tiny-llama", "a", "b", "c", "head", "a:0.5+b:0.5", "c:0.3+head", "b:-0.5+a"]
RSS_BOUND = 48 * 2**20


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    made = text_adapters(
        root / "made",
        {
            "a": {},
            "b": {"target_modules": ["up_proj", "down_proj"]},
            "c": {"target_modules": ["embed_tokens", "k_proj"]},
            "head": {"modules_to_save": ["lm_head"], "perturb_copies": True},
            "wide": {"r": 8},
        },
    )
    served = root / "served"
    for name in ("a", "b", "c", "head"):
        shutil.copytree(made[name], served / name)
    # "broken": a valid config whose weights have another rank: registered, fails when first loaded.
    shutil.copytree(made["a"], served / "broken")
    shutil.copy(made["wide"] / "adapter_model.safetensors", served / "broken")
    app = create_app(
        base="tiny-llama",
        adapters_dir=str(served),
        api_key=KEY,
        max_tokens_limit=32,
        max_batch=32,
        max_loras=4,
        max_loaded=6,
        max_body_bytes=8_000,
    )
    with ServerThread(app) as url:
        yield url, app.state.service


def good_request(rng: random.Random) -> tuple[str, dict]:
    model, prompt = rng.choice(MODELS), rng.choice(PROMPTS)
    body = {"model": model, "temperature": 0, "max_tokens": rng.choice([4, 8])}
    if rng.random() < 0.3:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


# (status, path, body or raw bytes, with the token)
BAD = [
    (404, "/v1/completions", {"model": "nope", "prompt": "x"}, True),
    (404, "/v1/completions", {"model": "a:0.5+nope", "prompt": "x"}, True),
    (400, "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": "8"}, True),
    (400, "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 999}, True),
    (400, "/v1/completions", {"model": "a:heavy", "prompt": "x"}, True),
    (400, "/v1/completions", {"model": "broken", "prompt": "x"}, True),
    (400, "/v1/chat/completions", {"model": "a", "messages": "hi"}, True),
    (400, "/v1/completions", b'{"model": "a", "prompt": ', True),
    (413, "/v1/completions", {"model": "a", "prompt": "x" * 10_000}, True),
    (401, "/v1/completions", {"model": "a", "prompt": "x"}, False),
]


def send_bad(url: str, i: int):
    """(expected status, status got) of bad request i."""
    status, path, body, token = BAD[i]
    raw = body if isinstance(body, bytes) else None
    got = post(url, path, None if raw else body, raw=raw, headers=AUTH if token else {})[0]
    return status, got


def send(url: str, path: str, body, streamed=False):
    """(status, text of the first choice) of a good request."""
    if streamed:
        events = stream(url, path, body, headers=AUTH)
        chunks = [e for e in events[:-1] if e["choices"]]
        key = "delta" if path.endswith("chat/completions") else None
        text = "".join(
            (c["choices"][0]["delta"].get("content", "") if key else c["choices"][0]["text"]) for c in chunks
        )
        return 200, text
    status, answer = post(url, path, body, headers=AUTH)
    if status != 200:
        return status, answer
    choice = answer["choices"][0]
    return status, choice["message"]["content"] if "message" in choice else choice["text"]


def hang_up(url: str) -> None:
    """Starts a long stream, reads its first bytes and closes the socket."""
    body = json.dumps({"model": "a:0.5+b:0.5", "prompt": "The", "max_tokens": 32, "stream": True}).encode()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        s.recv(1024)


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_soak(soak_server):
    url, service = soak_server
    rng = random.Random(0)
    start = time.perf_counter()
    goods = [good_request(rng) for _ in range(260)]
    # Alone: every distinct good request once, one at a time, on the idle server (also the warm-up).
    expected = {}
    for path, body in goods:
        key = json.dumps([path, body], sort_keys=True)
        if key not in expected:
            status, text = send(url, path, body)
            assert status == 200, text
            expected[key] = text
    for i in range(len(BAD)):  # warm the error paths too
        expected_status, got = send_bad(url, i)
        assert got == expected_status, BAD[i]
    before = rss()
    warm = time.perf_counter() - start

    jobs = [("good", path, body, rng.random() < 0.3) for path, body in goods]
    jobs += [("bad", i, None, False) for i in range(len(BAD))] * 4
    jobs += [("hangup", None, None, False)] * 12
    rng.shuffle(jobs)

    def run(job):
        kind, a, body, streamed = job
        if kind == "hangup":
            hang_up(url)
            return True
        if kind == "bad":
            expected_status, got = send_bad(url, a)
            return got == expected_status or (BAD[a], got)
        got = send(url, a, body, streamed=streamed)
        key = json.dumps([a, body], sort_keys=True)
        return got == (200, expected[key]) or (a, body, streamed, got, expected[key])

    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(run, jobs))
    failures = [r for r in results if r is not True]
    assert failures == [], failures[:5]

    deadline = time.time() + 10
    while (service.in_flight or service.engine.stats()["running"]) and time.time() < deadline:
        time.sleep(0.05)
    assert service.in_flight == 0 and service.engine.stats() == {
        **service.engine.stats(),
        "running": 0,
        "waiting": 0,
    }
    status, _ = request(url, "GET", "/health")
    assert status == 200
    after = rss()
    print(
        f"\nsoak: {len(jobs)} requests ({len(goods)} good, {len(BAD) * 4} bad, 12 hang-ups) in "
        f"{time.perf_counter() - start - warm:.1f} s after a {warm:.1f} s warm-up; RSS {before / 2**20:.0f} MiB "
        f"-> {after / 2**20:.0f} MiB (growth {(after - before) / 2**20:+.1f} MiB, bound {RSS_BOUND / 2**20:.0f})"
    )
    assert after - before < RSS_BOUND
