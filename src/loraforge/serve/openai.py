"""The OpenAI side of the HTTP API: request schemas, the error shape, the guard (token and body size)
and server-sent events that stop their jobs when the client goes away.

Errors are OpenAI's JSON: ``{"error": {"message", "type", "param", "code"}}``. Request bodies are
parsed strictly (``"max_tokens": "5"`` is a 400 naming ``max_tokens``, not a silent conversion);
unknown fields are ignored, except OpenAI options this server does not implement, which are refused
when set to anything but their neutral value (never silently ignored).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

log = logging.getLogger("loraforge.serve")


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape."""

    TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "server_error" if self.status >= 500 else self.TYPES.get(self.status, "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# -- requests --------------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class Sampling(Strict):
    model: str | None = None
    adapters: list | None = None  # checked by mixes.parse_adapters (messages name the item)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: object = None  # str | list[str]: checked by `stop_strings`
    seed: int | None = None
    stream_options: dict | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever comes (benchmarks)


class CompletionRequest(Sampling):
    prompt: object  # str | list[str]: checked by `prompts`


class ChatMessage(Strict):
    role: str
    content: object = None  # str | [{"type": "text", "text": ...}]


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class ImageRequest(Strict):
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    model: str | None = None
    adapters: list | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    seed: int | None = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0, le=50)
    response_format: str = "b64_json"


class LoadRequest(Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadRequest(Strict):
    lora_name: str = Field(min_length=1)


# OpenAI options this server does not implement, with the values that mean "off".
UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
}


def parse(schema: type[Strict], data) -> Strict:
    """Validates a decoded JSON body; APIError 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = schema.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        param = field_path(error["loc"])
        raise APIError(400, f"{param}: {error['msg']}", param) from None
    for name, neutral in UNSUPPORTED.items():
        if name in data and not any(data[name] == v and type(data[name]) is type(v) for v in neutral):
            raise APIError(400, f"{name} is not supported by this server", name)
    return request


def field_path(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def decode_json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}") from None


def prompts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return value
    raise APIError(400, "prompt must be a string or a non-empty list of strings", "prompt")


def stop_strings(value) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values) or len(values) > 4:
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    return values


def message_text(message: ChatMessage, i: int) -> str:
    """A message's content as text: a string, or a list of text parts."""
    content = message.content
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        if all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise APIError(
        400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content"
    )


# -- the guard: bearer token and body size ---------------------------------------------------------


class Guard:
    """ASGI middleware: a bearer token on every /v1/ route (when a key is set; constant-time compare),
    and request bodies of at most `max_body` bytes (413), whether announced by Content-Length or sent
    in chunks."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"].startswith("/v1/"):
            token = headers.get(b"authorization", b"")
            scheme, _, given = token.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                message = "missing bearer token" if not token else "wrong bearer token"
                return await APIError(
                    401, f"{message}: send 'Authorization: Bearer <key>'", code="invalid_api_key"
                ).response()(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self.too_large().response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise self.too_large()
            return message

        await self.app(scope, counted, send)

    def too_large(self) -> APIError:
        return APIError(
            413, f"request body over the limit of {self.max_body} bytes", code="request_too_large"
        )


# -- server-sent events ----------------------------------------------------------------------------


class EventStream(Response):
    """``text/event-stream`` of ``data: {json}`` events and a final ``data: [DONE]``. When the client
    disconnects the event source is cancelled; `on_close` runs in every case (cancel jobs, unpin)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[dict], on_close: Callable[[], None]):
        self.status_code, self.background = 200, None
        self.raw_headers = [  # no Content-Length: the body is sent in pieces until the last event
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def pump():
            async for event in self.events:
                await send({"type": "http.response.body", "body": sse(event), "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(watch())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.events.aclose()
            self.on_close()
        if tasks[0].done() and not tasks[0].cancelled() and tasks[0].exception():
            log.error("stream failed", exc_info=tasks[0].exception())


def sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


async def until_disconnect(receive) -> None:
    """Returns when the client has gone away (for requests answered in one piece)."""
    while (await receive())["type"] != "http.disconnect":
        pass
