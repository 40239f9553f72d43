"""`loraforge serve`: an OpenAI-compatible HTTP server for one base and many adapters.

    loraforge serve --base tiny-llama --adapters adapters/            # each sub-directory is an adapter
    loraforge serve --base tiny-sd --adapter style=runs/image/adapter --api-key secret --port 8080

Routes: GET /v1/models; POST /v1/completions, /v1/chat/completions (text bases; ``"stream": true``
for server-sent events); POST /v1/images/generations (image pipelines); POST /v1/load_lora_adapter,
/v1/unload_lora_adapter; GET / (the playground page) and GET /health. A request's ``model`` is the
base, an adapter or a mix ``"a:0.7+b:0.3"`` (see `loraforge.serve.mixes`); requests for different
adapters and mixes run in the same batch. Chat prompts use the tokenizer's chat template; a tokenizer
without one gets loraforge's plain format (``<|role|>\\ncontent\\n`` per message, then
``<|assistant|>\\n``), the one `loraforge train` uses for chat data without a template.

Beyond OpenAI's fields: ``adapters: [{"name", "weight"}]`` (text and images), ``ignore_eos`` (text:
always ``max_tokens`` tokens, as vLLM's), and for images ``negative_prompt``, ``seed``, ``steps``,
``guidance`` and ``<lora:name:weight>`` in the prompt. OpenAI options not implemented (logprobs,
penalties, tools, ...) are refused when set, never ignored. Errors are OpenAI's JSON: 400 naming the
field, 401 token, 404 unknown adapter (listing the known ones), 413 body too large, 503 busy or
shutting down. SIGINT / SIGTERM stop taking connections, finish the running requests, then exit.
"""

import argparse
import asyncio
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraforge import flags
from loraforge.errors import IncompatibleAdapter, NotFound, UserError
from loraforge.runtime import parse_adapter_spec
from loraforge.serve import mixes

log = logging.getLogger("loraforge.serve")
PLAYGROUND = Path(__file__).with_name("playground.html")


@dataclass
class ServeSettings:
    """Everything `create_app` needs. Limits refuse a request (400) instead of running it."""

    base: str = "tiny-llama"
    adapters_dir: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # name -> path or store CID
    api_key: str | None = None  # else $LORAFORGE_API_KEY; None: no token needed
    kind: str | None = None  # "text" or "image"; default: what the base is
    device: str | None = None  # default: cuda if available
    dtype: str = "float32"
    threads: int = 0  # CPU threads for PyTorch; 0: one for a tiny model on CPU, else its default
    max_loras: int = 8  # distinct adapters in one batch (and in one mix)
    max_loaded: int = 64  # adapters kept loaded (LRU)
    max_batch: int = 32  # rows in one batch
    max_tokens_limit: int = 1024
    max_n: int = 8
    max_image_size: int = 1024  # pixels per side
    max_steps: int = 150
    max_body_bytes: int = 1 << 20
    max_queue: int = 1024  # requests in flight; more get 503
    window_ms: float = 5.0  # images: requests arriving this close together share a batch

    def token(self) -> str | None:
        return self.api_key or os.environ.get("LORAFORGE_API_KEY") or None


def base_kind(base: str) -> str:
    """Whether the base is "text" or "image": what the base is (an embedded name, a directory, or a hub id)."""
    from loraforge.bases import EMBEDDED_BASES

    if base in EMBEDDED_BASES:
        return EMBEDDED_BASES[base][0]
    path = Path(base).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "image"
        if (path / "config.json").is_file():
            return "text"
        raise NotFound(
            f"base {base}: neither a diffusers pipeline (model_index.json) nor a transformers model"
        )
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(base, "model_index.json")
        return "image"
    except Exception:  # noqa: BLE001 - no pipeline index there: a text model (its loading names errors)
        return "text"


def require_server_packages() -> None:
    """UserError naming the extra to install when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"loraforge serve needs {e.name}: pip install 'loraforge[serve]'") from None


def build(settings: ServeSettings):
    """The routes' `Service`: loads the base, registers the adapters; starts nothing yet."""
    import torch

    from loraforge.serve.registry import AdapterRegistry, ImageHost, TextHost

    if settings.max_loaded < settings.max_loras:
        raise UserError(
            f"--max-loaded ({settings.max_loaded}) must be at least --max-loras ({settings.max_loras})"
        )
    kind = settings.kind or base_kind(settings.base)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "text":
        from loraforge.runtime import load_text, set_threads
        from loraforge.serve.text import TextEngine

        rt = load_text(settings.base, dtype=settings.dtype, device=device)
        set_threads(settings.threads, device, rt.model)
        engine = TextEngine(
            rt.model, rt.tokenizer, max_batch=settings.max_batch, max_loras=settings.max_loras
        )
        registry = AdapterRegistry(TextHost(engine, settings.base), settings.max_loaded)
    elif kind == "image":
        from loraforge.runtime import DTYPES, PipelineAdapters, load_pipeline
        from loraforge.serve.image import ImageEngine

        pipe = load_pipeline(
            settings.base, device=device, dtype=DTYPES[settings.dtype], threads=settings.threads
        )
        engine = ImageEngine(
            pipe, PipelineAdapters(pipe), settings.max_batch, settings.max_loras, settings.window_ms
        )
        registry = AdapterRegistry(ImageHost(engine, settings.base), settings.max_loaded)
    else:
        raise UserError(f"kind {kind!r}: choose text or image")
    for name, source in settings.adapters.items():
        registry.register(name, source)
    if settings.adapters_dir:
        for line in registry.register_dir(settings.adapters_dir):
            log.warning("skipped adapter %s", line)
    if kind == "text":
        from loraforge.serve.text_routes import TextRoutes

        return TextRoutes(settings, registry, engine, kind, rt.model, rt.tokenizer)
    from loraforge.serve.image_routes import ImageRoutes

    return ImageRoutes(settings, registry, engine, kind, pipe)


