"""`loraforge serve` over real HTTP on loopback: the OpenAI routes, adapters and mixes per request,
streaming, adapters loaded at run time, bad input, the token, limits, disconnects; the image route;
and the real `loraforge serve` command with a graceful shutdown."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from server_fixtures import free_port, get, post, request, stream, text_adapters

from loraforge.serve.app import ServerThread, create_app

KEY = "sekret-token"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("app_adapters")
    made = text_adapters(
        root / "all",
        {
            "a": {},
            "b": {"target_modules": ["up_proj", "down_proj"]},
            "head": {"modules_to_save": ["lm_head"], "perturb_copies": True},
            "late": {"target_modules": ["o_proj"]},
            "dora": {"use_dora": True},
        },
    )
    folder = root / "served"
    for name in ("a", "b", "head"):
        shutil.copytree(made[name], folder / name)
    return {"dir": folder, **made}


@pytest.fixture(scope="module")
def server(adapters):
    app = create_app(
        base="tiny-llama",
        adapters_dir=str(adapters["dir"]),
        api_key=KEY,
        max_tokens_limit=200,
        max_n=3,
        max_loras=3,
        max_loaded=4,
        max_body_bytes=20_000,
    )
    with ServerThread(app) as url:
        yield url, app.state.service


def call(url, path, body, **kw):
    return post(url, path, body, headers=AUTH, **kw)


def complete(url, model, prompt=PROMPT, **fields):
    status, body = call(
        url, "/v1/completions", {"model": model, "prompt": prompt, "temperature": 0, **fields}
    )
    assert status == 200, body
    return body


def alone(service, mix, prompt=PROMPT, max_tokens=16):
    """Greedy text of `prompt` under `mix` by transformers' generate, no batching, no server."""
    model, tok = service.engine.model, service.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with service.engine.lock:
        if mix:
            model.set_adapters([n for n, _ in mix], [w for _, w in mix])
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        else:
            with model.disable_adapter():
                out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        model.set_adapters([], [])
    new = out[0, ids.shape[1] :].tolist()
    eos = tok.eos_token_id
    return tok.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)


# -- text ------------------------------------------------------------------------------------------


def test_models_lists_the_base_and_adapters_with_parent(server):
    url, _ = server
    status, body = get(url, "/v1/models", headers=AUTH)
    assert status == 200
    ids = {m["id"]: m for m in body["data"]}
    assert set(ids) == {"tiny-llama", "a", "b", "head"}
    assert ids["tiny-llama"]["parent"] is None and ids["a"]["parent"] == "tiny-llama"


def test_greedy_completions_match_generation_alone(server):
    url, service = server
    texts = {}
    for model, mix in [
        ("tiny-llama", ()),
        ("a", (("a", 1.0),)),
        ("head", (("head", 1.0),)),
        ("a:0.7+b:0.3", (("a", 0.7), ("b", 0.3))),
    ]:
        body = complete(url, model, max_tokens=16)
        texts[model] = body["choices"][0]["text"]
        assert texts[model] == alone(service, mix), model
        assert body["model"] == model and body["usage"]["completion_tokens"] > 0
    assert len(set(texts.values())) == 4  # every adapter and the mix change the text
    same = complete(url, "tiny-llama", adapters=[{"name": "a", "weight": 0.7}, {"name": "b", "weight": 0.3}])
    assert same["choices"][0]["text"] == texts["a:0.7+b:0.3"]


