"""`loraforge serve` under load, on loopback: many adapters in one batch against one adapter, the bare
base, and PEFT's route of swapping adapters per request.

    python benchmarks/bench_serve.py --quick                      # smoke run: tiny settings, ~1-2 min
    python benchmarks/bench_serve.py --clients 32 --duration 20 --rounds 3 --device cuda

Three tables:
1. N concurrent clients, each sending completions (greedy, ``ignore_eos``, ``--max-tokens`` tokens)
   one after another for ``--duration`` seconds per contender, contenders alternated in every round,
   medians over rounds: requests spread over 8 adapters; all on one adapter; the bare base; and
   "swap": PEFT's route, a `PeftModel` holding the same 8 adapters that runs one request at a time
   (`set_adapter`, then `generate`) behind a minimal HTTP server in this file, so the clients, the
   protocol and the load are the same. Throughput (req/s, tokens/s), p50/p99 latency and the ratios
   against the targets (8 mixed >= 0.8x one adapter, >= 0.9x base, >= 3x swap).
2. Throughput with 1, 8, 64 and 512 distinct adapters in rotation, with ``--many-clients`` clients
   (as many distinct adapters in flight as there are clients, up to the number in rotation).
3. Images: 4 requests with 4 different LoRAs sent at once (batched in one UNet batch) against the same
   4 sent one after another, on a tiny-sd server (goal: >= 2x).

Adapters are made here with random weights in PEFT's format (rank ``--rank`` on q/k/v/o of the
embedded tiny-llama; diffusers-format LoRA on the tiny-sd UNet attention): fine for throughput, the
values do not change the work. Both servers run as subprocesses; the clients are threads here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe as JSON: Tom ran in the park.\n"

# -- adapters --------------------------------------------------------------------------------------


def make_text_adapters(directory: Path, count: int, rank: int) -> list[str]:
    """`count` PEFT adapters for tiny-llama with random A and B (same shapes, different values)."""
    import torch
    from safetensors.torch import save_file

    from loraforge import LoraConfig, LoraModel
    from loraforge.formats.peft import adapter_state_dict
    from loraforge.runtime import load_text_model

    model, _ = load_text_model("tiny-llama")
    lora = LoraModel(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, base_model_name_or_path="tiny-llama"
    )
    lora.add_adapter("t", config)
    shapes = {k: v.shape for k, v in adapter_state_dict(lora, "t").items()}
    config_json = json.dumps({**lora.peft_config["t"].to_dict(), "inference_mode": True})
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        name = f"a{i:03d}"
        out = directory / name
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: torch.randn(s, generator=g) * (0.05 if "lora_B" in k else 1 / s[-1] ** 0.5)
            for k, s in shapes.items()
        }
        save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(config_json)
        names.append(name)
    return names


def make_image_adapters(directory: Path, count: int, rank: int = 4) -> list[str]:
    """`count` diffusers-format LoRAs (random) on the tiny-sd UNet's attention projections."""
    import torch
    from torch import nn

    from loraforge.formats import write_image_lora
    from loraforge.formats.image_lora import ImageLora, ModuleLora, canonical_name
    from loraforge.model import base_modules
    from loraforge.runtime import load_pipeline

    unet = load_pipeline("tiny-sd").unet
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        modules = {}
        for name, m in base_modules(unet):
            if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(m, nn.Linear):
                modules[canonical_name("unet", unet, name)] = ModuleLora(
                    down=torch.randn((rank, m.in_features), generator=g) / m.in_features**0.5,
                    up=torch.randn((m.out_features, rank), generator=g) * 0.3,
                    alpha=float(rank),
                )
        lora = ImageLora()
        lora.components["unet"] = modules
        write_image_lora(directory / f"s{i}", lora, "diffusers")
        names.append(f"s{i}")
    return names


# -- the PEFT route: swap adapters per request -----------------------------------------------------


