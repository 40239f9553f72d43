"""`loraforge serve`: one base (a text model or an image pipeline), any number of adapters, one
OpenAI-compatible HTTP server. Requests for different adapters, and weighted mixes of adapters, run
in the same forward pass (the engine's mixed batches), so serving many adapters costs about what
serving the bare base does.

    from loraforge.serve import create_app, serve
    app = create_app(base="tiny-llama", adapters={"style": "runs/text/adapter"})   # a FastAPI app
    serve(base="tiny-llama", adapters_dir="adapters/", port=8000)                    # blocks

The pieces: `mixes` (which adapters a request asks for), `registry` (names -> sources, an LRU of
loaded adapters), `text` and `image` (the batching engines), `openai` (schemas, errors, SSE),
`service` / `text_routes` / `image_routes` (the routes), `app` (the app and the command).
Nothing heavy is imported until it is used.
"""

from __future__ import annotations


def create_app(settings=None, **kwargs):
    """The FastAPI app (see `loraforge.serve.app.create_app`)."""
    from loraforge.serve.app import create_app as create

    return create(settings, **kwargs)


def serve(host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **settings) -> None:
    """Runs the server until interrupted (SIGINT / SIGTERM finish the running requests first).
    Keywords are `loraforge.serve.app.ServeSettings` fields."""
    import uvicorn

    uvicorn.run(create_app(**settings), host=host, port=port, log_level=log_level)