def test_an_adapter_served_matches_peft(server, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.bases import resolve_base

    url, service = server
    tok = service.tokenizer
    model = AutoModelForCausalLM.from_pretrained(resolve_base("tiny-llama")).eval()
    peft = PeftModel.from_pretrained(model, str(adapters["head"]))  # LoRA on q/v + a trained lm_head
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = peft.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert complete(url, "head", max_tokens=12, ignore_eos=True)["choices"][0]["text"] == expected


def test_streaming_gives_the_same_text_and_openai_chunks(server):
    url, _ = server
    whole = complete(url, "a", max_tokens=20)["choices"][0]
    events = stream(
        url,
        "/v1/completions",
        {"model": "a", "prompt": PROMPT, "temperature": 0, "max_tokens": 20},
        headers=AUTH,
    )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks) and len(chunks) > 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_chat_uses_the_tokenizer_template_or_the_plain_fallback(server):
    url, service = server
    messages = [{"role": "user", "content": "Describe as JSON: Sam sat on the mat."}]
    tok = service.tokenizer
    templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    status, body = call(url, "/v1/chat/completions", {"model": "a", "messages": messages, "max_tokens": 8})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == len(tok(templated, add_special_tokens=False)["input_ids"])
    events = stream(
        url,
        "/v1/chat/completions",
        {
            "model": "a",
            "messages": messages,
            "max_tokens": 8,
            "temperature": 0,
            "stream_options": {"include_usage": True},
        },
        headers=AUTH,
    )
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["usage"]["completion_tokens"] > 0 and events[-2]["choices"] == []
    template = tok.chat_template
    tok.chat_template = None
    try:
        status, body = call(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 4})
    finally:
        tok.chat_template = template
    plain = "<|user|>\nDescribe as JSON: Sam sat on the mat.\n<|assistant|>\n"
    assert status == 200 and body["usage"]["prompt_tokens"] == len(tok(plain)["input_ids"])