def create_app(settings: ServeSettings | None = None, service=None, **kwargs):
    """The FastAPI app: `create_app(base="tiny-llama", adapters={"a": "path"}, api_key="k")` (keywords
    are `ServeSettings` fields; `service`: a `Service` already built). The engine starts with the app
    and drains when it shuts down."""
    require_server_packages()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse

    from loraforge.serve.openai import APIError, Guard, LoadRequest, UnloadRequest, decode_json, parse

    settings = settings or ServeSettings(**kwargs)
    service = service or build(settings)

    @asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.engine.stop, True)
            service.loader.shutdown(wait=False)
            service.waiter.shutdown(wait=False)

    app = FastAPI(title="loraforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(Guard, api_key=settings.token(), max_body=settings.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(mixes.UnknownAdapter)
    async def unknown(request, e):
        return APIError(404, str(e), "model", "model_not_found").response()

    @app.exception_handler(UserError)
    async def user_error(request, e: UserError):
        return APIError(400, str(e), getattr(e, "param", None)).response()

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):
        log.exception("request failed")
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()

    async def body(request: Request, schema):
        return parse(schema, decode_json(await request.body()))

    @app.get("/health")
    async def health():
        return {"status": "ok", "kind": service.kind, "in_flight": service.in_flight}

    @app.get("/")
    async def playground():
        if not PLAYGROUND.is_file():
            raise APIError(404, "the playground page is not installed")
        return FileResponse(PLAYGROUND, media_type="text/html")

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        r = await body(request, LoadRequest)
        await service.run(service.loader, load_adapter, service.registry, r.lora_name, r.lora_path)
        return {"status": "ok", "lora_name": r.lora_name, "message": f"adapter {r.lora_name!r} loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        r = await body(request, UnloadRequest)
        service.registry.unregister(r.lora_name)
        return {"status": "ok", "lora_name": r.lora_name, "message": f"adapter {r.lora_name!r} unloaded"}

    service.add_routes(app, body)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST"])
    async def other(rest: str):
        raise APIError(404, f"no route /v1/{rest} on this {service.kind} server")

    return app


def load_adapter(registry, name: str, source: str) -> None:
    """Registers and loads at once (vLLM's route), so a bad adapter is a 400 now, not at first use."""
    try:
        registry.register(name, source)
    except NotFound as e:
        raise mixes.BadField(str(e), "lora_path") from None
    try:
        registry.ensure_loaded([name])
    except (UserError, IncompatibleAdapter) as e:
        registry.unregister(name)
        raise mixes.BadField(f"{name}: {e}", "lora_path") from None


# -- running it ------------------------------------------------------------------------------------


class ServerThread:
    """Runs an app with uvicorn in a background thread (tests, benchmarks): `with ServerThread(app) as url:`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeSettings()
    parser.add_argument(
        "--base", default=d.base, help="embedded name, transformers/diffusers directory or hub id"
    )
    parser.add_argument(
        "--adapters",
        dest="adapters_dir",
        help="a folder whose sub-directories are adapters (named after them)",
    )
    flags.add_adapter(
        parser,
        help="an adapter to serve: a directory, file or store CID, named NAME (default: its file or "
        "directory name); repeat for more. No weight: each request chooses its own",
        metavar="[NAME=]SOURCE",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=flags.non_negative_int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LORAFORGE_API_KEY)")
    parser.add_argument("--kind", choices=["text", "image"], help="what the base is (default: detected)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--threads",
        type=flags.non_negative_int,
        default=0,
        help="CPU threads for PyTorch (0: one for a tiny model on CPU, else its default)",
    )
    for name, help_text in [
        ("max_loras", "distinct adapters in one batch, and in one mix"),
        ("max_loaded", "adapters kept loaded (least recently used ones are unloaded)"),
        ("max_batch", "rows (sequences or images) in one batch"),
        ("max_tokens_limit", "largest max_tokens a request may ask for"),
        ("max_n", "largest n (choices or images) a request may ask for"),
        ("max_image_size", "largest image width or height, in pixels"),
        ("max_steps", "largest number of denoising steps"),
        ("max_body_bytes", "largest request body (413 above)"),
        ("max_queue", "requests in flight at once (503 above)"),
    ]:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=flags.positive_int, default=getattr(d, name), help=help_text)
    parser.add_argument(
        "--window-ms", type=flags.non_negative_float, default=d.window_ms, help="images: batching window"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args) -> ServeSettings:
    adapters = {}
    for spec in args.adapter:
        name, sep, source = spec.partition("=")
        if not sep:
            source = spec
            name = Path(spec.rstrip("/")).name.removesuffix(".safetensors")
        weighted = parse_adapter_spec(source)
        if weighted.source != source and weighted.weight != 1.0:
            raise UserError(
                f"--adapter {spec}: serve takes no weight (each request gives its own, as model "
                f'"{name}:{weighted.weight:g}" or adapters: [{{"name", "weight"}}])'
            )
        if name in adapters:
            raise UserError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = source
    names = {f.name for f in dataclasses.fields(ServeSettings)}
    values = {k: v for k, v in vars(args).items() if k in names and k != "adapters"}
    return ServeSettings(adapters=adapters, **values)


def run(args) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    app = create_app(settings)
    service = app.state.service
    print(
        f"loraforge serve: {service.kind} base {settings.base}, {len(service.registry.names())} adapters; "
        f"http://{args.host}:{args.port}" + (" (bearer token required)" if settings.token() else ""),
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None)
    return 0
