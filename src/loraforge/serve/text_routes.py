"""The text routes: POST /v1/completions and /v1/chat/completions, streamed (SSE) or in one piece.

Each prompt and choice is one `TextJob` on the engine, which batches it with every other running job
whatever its adapter or mix. ``temperature`` 0 is greedy; choice k of a seeded request samples with
``seed + k``, so a seeded (or greedy) request gives the same text alone or in a busy batch. A client
that goes away cancels its jobs; their batch slots free at the next decoding step.
"""

import asyncio
import time

from loraforge.serve.openai import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EventStream,
    message_text,
    prompts,
    stop_strings,
    until_disconnect,
)
from loraforge.serve.service import Service, new_id

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default for /v1/completions


class TextRoutes(Service):
    def __init__(self, settings, registry, engine, kind, model, tokenizer):
        super().__init__(settings, registry, engine, kind)
        self.tokenizer = tokenizer
        config = getattr(model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.stop_ids = {i for i in [*eos, tokenizer.eos_token_id] if i is not None}

    def add_routes(self, app, body) -> None:
        from fastapi import Request

        @app.post("/v1/completions")
        async def completions(request: Request):
            r = await body(request, CompletionRequest)
            return await self.complete(request, r, [self.encode(p) for p in prompts(r.prompt)], chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            r = await body(request, ChatRequest)
            return await self.complete(request, r, [self.encode_chat(r.messages)], chat=True)

    # -- prompts -----------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise APIError(400, "prompt is empty", "prompt")
        return ids

    def encode_chat(self, messages) -> list[int]:
        turns = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(messages)]
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 - templates raise anything for a conversation they reject
                raise APIError(400, f"the chat template rejected these messages: {e}", "messages") from None
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        from loraforge.data.text import _plain_chat_turn

        text = "".join(_plain_chat_turn(t["role"], t["content"]) for t in turns) + "<|assistant|>\n"
        return self.tokenizer(text)["input_ids"]

    def max_tokens(self, r, longest_prompt: int, chat: bool) -> int:
        limit = self.settings.max_tokens_limit
        room = None if self.context is None else self.context - longest_prompt
        where = "messages" if chat else "prompt"
        if room is not None and room < 1:
            raise APIError(
                400, f"the prompt has {longest_prompt} tokens; the model's context is {self.context}", where
            )
        asked = r.max_tokens or r.max_completion_tokens
        param = "max_tokens" if r.max_tokens else "max_completion_tokens"
        if asked is None:
            default = COMPLETION_DEFAULT_TOKENS if not chat else limit
            return min(default, limit, room or default)
        if asked > limit:
            raise APIError(400, f"{param} is {asked}; this server allows at most {limit}", param)
        if room is not None and asked > room:
            raise APIError(
                400,
                f"{param} is {asked} but the prompt ({longest_prompt} tokens) leaves {room} of the "
                f"model's {self.context}-token context",
                param,
            )
        return asked

    # -- running -----------------------------------------------------------------------------------

    async def complete(self, request, r, prompt_ids: list[list[int]], chat: bool):
        from loraforge.serve.text import TextJob

        if r.n > self.settings.max_n:
            raise APIError(400, f"n is {r.n}; this server allows at most {self.settings.max_n}", "n")
        max_tokens = self.max_tokens(r, max(len(p) for p in prompt_ids), chat)
        stop = stop_strings(r.stop)
        temperature = 1.0 if r.temperature is None else r.temperature
        top_p = 1.0 if r.top_p is None else r.top_p
        self.admit()
        handles, lease = [], None
        closed = False

        def close():
            nonlocal closed
            if not closed:
                closed = True
                for h in handles:
                    h.cancel()
                if lease is not None:
                    lease.release()
                self.done()

        try:
            mix, lease = await self.lease(r.model, r.adapters)
            for ids in prompt_ids:
                for k in range(r.n):
                    seed = None if r.seed is None else r.seed + k
                    stop_ids = set() if r.ignore_eos else set(self.stop_ids)
                    job = TextJob(ids, mix, max_tokens, temperature, top_p, seed, stop, stop_ids)
                    handles.append(self.engine.submit(job))
        except BaseException:
            close()
            raise
        reply = Reply(r.model or self.base, chat)
        if r.stream:
            usage = bool((r.stream_options or {}).get("include_usage"))
            return EventStream(reply.events(handles, usage), close)
        try:
            texts = await collect(request, handles)
        finally:
            close()
        return reply.whole(handles, texts)


async def collect(request, handles) -> list[str]:
    """The texts of all handles; cancels them (APIError 499) if the client disconnects first."""

    async def text(handle):
        return "".join([delta.text async for delta in handle])

    results = asyncio.ensure_future(asyncio.gather(*(text(h) for h in handles)))
    gone = asyncio.ensure_future(until_disconnect(request.receive))
    await asyncio.wait([results, gone], return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not results.done():
        results.cancel()
        raise APIError(499, "client disconnected")
    return results.result()


class Reply:
    """OpenAI's response objects for completions and chat completions."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, handles, texts: list[str]) -> dict:
        failed = next((h for h in handles if h.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}")
        choices = []
        for i, (h, text) in enumerate(zip(handles, texts)):
            content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": i, **content, "logprobs": None, "finish_reason": h.finish_reason})
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self.head(obj), "choices": choices, "usage": usage(handles)}

    def chunk(self, i: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = (
                {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            )
            choice = {"index": i, "delta": delta}
        else:
            choice = {"index": i, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish)
        return {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    async def events(self, handles, include_usage: bool):
        queue: asyncio.Queue = asyncio.Queue()

        async def feed(i, handle):
            try:
                async for delta in handle:
                    await queue.put((i, delta.text))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(feed(i, h)) for i, h in enumerate(handles)]
        try:
            if self.chat:
                for i in range(len(handles)):
                    yield self.chunk(i, None, role=True)
            remaining = len(handles)
            while remaining:
                i, text = await queue.get()
                if text is not None:
                    if text:
                        yield self.chunk(i, text)
                    continue
                remaining -= 1
                handle = handles[i]
                if handle.finish_reason == "error":
                    yield {
                        "error": {
                            "message": f"generation failed: {handle.error}",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                yield self.chunk(i, None, handle.finish_reason)
            if include_usage:
                yield {
                    **self.head("chat.completion.chunk" if self.chat else "text_completion"),
                    "choices": [],
                    "usage": usage(handles),
                }
        finally:
            for task in tasks:
                task.cancel()


def usage(handles) -> dict:
    prompt = sum(_get(h.usage, "prompt_tokens") for h in handles)
    completion = sum(_get(h.usage, "completion_tokens") for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _get(usage, key: str) -> int:
    return int(usage[key] if isinstance(usage, dict) else getattr(usage, key))