def test_stop_seed_and_n(server):
    url, _ = server
    full = complete(url, "b", max_tokens=24)["choices"][0]["text"]
    assert len(full) > 10
    stopped = complete(url, "b", max_tokens=24, stop=["zzz", full[6:9]])["choices"][0]
    assert stopped["text"] == full[: full.index(full[6:9])] and stopped["finish_reason"] == "stop"
    sampled = dict(model="b", temperature=1.0, top_p=0.9, seed=7, n=3, max_tokens=12)
    one = complete(url, **sampled)["choices"]
    again = complete(url, **sampled)["choices"]
    assert [c["text"] for c in one] == [c["text"] for c in again]  # seeded: reproducible
    assert len({c["text"] for c in one}) > 1  # choice k samples with seed + k


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "n": 9}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["x"] * 20, "n": 2}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "x " * 300}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "model": "a:lots"}, 400, "model"),
        (
            "/v1/completions",
            {"prompt": "x", "adapters": [{"name": "a", "weight": "1"}]},
            400,
            "adapters[0].weight",
        ),
        ("/v1/completions", {"prompt": "x", "model": "a+b+head+late"}, 400, "model"),
        ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model"),
        ("/v1/completions", {"prompt": "x", "model": "a:0.5+nope"}, 404, "model"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
        ("/v1/images/generations", {"prompt": "x"}, 404, None),
        ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(server, path, body, status, param):
    url, _ = server
    got, answer = call(url, path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    if status == 404 and param == "model":
        assert "nope" in error["message"] and "a, b, head" in error["message"]


def test_malformed_json_too_large_and_tokens(server):
    url, _ = server
    status, body = post(url, "/v1/completions", raw=b'{"prompt": "x",', headers=AUTH)
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    status, body = call(url, "/v1/completions", {"prompt": "x" * 30_000})
    assert status == 413 and body["error"]["code"] == "request_too_large"
    chunks = (b"x" * 1000 for _ in range(30))  # no Content-Length: counted as it arrives
    status, body = request(url, "POST", "/v1/completions", raw=chunks, headers=AUTH)  # sent chunked
    assert status == 413
    status, body = post(url, "/v1/completions", {"prompt": "x"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = post(url, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert status == 401 and "wrong" in body["error"]["message"]
    assert get(url, "/health")[0] == 200  # no token needed outside /v1/


def test_adapters_loaded_and_unloaded_at_run_time(server, adapters, tmp_path):
    url, service = server
    status, body = call(
        url, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(adapters["late"])}
    )
    assert status == 200, body
    assert complete(url, "late")["choices"][0]["text"] == alone(service, (("late", 1.0),))
    status, body = call(url, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert status == 200
    assert call(url, "/v1/completions", {"model": "late", "prompt": "x"})[0] == 404
    assert call(url, "/v1/unload_lora_adapter", {"lora_name": "late"})[0] == 404
    status, body = call(
        url, "/v1/load_lora_adapter", {"lora_name": "tiny-llama", "lora_path": str(adapters["a"])}
    )
    assert status == 400 and "base model's name" in body["error"]["message"]
    status, body = call(url, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": str(adapters["dora"])})
    assert status == 400 and "DoRA" in body["error"]["message"]
    other = tmp_path / "other"
    shutil.copytree(adapters["a"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "tiny-sd"}))
    status, body = call(url, "/v1/load_lora_adapter", {"lora_name": "o", "lora_path": str(other)})
    assert status == 400 and "tiny-sd" in body["error"]["message"]
    status, body = call(
        url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "missing")}
    )
    assert status == 400 and body["error"]["param"] == "lora_path"
    assert {m["id"] for m in get(url, "/v1/models", headers=AUTH)[1]["data"]} == {
        "tiny-llama",
        "a",
        "b",
        "head",
    }


def test_a_store_cid_loads_on_first_use(server, adapters, tmp_path, monkeypatch):
    from loraforge.jobs.store import Store

    url, service = server
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "home"))
    cid = Store().add(adapters["late"])
    body = complete(url, cid)
    assert body["choices"][0]["text"] == alone(service, ((cid, 1.0),))
    assert cid in service.registry
    service.registry.unregister(cid)


def test_a_disconnected_client_frees_its_slot(server):
    url, service = server
    handles = []
    submit = service.engine.submit
    service.engine.submit = lambda job: handles.append(submit(job)) or handles[-1]
    try:
        for streamed in (True, False):
            handles.clear()
            body = json.dumps(
                {"model": "a", "prompt": PROMPT, "max_tokens": 200, "stream": streamed}
            ).encode()
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                if streamed:
                    assert s.recv(4096).startswith(b"HTTP/1.1 200")
                else:
                    deadline = time.time() + 10
                    while not handles and time.time() < deadline:
                        time.sleep(0.01)
            deadline = time.time() + 10
            while not (handles and handles[0].done()) and time.time() < deadline:
                time.sleep(0.02)
            assert handles[0].finish_reason == "cancelled", streamed
            assert handles[0].usage.completion_tokens < 200
            while service.in_flight and time.time() < deadline:
                time.sleep(0.02)
            assert service.in_flight == 0
    finally:
        service.engine.submit = submit


def test_more_requests_in_flight_than_max_queue_get_503(server):
    url, service = server
    limit = service.settings.max_queue
    service.settings.max_queue = 1
    try:
        body = json.dumps(
            {"model": "a", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
        ).encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:  # one long stream holds the only place
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            status, reply = call(url, "/v1/completions", {"model": "a", "prompt": PROMPT, "max_tokens": 2})
            assert status == 503 and reply["error"]["code"] == "busy", reply
        deadline = time.time() + 10
        while service.in_flight and time.time() < deadline:  # the hung-up stream leaves
            time.sleep(0.02)
        status, _ = call(url, "/v1/completions", {"model": "a", "prompt": PROMPT, "max_tokens": 2})
        assert status == 200
    finally:
        service.settings.max_queue = limit


# -- images ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    from image_adapters import random_lora, write_adapter

    root = tmp_path_factory.mktemp("image_adapters")
    app = create_app(base="tiny-sd", max_image_size=64, max_n=2, max_steps=10, window_ms=50)
    with ServerThread(app) as url:
        for i, name in enumerate(["s1", "s2", "s3", "s4"]):
            write_adapter(root / name, random_lora(app.state.service.engine.pipe, seed=i))
            status, body = post(
                url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(root / name)}
            )
            assert status == 200, body
        yield url, app.state.service


def png(item):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_images_with_loras_batched_equal_alone(image_server):
    url, service = image_server
    requests = [
        {"prompt": f"a red circle <lora:s{i + 1}:0.8>", "seed": 3, "steps": 4, "size": "32x32"}
        for i in range(4)
    ]
    requests[1].update(model="s1", adapters=[{"name": "s2", "weight": 0.5}])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(lambda r: post(url, "/v1/images/generations", r), requests))
    assert any(jobs > 1 for jobs, *_ in service.engine.batches)  # several requests shared a UNet batch
    first = png(batched[0][1]["data"][0])
    assert first.size == (32, 32)
    info = json.loads(first.text["loraforge"])
    assert (
        info["prompt"] == "a red circle"
        and info["seed"] == 3
        and info["adapters"] == [{"path": "s1", "weight": 0.8}]
    )
    mixed = json.loads(png(batched[1][1]["data"][0]).text["loraforge"])["adapters"]
    assert mixed == [{"path": "s1", "weight": 1.0}, {"path": "s2", "weight": 1.3}]
    pixels = []
    for r, (status, body) in zip(requests, batched):
        assert status == 200, body
        status, solo = post(url, "/v1/images/generations", r)
        a, b = (torch.tensor(np.asarray(png(x["data"][0])), dtype=torch.float) for x in (body, solo))
        assert (a - b).abs().max() <= 2  # batched == alone (within float rounding of 8-bit pixels)
        pixels.append(a)
    assert all((pixels[0] - p).abs().max() > 10 for p in pixels[1:])  # each LoRA changes the image


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "x", "size": "30x32"}, 400, "size"),
        ({"prompt": "x", "size": "128x128"}, 400, "size"),
        ({"prompt": "x", "size": "big"}, 400, "size"),
        ({"prompt": "x", "n": 3}, 400, "n"),
        ({"prompt": "x", "steps": 11}, 400, "steps"),
        ({"prompt": "x", "response_format": "url"}, 400, "response_format"),
        ({"prompt": "x <lora:nope:1>"}, 404, "model"),
        ({"prompt": "x <lora:s1:heavy>"}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
    ],
)
def test_bad_image_requests(image_server, body, status, param):
    url, _ = image_server
    got, answer = post(url, "/v1/images/generations", {"steps": 2, **body})
    assert got == status and answer["error"]["param"] == param, answer


