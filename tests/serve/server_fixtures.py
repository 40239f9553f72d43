"""Helpers for the server tests: adapters for the embedded tiny-llama, and a small HTTP client
(stdlib `http.client`, so requests go over real sockets exactly as written)."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

# -- adapters --------------------------------------------------------------------------------------


def text_adapters(directory: Path, specs: dict[str, dict], base: str = "tiny-llama") -> dict[str, Path]:
    """Saves one PEFT adapter per spec (name -> LoraConfig fields, plus ``perturb_copies``) for `base`,
    all from one load of the base. LoRA weights are random (B too), so each adapter changes the text."""
    from loraforge import LoraConfig, LoraModel
    from loraforge.formats.peft import save_adapter
    from loraforge.runtime import load_text_model

    model, _ = load_text_model(base)
    lora = LoraModel(model)
    out = {}
    for i, (name, fields) in enumerate(specs.items()):
        fields = dict(fields)
        perturb = fields.pop("perturb_copies", False)
        torch.manual_seed(100 + i)
        fields = {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8, **fields}
        config = LoraConfig(init_lora_weights=False, base_model_name_or_path=base, **fields)
        lora.add_adapter(name, config)
        with torch.no_grad():
            for _, layer in lora.adapter_layers(name):
                layer.lora_B[name].normal_(0, 0.5)
            if perturb:
                for _, copy in lora.adapter_copies(name):
                    for p in copy.parameters():
                        p.add_(torch.randn_like(p) * 0.5)
        save_adapter(lora, name, directory / name)
        out[name] = directory / name
    return out


# -- HTTP ------------------------------------------------------------------------------------------


def request(url: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None, timeout=60):
    """(status, decoded JSON or text) of one request on a fresh connection."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        text = response.read().decode()
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(text) if "json" in kind else text
    finally:
        conn.close()


def post(url: str, path: str, body=None, **kw):
    return request(url, "POST", path, body, **kw)


def get(url: str, path: str, **kw):
    return request(url, "GET", path, **kw)


def stream(url: str, path: str, body: dict, headers=None, timeout=60) -> list:
    """The events of a streamed response: decoded JSON objects, and "[DONE]"."""
    status, text = post(url, path, {**body, "stream": True}, headers=headers, timeout=timeout)
    assert status == 200, text
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
