"""``minillava serve`` as a client sees it: a real server process on a free loopback port, the official ``openai``
client and plain HTTP; answers equal ``Pipeline().chat``'s, bad input gets OpenAI's error JSON and the server goes
on serving."""

from __future__ import annotations

import base64
import functools
import http.client
import json
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from openai import OpenAI

from minillava.pipeline import Pipeline
from minillava.serve import Scheduler, create_app
from tests.serve_fixtures import IMAGES, QUESTIONS, data_url, image_message, server_process, server_thread

SLOTS = 4


@pytest.fixture(scope="module")
def pipe(bundled_pipeline) -> Pipeline:
    return bundled_pipeline


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    with server_process(tmp_path_factory.mktemp("serve") / "server.log", "--slots", str(SLOTS)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def solo(pipe: Pipeline, image, question: str) -> str:
    return pipe.chat(question, images=[image])


def test_openai_client_gets_the_answer_pipeline_chat_gives(pipe, client):
    image, question = QUESTIONS[0]
    reply = client.chat.completions.create(model="shapes", messages=[image_message(question, image)])
    assert reply.choices[0].message.content == solo(pipe, image, question)
    assert reply.choices[0].finish_reason == "stop" and reply.model == "shapes"
    prompt_ids = pipe.processor.encode(pipe.template.format([{"role": "user", "content": f"<image>\n{question}"}]))
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chunks_join_into_the_answer(pipe, client):
    image, question = QUESTIONS[3]
    stream = client.chat.completions.create(
        model="shapes",
        messages=[image_message(question, image)],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == solo(pipe, image, question)
    assert sum(1 for p in pieces if p) > 3, "the answer should arrive in pieces"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 3 and not chunks[-1].choices


def test_raw_stream_is_server_sent_events_ending_with_done(server):
    image, question = QUESTIONS[1]
    body = {"messages": [image_message(question, image)], "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_concurrent_clients_each_get_their_solo_answer(pipe, client):
    def ask(item):
        image, question = item
        return client.chat.completions.create(model="shapes", messages=[image_message(question, image)])

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        replies = list(pool.map(ask, QUESTIONS))
    for (image, question), reply in zip(QUESTIONS, replies, strict=True):
        assert reply.choices[0].message.content == solo(pipe, image, question)


def test_sampling_settings_reach_the_request(pipe, client):
    image, question = QUESTIONS[0]
    settings = dict(temperature=2.0, top_p=0.95, seed=7)
    reply = client.chat.completions.create(model="shapes", messages=[image_message(question, image)], **settings)
    assert reply.choices[0].message.content == pipe.chat(question, images=[image], **settings)
    stopped = client.chat.completions.create(
        model="shapes", messages=[image_message(question, image)], stop=["purple"], max_tokens=30
    )
    assert stopped.choices[0].message.content == solo(pipe, image, question).split("purple")[0]


def test_models_health_and_page(client, server):
    assert [m.id for m in client.models.list()] == ["shapes"]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["slots"] == SLOTS
    page = httpx.get(server)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "://" not in page.text  # nothing fetched from elsewhere


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (its pixel data is cut short): refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def with_image(url: str, text: str = "What is it?") -> dict:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"messages": [{"role": "user", "content": parts}]}


def b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


BAD_REQUESTS = {
    "malformed JSON": (b'{"messages": [', 400, None, "invalid_json"),
    "not an object": (b"[1, 2]", 400, None, None),
    "no messages": ({"model": "shapes"}, 400, "messages", None),
    "content of the wrong type": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None),
    "temperature not a number": (
        {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        400,
        "temperature",
        None,
    ),
    "n > 1": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", None),
    "turns out of order": (
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}]},
        400,
        "messages",
        None,
    ),
    "undecodable image": (
        with_image(b64(b"this is not a png")),
        400,
        "messages[0].content[1].image_url.url",
        "invalid_image",
    ),
    "bad base64": (with_image("data:image/png;base64,@@@"), 400, "messages[0].content[1].image_url.url", None),
    "oversized image": (
        with_image(b64(png_header_only(10_000, 10_000))),
        400,
        "messages[0].content[1].image_url.url",
        "image_too_large",
    ),
    "more images than markers": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "<image> What is it?"},
                        {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}},
                        {"type": "image_url", "image_url": {"url": data_url(IMAGES[1])}},
                    ],
                }
            ]
        },
        400,
        "messages",
        None,
    ),
    "images past the context window": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}}] * 60
                    + [{"type": "text", "text": "What is it?"}],
                }
            ]
        },
        400,
        "messages",
        "context_length_exceeded",
    ),
    "prompt past the context window": (
        {"messages": [{"role": "user", "content": "red circle " * 400}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    "max_tokens past the context window": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    "remote image URL": (
        with_image("https://example.com/cat.png"),
        400,
        "messages[0].content[1].image_url.url",
        "remote_image_not_allowed",
    ),
    "file URL": (
        with_image("file:///etc/hostname"),
        400,
        "messages[0].content[1].image_url.url",
        "unsupported_image_url",
    ),
    "local path": (with_image("/etc/hostname"), 400, "messages[0].content[1].image_url.url", "unsupported_image_url"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_with_openai_error_json(server, case):
    body, status, param, code = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server}/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and error["param"] == param and error["code"] == code
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_unknown_routes_and_methods_get_openai_error_json(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        response = httpx.request(method, f"{server}{path}")
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "999999999")
        conn.endheaders(b"{")  # the rest never comes
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()


def test_still_answers_after_bad_input(pipe, client):
    image, question = QUESTIONS[1]
    reply = client.chat.completions.create(model="shapes", messages=[image_message(question, image)])
    assert reply.choices[0].message.content == solo(pipe, image, question)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = httpx.get(f"{server}/health").json()
    image, question = QUESTIONS[0]
    body = {"messages": [image_message(question, image)], "stream": True, "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # the first piece of a 400-token answer: leave now
    deadline = time.monotonic() + 30
    while (health := httpx.get(f"{server}/health").json())["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["active"] == 0 and health["cancelled"] == before["cancelled"] + 1
    assert health["finished"] == before["finished"], "the request ran to its end instead of being cancelled"


def test_a_failure_inside_the_model_fails_that_request_alone(pipe):
    """Served in this process, so that a forward hook can make the vision tower fail on one image."""
    poisoned = pipe.processor("<image>", images=[IMAGES[2]])["pixel_values"]

    def vision_fails_on_the_poisoned_image(module, args):
        if torch.equal(args[0], poisoned):
            raise RuntimeError("simulated failure in the vision tower")

    hook = pipe.model.vision.register_forward_pre_hook(vision_fails_on_the_poisoned_image)
    try:
        with server_thread(create_app(pipe, Scheduler(pipe.model, 2), "shapes")) as base_url:
            url = f"{base_url}/v1/chat/completions"
            failed = httpx.post(url, json={"messages": [image_message("What is it?", IMAGES[2])]}, timeout=60)
            image, question = QUESTIONS[1]
            served = httpx.post(url, json={"messages": [image_message(question, image)]}, timeout=60)
    finally:
        hook.remove()
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert error["type"] == "server_error" and "simulated failure" in error["message"]
    assert served.status_code == 200 and served.json()["choices"][0]["message"]["content"] == solo(
        pipe, image, question
    )


def test_remote_images_are_fetched_only_when_allowed(pipe):
    """``--allow-remote-images``: an http URL served on loopback gives the same pixels as the file itself."""
    import http.server
    import threading

    from minillava.serve.inputs import prepare
    from minillava.serve.protocol import APIError, parse_chat_request

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(IMAGES[0].parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        request = parse_chat_request(json.dumps(with_image(f"{base}/{IMAGES[0].name}")).encode())
        with pytest.raises(APIError, match="does not fetch remote images"):
            prepare(pipe, request, 512)
        fetched = prepare(pipe, request, 512, allow_remote_images=True)
        expected = pipe.processor("<image>", images=[IMAGES[0]])["pixel_values"]
        assert torch.equal(fetched.pixel_values, expected)
        missing = parse_chat_request(json.dumps(with_image(f"{base}/nothing.png")).encode())
        with pytest.raises(APIError, match="could not fetch") as err:
            prepare(pipe, missing, 512, allow_remote_images=True)
        assert err.value.status == 400 and err.value.code == "image_fetch_failed"
    finally:
        httpd.shutdown()
        httpd.server_close()
