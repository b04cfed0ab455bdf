"""The raw-ASGI completion endpoints (issue 15 point 4): which requests they take, what they answer, how they end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from starlette.responses import JSONResponse

from gateway.engine.client import ChunkStream
from gateway.http.app import create_app
from gateway.http.endpoints import generate, route_path
from gateway.http.server import serve_in_thread
from gateway.settings import Settings
from loadtest.fake_engine import FakeEngine, Script
from tests.support.waiting import wait_until

ANSWER = ["<think>", "\n", "1", "+", "2", "=", "3", "\n", "</think>", "\n#### 3"]


def test_the_completion_paths_are_recognised_under_a_root_path() -> None:
    assert route_path({"path": "/v1/completions", "root_path": ""}) == "/v1/completions"
    assert route_path({"path": "/api/v1/completions", "root_path": "/api"}) == "/v1/completions"
    assert route_path({"path": "/v1/completions"}) == "/v1/completions"


def test_the_openapi_schema_still_describes_both_completion_bodies(gateway: Any) -> None:
    url, _, _ = gateway
    spec = httpx.get(f"{url}/openapi.json", timeout=10).json()
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert model in spec["components"]["schemas"]


def test_a_trailing_slash_still_reaches_the_endpoint(gateway: Any) -> None:
    """FastAPI redirects from the head, while httpx is still sending the body: a CI run lost that redirect to a
    reset (46 of 300 such requests did before the server's lingering close; ``tests/test_http_server.py``)."""
    url, _, _ = gateway
    body = {"model": "tinyreason", "prompt": "x" * 20_000}
    for _ in range(20):
        r = httpx.post(f"{url}/v1/completions/", json=body, follow_redirects=True, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]


def _app(upstream: str, **overrides: Any) -> Any:
    settings = Settings(upstream_url=upstream, state_path=":memory:", eval_share=0.0, **overrides)
    return create_app(settings, registry=CollectorRegistry())


async def _call(
    app: Any,
    body: dict[str, Any] | None,
    *,
    leave_after: int | None,
    leave_when: Callable[[], bool] | None = None,
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> list[Any]:
    """One request through the ASGI app under spec 2.4, whose ``send`` never raises (uvicorn's, once a client left).

    ``body`` None: the body never arrives. The client leaves once ``leave_after`` messages were sent, or once
    ``leave_when()`` holds.
    """
    sent: list[Any] = []
    delivered = False

    async def receive() -> Any:
        nonlocal delivered
        if not delivered and body is not None:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        while not (leave_when is not None and leave_when()) and (leave_after is None or len(sent) < leave_after):
            await asyncio.sleep(0.001)
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *(headers or [])],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "app": app,
    }
    async with app.router.lifespan_context(app):
        scope["state"] = {}
        await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


def test_a_client_leaving_mid_stream_closes_the_upstream_response_under_asgi_2_4(
    fake_engine: tuple[FakeEngine, str],
) -> None:
    engine, upstream = fake_engine
    engine.default = Script(pieces=["<think>"] + ["x"] * 2000, delay_s=0.001)
    body = {"model": "tinyreason", "prompt": "x", "stream": True}
    sent = asyncio.run(_call(_app(upstream), body, leave_after=3))
    assert wait_until(lambda: engine.stats.cancelled == 1 and engine.stats.active == 0, timeout=10)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200


def test_a_client_leaving_a_non_streaming_request_closes_the_upstream_response(
    fake_engine: tuple[FakeEngine, str],
) -> None:
    engine, upstream = fake_engine
    engine.default = Script(pieces=["<think>"] + ["x"] * 2000, delay_s=0.001)
    body = {"model": "tinyreason", "prompt": "x"}
    engine_busy = lambda: engine.stats.active >= 1  # noqa: E731
    sent = asyncio.run(_call(_app(upstream), body, leave_after=None, leave_when=engine_busy))
    assert wait_until(lambda: engine.stats.cancelled == 1 and engine.stats.active == 0, timeout=10)
    assert engine.stats.completed == 0
    assert sent == []  # nobody is there to read an answer