def peft_server(args) -> None:
    """A minimal /v1/completions server over a PeftModel holding the adapters; one request at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.bases import resolve_base

    path = resolve_base("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)  # what loraforge serve uses for a tiny model: fastest here for both
    names = args.peft_adapters.split(",")
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    model = PeftModel.from_pretrained(model, str(Path(args.adapter_dir) / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(Path(args.adapter_dir) / name), adapter_name=name)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = torch.tensor([tokenizer(body["prompt"])["input_ids"]], device=device)
            n = body["max_tokens"]
            with lock, torch.no_grad():
                model.set_adapter(body["model"])
                out = model.generate(
                    input_ids=ids,
                    max_new_tokens=n,
                    min_new_tokens=n if body.get("ignore_eos") else 0,
                    do_sample=False,
                )
            new = out[0, ids.shape[1] :]
            reply = {
                "choices": [{"index": 0, "text": tokenizer.decode(new, skip_special_tokens=True)}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": int(new.numel())},
            }
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    ThreadingHTTPServer.request_queue_size = 1024  # every client connects at once; none is refused
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


# -- servers and clients ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free loopback port, up once /health (or /) answers."""

    def __init__(self, command: list[str], path: str = "/health"):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"server did not start: {self.proc.stderr.read()[-2000:]}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def serve_command(args, base: str, adapter_dir: Path, extra: list[str] = ()) -> list[str]:
    command = [sys.executable, "-m", "loraforge.cli", "serve", "--base", base, "--adapters", str(adapter_dir)]
    command += ["--log-level", "warning", *extra]
    return command + (["--device", args.device] if args.device else [])