# -- the command -----------------------------------------------------------------------------------


def test_loraforge_serve_command_and_graceful_shutdown(adapters):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    command = [
        sys.executable,
        "-m",
        "loraforge.cli",
        "serve",
        "--base",
        "tiny-llama",
        "--adapter",
        f"a={adapters['a']}",
        "--port",
        str(port),
        "--max_tokens_limit",
        "200",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if get(url, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.2)
        status, body = post(
            url, "/v1/completions", {"model": "a", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 5
        # A streamed request is running when SIGTERM arrives (its first event came): it still ends
        # with all its tokens.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {"model": "a", "prompt": "The", "max_tokens": 64, "ignore_eos": True, "stream": True}
        body["stream_options"] = {"include_usage": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        first = response.readline()
        assert first.startswith(b"data: {")
        proc.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        events = [json.loads(first[6:])] + [
            b[6:] if b[6:] == "[DONE]" else json.loads(b[6:]) for b in rest.split("\n\n") if b.strip()
        ]
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 64
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once the running requests are done: exit status -SIGTERM.
        assert proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(OSError):
            get(url, "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_line_settings(monkeypatch, tmp_path):
    import argparse

    from loraforge.cli import dash_spellings
    from loraforge.errors import UserError
    from loraforge.serve.app import ServeSettings, add_arguments, settings_from_args

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_arguments(parser)
    argv = [
        "--adapter",
        "style=runs/x",
        "--adapter",
        f"{tmp_path}/tone/",
        "--max_loras",
        "4",
        "--adapters",
        "dir",
    ]
    args = parser.parse_args(dash_spellings(parser, argv))
    settings = settings_from_args(args)
    assert settings.adapters == {"style": "runs/x", "tone": f"{tmp_path}/tone/"}
    assert settings.max_loras == 4 and settings.adapters_dir == "dir"
    assert args.host == "127.0.0.1"  # this machine only, unless told otherwise
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-n", "0"])
    monkeypatch.setenv("LORAFORGE_API_KEY", "from-env")
    assert ServeSettings().token() == "from-env" and ServeSettings(api_key="flag").token() == "flag"
    monkeypatch.delenv("LORAFORGE_API_KEY")
    assert ServeSettings().token() is None
    weighted = parser.parse_args(["--adapter", "style=runs/x:0.5"])
    with pytest.raises(UserError, match="serve takes no weight"):
        settings_from_args(weighted)
