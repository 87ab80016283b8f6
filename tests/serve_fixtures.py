"""Shared pieces of the server tests: questions about the bundled example images, data URLs, and servers started
on a free loopback port (a ``minillava serve`` process, or uvicorn in a thread of the test process) and stopped
again."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from minillava.config import BUNDLED_MODEL

IMAGES = [BUNDLED_MODEL / f"example-{i}.png" for i in (1, 2, 3)]
QUESTIONS = [
    (IMAGES[0], "Describe the image briefly."),
    (IMAGES[1], "What shape is the blue object?"),
    (IMAGES[2], "Which shape is larger, the purple square or the orange circle?"),
    (IMAGES[1], "Describe the image briefly."),
    (IMAGES[0], "How many shapes are there?"),
    (IMAGES[2], "Describe the image briefly."),
    (IMAGES[1], "How many shapes are there?"),
    (IMAGES[2], "What color is the circle?"),
]
STARTUP_TIMEOUT_S = 120


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_message(question: str, image: Path) -> dict:
    """A user message with one inline image, as the openai client writes it."""
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    return {"role": "user", "content": content}


def wait_healthy(base_url: str, timeout: float = STARTUP_TIMEOUT_S, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} did not answer /health within {timeout} s")


@contextlib.contextmanager
def server_process(log: Path, *args: str) -> Iterator[str]:
    """``minillava serve --port 0 ARGS`` in a process of its own; yields its base URL, then stops it with SIGINT
    (Ctrl-C) and checks that it exits cleanly."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minillava", "serve", "--port", "0", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (found := re.search(rb"on (http://\S+) \(", log.read_bytes())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"minillava serve did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        base_url = found.group(1).decode()
        wait_healthy(base_url, proc=proc)
        yield base_url
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def server_thread(app) -> Iterator[str]:
    """Serve an ASGI ``app`` with uvicorn in a thread of this process on a free loopback port; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_healthy(base_url, timeout=30)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
