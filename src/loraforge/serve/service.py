"""What every route shares: the adapter registry, the engine, the limits, requests in flight, and the
threads that do blocking work (loading adapters, encoding images) off the event loop."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from loraforge.serve import mixes
from loraforge.serve.openai import APIError


class Service:
    """What every route shares: the registry, the limits, in-flight accounting and worker threads."""

    def __init__(self, settings, registry, engine, kind: str):
        """`settings`: a `loraforge.serve.app.ServeSettings`; `kind`: "text" or "image"."""
        self.settings, self.registry, self.engine, self.kind = settings, registry, engine, kind
        self.base = settings.base
        self.loader = ThreadPoolExecutor(64, thread_name_prefix="loraforge-load")
        self.waiter = ThreadPoolExecutor(4, thread_name_prefix="loraforge-encode")  # PNG encoding
        self.in_flight = 0
        self.created = int(time.time())

    # -- requests in flight ------------------------------------------------------------------------

    def admit(self) -> None:
        if self.in_flight >= self.settings.max_queue:
            raise APIError(503, f"server busy: {self.in_flight} requests in flight; retry later", code="busy")
        self.in_flight += 1

    def done(self) -> None:
        self.in_flight -= 1

    async def run(self, pool, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -- adapter selections ------------------------------------------------------------------------

    def selection(self, model: str | None, adapters, extra: mixes.Mix = ()) -> mixes.Mix:
        """The request's Mix (blocking: may register a store CID). 404 for an unknown name."""
        mix = mixes.combine(
            () if model is None else mixes.parse_model(model, self.registry, {self.base}),
            mixes.parse_adapters(adapters),
            extra,
        )
        if len(mix) > self.settings.max_loras:
            raise APIError(
                400,
                f"a request may combine at most {self.settings.max_loras} adapters (--max-loras)",
                "model",
            )
        mixes.check_known(mix, self.registry.knows, self.registry.names)
        return mix

    async def lease(self, model, adapters, extra: mixes.Mix = ()):
        """(Mix, Lease) with the mix's adapters loaded and pinned."""
        mix = await self.run(self.loader, self.selection, model, adapters, extra)
        lease = await self.run(self.loader, self.registry.acquire, [n for n, _ in mix])
        return mix, lease

    def add_routes(self, app, body) -> None:
        """Adds the kind's routes; `body(request, schema)` reads and validates a JSON body."""
        raise NotImplementedError

    def models(self) -> dict:
        base = {"id": self.base, "object": "model", "created": self.created, "owned_by": "loraforge"}
        data = [{**base, "root": self.base, "parent": None, "kind": self.kind}]
        for name in self.registry.names():
            data.append({**base, "id": name, "root": self.registry.source(name), "parent": self.base})
        return {"object": "list", "data": data}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def random_seed() -> int:
    return secrets.randbelow(2**31)
