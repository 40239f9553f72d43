"""The image route: POST /v1/images/generations.

Adapters come from ``model``, ``adapters`` and ``<lora:name:weight>`` tags in the prompt (cut out
before the prompt is encoded), combined into one Mix (`loraforge.serve.mixes`). Requests that arrive
together run in one UNet batch whatever their LoRAs. ``size`` is ``"WIDTHxHEIGHT"`` (default: the
pipeline's native size); image k is made with ``seed + k`` (a random seed when none is given, and
reported), so the same request gives the same image alone or batched. Images come back as base64
PNGs (``b64_json``) whose text chunks hold the generation parameters (`loraforge generate-image`'s).
"""

import asyncio
import base64
import io
import time

from loraforge.errors import UserError
from loraforge.serve import mixes
from loraforge.serve.openai import APIError, ImageRequest, until_disconnect
from loraforge.serve.service import Service, random_seed


class ImageRoutes(Service):
    def __init__(self, settings, registry, engine, kind, pipe):
        from loraforge.runtime import native_size, size_step

        super().__init__(settings, registry, engine, kind)
        self.native, self.step = native_size(pipe), size_step(pipe)

    def add_routes(self, app, body) -> None:
        from fastapi import Request

        @app.post("/v1/images/generations")
        async def generations(request: Request):
            return await self.generate(request, await body(request, ImageRequest))

    def size(self, text: str | None) -> tuple[int, int]:
        if text is None:
            return self.native
        from loraforge.infer.image import parse_size

        try:
            width, height = parse_size(text)
        except Exception:  # noqa: BLE001 - parse_size's message names the CLI flag
            raise APIError(400, f"size must be WIDTHxHEIGHT, got {text!r}", "size") from None
        limit = self.settings.max_image_size
        if not (0 < width <= limit and 0 < height <= limit):
            raise APIError(400, f"size {width}x{height}: each side must be in 1..{limit}", "size")
        if width % self.step or height % self.step:
            raise APIError(400, f"size {width}x{height}: each side must be a multiple of {self.step}", "size")
        return width, height

    async def generate(self, request, r: ImageRequest):
        from loraforge.serve.image import ImageJob

        if r.response_format != "b64_json":
            raise APIError(
                400, "response_format: only b64_json is served (images come back inline)", "response_format"
            )
        if r.n > self.settings.max_n:
            raise APIError(400, f"n is {r.n}; this server allows at most {self.settings.max_n}", "n")
        if r.steps is not None and r.steps > self.settings.max_steps:
            raise APIError(
                400, f"steps is {r.steps}; this server allows at most {self.settings.max_steps}", "steps"
            )
        width, height = self.size(r.size)
        prompt, tags = mixes.extract_prompt_loras(r.prompt)
        settings = {k: v for k, v in (("steps", r.steps), ("guidance", r.guidance)) if v is not None}
        seed = random_seed() if r.seed is None else r.seed
        self.admit()
        lease = handle = None
        try:
            mix, lease = await self.lease(r.model, r.adapters, tags)
            job = ImageJob(
                prompt, r.negative_prompt, mix, seed, width=width, height=height, n=r.n, **settings
            )
            handle = self.engine.submit(job)
            images = await self.wait(request, handle)
            data = await self.run(self.waiter, self.encode, images, job)
        finally:
            if handle is not None:
                handle.cancel()
            if lease is not None:
                lease.release()
            self.done()
        return {"created": int(time.time()), "data": data}

    async def wait(self, request, handle):
        """The handle's images; the job is cancelled (APIError 499) if the client disconnects first.
        A job the engine refuses (UserError) is a 400, anything else a 500."""

        async def images():
            return await handle

        result = asyncio.ensure_future(images())
        gone = asyncio.ensure_future(until_disconnect(request.receive))
        await asyncio.wait([result, gone], return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not result.done():
            handle.cancel()
            result.cancel()
            raise APIError(499, "client disconnected")
        try:
            return result.result()
        except UserError as e:
            raise APIError(400, str(e)) from None
        except Exception as e:  # noqa: BLE001 - the job failed; the server goes on
            raise APIError(500, f"generation failed: {e}") from None

    def encode(self, images, job) -> list[dict]:
        from loraforge.infer.image import png_info
        from loraforge.runtime import GenerationSettings

        adapters = [{"path": name, "weight": weight} for name, weight in job.mix]
        out = []
        for k, image in enumerate(images):
            settings = GenerationSettings(
                job.prompt, job.negative_prompt, job.seed + k, job.steps, job.guidance, job.width, job.height
            )
            info = png_info(settings, job.seed + k, image.width, image.height, self.base, adapters)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", pnginfo=info)
            b64 = base64.b64encode(buffer.getvalue()).decode()
            out.append({"b64_json": b64, "seed": job.seed + k, "revised_prompt": job.prompt})
        return out
