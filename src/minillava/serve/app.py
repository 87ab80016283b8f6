"""The HTTP side: an OpenAI-compatible API over a :class:`~minillava.serve.scheduler.Scheduler`, and the chat page.

Routes: ``POST /v1/chat/completions`` (whole answers or server-sent events), ``GET /v1/models``, ``GET /health``
and ``GET /`` (the page). Every error is OpenAI's JSON body with a 4xx status for bad input and 500 for a failure
inside the model; neither stops the server. Request handling runs on the event loop; image decoding and
tokenizing run in a worker thread, the model in the scheduler's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..pipeline import Pipeline
from .inputs import prepare
from .protocol import APIError, chunk, completion, parse_chat_request, usage
from .scheduler import Failed, Finished, Job, Piece, Scheduler

MAX_REQUEST_BYTES = 64 * 1024 * 1024
"""The largest request body read (images come inline, base64)."""

DISCONNECT_POLL_S = 0.5
"""How often a request waiting for a whole answer checks that its client is still there."""

log = logging.getLogger("minillava.serve")


def create_app(pipe: Pipeline, scheduler: Scheduler, model_name: str, allow_remote_images: bool = False) -> FastAPI:
    """The server's ASGI app. The scheduler's thread starts and stops with the app (its lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="minillava", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        body = APIError(500, f"internal error: {type(err).__name__}: {err}").body()
        return JSONResponse(body, status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "minillava"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        parsed = parse_chat_request(await _read_body(request))
        inputs = await asyncio.to_thread(prepare, pipe, parsed, scheduler.max_len, allow_remote_images)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(inputs.ids, inputs.pixel_values, inputs.config, inputs.text, emit, inputs.image_sizes)
        try:
            scheduler.submit(job)
        except RuntimeError:
            raise APIError(503, "the server is shutting down") from None
        ident, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if parsed.stream:
            stream = _sse(job, events, ident, now, model_name, parsed.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; the job is cancelled below
                    continue
                if isinstance(event, Piece):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    counts = usage(event.prompt_tokens, event.completion_tokens)
                    return JSONResponse(completion(ident, now, model_name, "".join(pieces), event.reason, counts))
                else:
                    raise APIError(event.status, event.message)
        finally:
            job.cancel()  # a no-op once finished; otherwise the row is freed at the next step

    return app


async def _read_body(request: Request) -> bytes:
    too_large = APIError(413, f"the request body is over {MAX_REQUEST_BYTES:,} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_REQUEST_BYTES:
            raise too_large
    return bytes(body)


async def _sse(
    job: Job, events: asyncio.Queue, ident: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``. A client that goes away
    cancels this generator; the ``finally`` then frees the job's row."""

    def data(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield data(chunk(ident, created, model, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Piece):
                yield data(chunk(ident, created, model, {"content": event.text}))
                continue
            if isinstance(event, Finished):
                yield data(chunk(ident, created, model, {}, event.reason))
                if include_usage:
                    last = chunk(ident, created, model, {})
                    last.update(choices=[], usage=usage(event.prompt_tokens, event.completion_tokens))
                    yield data(last)
            elif isinstance(event, Failed):
                yield data(APIError(event.status, event.message).body())
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancel()