def load(port: int, path: str, bodies, clients: int, duration: float) -> dict:
    """`clients` threads send bodies (a function of a random.Random) for `duration` seconds."""
    latencies, tokens, errors = [], [0], [0]
    stop_at = time.perf_counter() + duration
    guard = threading.Lock()

    def client(k: int):
        rng = random.Random(k)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while time.perf_counter() < stop_at:
            data = json.dumps(bodies(rng)).encode()
            start = time.perf_counter()
            try:
                conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                reply = json.loads(response.read())
                ok = response.status == 200
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                ok = False
            elapsed = time.perf_counter() - start
            with guard:
                if ok:
                    latencies.append(elapsed)
                    tokens[0] += reply.get("usage", {}).get("completion_tokens", 0)
                else:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()

    def pick(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {
        "req_s": len(latencies) / wall,
        "tok_s": tokens[0] / wall,
        "p50": pick(0.5),
        "p99": pick(0.99),
        "errors": errors[0],
    }


def completion(model_of, args):
    def body(rng):
        return {
            "model": model_of(rng),
            "prompt": PROMPT,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }

    return body


def median_row(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def table(rows: dict[str, dict], note: str) -> str:
    out = [
        note,
        "",
        "| contender | req/s | tokens/s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        out.append(
            f"| {name} | {r['req_s']:.2f} | {r['tok_s']:.0f} | {1000 * r['p50']:.0f} | {1000 * r['p99']:.0f} | {r['errors']:.0f} |"
        )
    return "\n".join(out)


# -- the three tables ------------------------------------------------------------------------------


def text_tables(args, work: Path) -> None:
    names = make_text_adapters(work / "text", max(args.adapter_counts), args.rank)
    eight = names[:8]
    lf = Server(
        serve_command(
            args,
            "tiny-llama",
            work / "text",
            [
                "--max-loras",
                str(max(args.adapter_counts)),
                "--max-loaded",
                str(max(args.adapter_counts) + 8),
                "--max-batch",
                str(max(args.clients, args.many_clients)),
                "--max-queue",
                str(4 * max(args.clients, args.many_clients) + 64),
            ],
        )
    )
    peft = Server(
        [
            sys.executable,
            __file__,
            "--peft-server",
            "--adapter-dir",
            str(work / "text"),
            "--peft-adapters",
            ",".join(eight),
        ]
        + (["--device", args.device] if args.device else []),
        path="/",
    )
    try:
        contenders = {
            "8 adapters, mixed in one batch": (lf.port, completion(lambda rng: rng.choice(eight), args)),
            "1 adapter": (lf.port, completion(lambda rng: eight[0], args)),
            "bare base": (lf.port, completion(lambda rng: "tiny-llama", args)),
            "swap per request (PEFT set_adapter)": (
                peft.port,
                completion(lambda rng: rng.choice(eight), args),
            ),
        }
        for port, body in contenders.values():  # warm-up: every adapter loaded, batches at full size
            load(port, "/v1/completions", body, args.clients, 1.0)
        runs: dict[str, list] = {name: [] for name in contenders}
        order = list(contenders)
        for r in range(args.rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                port, body = contenders[name]
                runs[name].append(load(port, "/v1/completions", body, args.clients, args.duration))
        rows = {name: median_row(v) for name, v in runs.items()}
        note = (
            f"Table 1: {args.clients} concurrent clients, {args.max_tokens} tokens per request (greedy, ignore_eos), "
            f"{args.duration:g} s per contender per round, median of {args.rounds} rounds; random rank-{args.rank} "
            "PEFT adapters on q/k/v/o of tiny-llama."
        )
        print(table(rows, note))
        mixed, single, base, swap = (rows[n]["tok_s"] for n in order)
        print(
            f"\nratios (tokens/s): 8 mixed / 1 adapter = {mixed / single:.2f}x (target >= 0.8), "
            f"8 mixed / base = {mixed / base:.2f}x (target >= 0.9), 8 mixed / swap = {mixed / swap:.2f}x (target >= 3)\n"
        )
        bodies = {
            f"{n} adapters": completion(lambda rng, pool=names[:n]: rng.choice(pool), args)
            for n in args.adapter_counts
        }
        for body in bodies.values():  # first loads of every adapter, batches at full size
            load(lf.port, "/v1/completions", body, args.many_clients, 1.0)
        many = {name: [] for name in bodies}
        for _ in range(args.rounds):
            for name, body in bodies.items():
                many[name].append(load(lf.port, "/v1/completions", body, args.many_clients, args.duration))
        many = {name: median_row(runs) for name, runs in many.items()}
        print(
            table(
                many,
                f"Table 2: {args.many_clients} concurrent clients, requests spread over N adapters (in flight: up to min(N, clients)).",
            )
        )
    finally:
        lf.stop()
        peft.stop()


def image_table(args, work: Path) -> None:
    names = make_image_adapters(work / "image", 4)
    server = Server(
        serve_command(args, "tiny-sd", work / "image", ["--window-ms", "50", "--max-batch", "16"])
    )
    try:

        def request(i: int):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
            body = {"prompt": "a red circle", "model": names[i], "seed": i, "steps": args.image_steps}
            conn.request(
                "POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            response.read()
            assert response.status == 200

        def together():
            threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        def one_by_one():
            for i in range(4):
                request(i)

        together(), one_by_one()  # warm-up
        times = {"4 LoRAs batched (sent at once)": [], "4 LoRAs one by one": []}
        for _ in range(args.rounds):
            for name, fn in zip(times, (together, one_by_one)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        print(
            f"\nTable 3: 4 image requests, 4 different random LoRAs, {args.image_steps} steps, tiny-sd native size, median of {args.rounds} rounds.\n"
        )
        print("| route | seconds for 4 images | images/s |\n| --- | --- | --- |")
        for name, values in times.items():
            t = statistics.median(values)
            print(f"| {name} | {t:.2f} | {4 / t:.2f} |")
        batched, single = (statistics.median(v) for v in times.values())
        print(f"\nbatched speed-up: {single / batched:.2f}x (goal >= 2)")
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--many-clients", type=int, default=512, help="clients for table 2")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapter-counts", default="1,8,64,512")
    parser.add_argument("--image-steps", type=int, default=20)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--peft-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    parser.add_argument("--peft-adapters", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peft_server:
        return peft_server(args)
    if args.quick:
        args.clients, args.many_clients, args.duration, args.rounds = 4, 16, 1.5, 1
        args.max_tokens, args.image_steps = 8, 4
    args.adapter_counts = [int(c) for c in args.adapter_counts.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        text_tables(args, Path(tmp))
        if not args.skip_images:
            image_table(args, Path(tmp))


if __name__ == "__main__":
    main()
