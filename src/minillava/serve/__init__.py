"""``minillava serve``: an OpenAI-compatible HTTP server with continuous batching, and a chat page.

Needs the ``serve`` extra (``pip install 'minillava[serve]'``: FastAPI and uvicorn).

    from minillava.serve import create_app, Scheduler
    pipe = Pipeline("path/to/converted")
    app = create_app(pipe, Scheduler(pipe.model, slots=8), "my-model")   # any ASGI server runs it

The parts: :mod:`~minillava.serve.protocol` (the OpenAI schema and error body), :mod:`~minillava.serve.inputs`
(images, prompt and settings of a request), :mod:`~minillava.serve.scheduler` (continuous batching over the rows
of one KV cache), :mod:`~minillava.serve.app` (HTTP routes, streaming) and ``static/index.html`` (the page).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch
import uvicorn

from ..pipeline import Pipeline
from .app import create_app
from .scheduler import Scheduler

__all__ = ["Scheduler", "create_app", "run"]


def run(
    model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    slots: int = 8,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    allow_remote_images: bool = False,
    log_level: str = "info",
) -> None:
    """Load the model and serve it until interrupted (Ctrl-C). ``port=0`` takes a free port; the address is
    printed on stdout once the socket is bound."""
    pipe = Pipeline(model, dtype=dtype, device=device, quantize=quantize)
    name = pipe.path.name
    scheduler = Scheduler(pipe.model, slots)
    app = create_app(pipe, scheduler, name, allow_remote_images)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    bound = sock.getsockname()
    url_host = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    kv_bytes = sum(t.numel() * t.element_size() for t in scheduler.cache.keys + scheduler.cache.values)
    print(
        f"minillava serve: {name} on http://{url_host}:{bound[1]} ({slots} slots of {scheduler.max_len} tokens, "
        f"KV cache {kv_bytes / 2**20:,.1f} MiB, {device}); Ctrl-C stops",
        flush=True,
    )
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        sys.stdout.flush()