def test_a_stream_read_to_its_end_is_relayed_whole_and_ends_with_done(fake_engine: tuple[FakeEngine, str]) -> None:
    engine, upstream = fake_engine
    engine.default = Script(pieces=ANSWER)
    body = {"model": "tinyreason", "prompt": "x", "stream": True}
    sent = asyncio.run(_call(_app(upstream), body, leave_after=None, headers=[(b"x-request-id", b"req-1")]))
    head = sent[0]
    assert head["status"] == 200 and head["headers"] == [
        (b"x-request-id", b"req-1"),
        (b"cache-control", b"no-cache"),
        (b"content-type", b"text/event-stream; charset=utf-8"),
    ]
    body_bytes = b"".join(m.get("body", b"") for m in sent[1:])
    events = [e[len(b"data: ") :] for e in body_bytes.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and sent[-1]["more_body"] is False
    assert all(m["more_body"] for m in sent[1:-1])
    text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
    assert text.endswith("#### 3")
    assert json.loads(events[-2])["model"] == "tinyreason"


def test_answers_are_the_bytes_and_headers_the_fastapi_handler_sent(fake_engine: tuple[FakeEngine, str]) -> None:
    engine, upstream = fake_engine
    engine.default = Script(pieces=ANSWER)
    body = {"model": "tinyreason", "prompt": "x"}
    sent = asyncio.run(_call(_app(upstream), body, leave_after=None, headers=[(b"x-request-id", b"r")]))
    expected = JSONResponse(json.loads(sent[1]["body"]), headers={"x-request-id": "r"})
    assert sent[0]["status"] == 200 and sent[0]["headers"] == expected.raw_headers
    assert sent[1]["body"] == expected.body


def test_errors_keep_the_openai_shape_and_the_request_id_header(fake_engine: tuple[FakeEngine, str]) -> None:
    _, upstream = fake_engine
    app = _app(upstream)
    sent = asyncio.run(_call(app, {"model": "no-such-model", "prompt": "x"}, leave_after=None))
    assert sent[0]["status"] == 404
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == b"application/json" and b"x-request-id" in headers
    error = json.loads(sent[1]["body"])["error"]
    assert set(error) >= {"message", "type", "code"}
    sent = asyncio.run(_call(app, {}, leave_after=None, method="GET"))
    assert sent[0]["status"] == 405 and (b"allow", b"POST") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["type"] == "invalid_request_error"


def test_a_body_that_never_arrives_is_a_408_that_closes_the_connection(fake_engine: tuple[FakeEngine, str]) -> None:
    _, upstream = fake_engine
    sent = asyncio.run(_call(_app(upstream, body_timeout_s=0.2), None, leave_after=10**9))
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"


def test_the_fastapi_declarations_serve_the_same_endpoint_without_the_middleware(
    fake_engine: tuple[FakeEngine, str],
) -> None:
    engine, upstream = fake_engine
    engine.default = Script(pieces=ANSWER)
    app = _app(upstream)
    app.user_middleware.clear()  # e.g. mounted without it: FastAPI routes the request to api.py's declaration
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x"}, timeout=10)
        missing = httpx.post(f"{url}/v1/completions", json={"model": "no-such-model", "prompt": "x"}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"].endswith("#### 3") and "x-request-id" in r.headers
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


class _ReadByRead:
    """An engine whose stream gives exactly the pieces put in ``reads``, one per read (b"": the body ends)."""

    base_url = "inprocess://engine"

    def __init__(self) -> None:
        self.reads: asyncio.Queue[bytes] = asyncio.Queue()

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any], *, request_id: str) -> AsyncIterator[ChunkStream]:
        yield ChunkStream(self.reads.get)

    async def aclose(self) -> None:
        pass


def _event(text: str, finish: str | None = None, **extra: Any) -> bytes:
    chunk = {"id": "c", "object": "text_completion", "created": 1, "model": "tinyreason", **extra}
    chunk["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def test_a_chunk_goes_out_as_it_arrives_a_burst_in_one_write_and_the_last_chunk_with_done() -> None:
    """One write per engine read: never held back for the next read, never one write per chunk of a burst."""
    usage = {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}

    async def run() -> list[Any]:
        app = _app("http://127.0.0.1:9")
        engine = _ReadByRead()
        sent: list[Any] = []
        arrived = asyncio.Event()

        async def send(message: Any) -> None:
            sent.append(message)
            if message["type"] == "http.response.body":
                arrived.set()

        body = {"model": "tinyreason", "prompt": "x", "max_tokens": 8, "stream": True}
        requests = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

        async def receive() -> Any:
            if requests:
                return requests.pop()
            await asyncio.Event().wait()  # the client stays

        async def engine_side() -> None:
            for piece in (_event("a"), _event("b") + _event("c")):
                arrived.clear()
                await engine.reads.put(piece)
                await asyncio.wait_for(arrived.wait(), 5)  # the read's write, before the next read arrives
            await engine.reads.put(_event("d", "stop") + b"data: [DONE]\n\n")
            await engine.reads.put(b"")  # the body ends

        async with app.router.lifespan_context(app):
            app.state.services.upstream = engine
            await asyncio.gather(
                generate(app.state.services, "completions", {**_SCOPE, "app": app}, receive, send), engine_side()
            )
        return sent

    sent = asyncio.run(run())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    writes = [[e for e in m["body"].split(b"\n\n") if e] for m in sent[1:]]
    texts = [
        [e.decode() if e == b"data: [DONE]" else json.loads(e[6:])["choices"][0]["text"] for e in w] for w in writes
    ]
    assert texts == [["a"], ["b", "c"], ["d", "data: [DONE]"]]
    assert [m["more_body"] for m in sent[1:]] == [True, True, False]
    final = json.loads(writes[-1][0][6:])
    assert (
        final["choices"][0]["finish_reason"] == "stop"
        and final["usage"]["completion_tokens"] == 4 == usage["completion_tokens"]
    )


_SCOPE = {
    "type": "http",
    "method": "POST",
    "path": "/v1/completions",
    "headers": [(b"content-type", b"application/json")],
}
