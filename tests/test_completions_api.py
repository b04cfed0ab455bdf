"""The raw-ASGI completion endpoints: which requests they take, and that the schema still documents them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.completions_api import _route_path
from gateway.settings import Settings


def test_the_completion_paths_are_recognised_under_a_root_path() -> None:
    assert _route_path({"path": "/v1/completions", "root_path": ""}) == "/v1/completions"
    assert _route_path({"path": "/api/v1/completions", "root_path": "/api"}) == "/v1/completions"
    assert _route_path({"path": "/v1/completions"}) == "/v1/completions"


def test_the_openapi_schema_still_describes_both_completion_bodies(gateway: Any) -> None:
    url, _, _ = gateway
    spec = httpx.get(f"{url}/openapi.json").json()
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert model in spec["components"]["schemas"]


def test_a_trailing_slash_still_reaches_the_endpoint(gateway: Any) -> None:
    url, _, _ = gateway
    r = httpx.post(f"{url}/v1/completions/", json={"model": "tinyreason", "prompt": "x"}, follow_redirects=True)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


class EngineStream(httpx.AsyncByteStream):
    """A scripted engine SSE body that records how far it was read and whether it was closed."""

    def __init__(self, events: int, delay_s: float) -> None:
        self.events = events
        self.delay_s = delay_s
        self.produced = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(self.events):
            self.produced += 1
            chunk = {"id": "c", "object": "text_completion", "created": 1, "model": "m"}
            chunk["choices"] = [{"index": 0, "text": f"t{i} ", "finish_reason": None}]
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(self.delay_s)
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self.closed = True


def _app_with(stream: EngineStream) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)

    settings = Settings(upstream_url="http://engine.test", auth="off", state_path=":memory:", eval_share=0.0)
    return create_app(settings, registry=CollectorRegistry(), transport=httpx.MockTransport(handler))


async def _call(app: Any, body: dict[str, Any], *, leave_after: int | None, method: str = "POST") -> list[Any]:
    """One request through the ASGI app under spec 2.4, whose ``send`` never raises (uvicorn's, once a client left)."""
    sent: list[Any] = []
    delivered = False

    async def receive() -> Any:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        while leave_after is None or len(sent) < leave_after:
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
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "app": app,
    }
    async with app.router.lifespan_context(app):
        scope["state"] = {}
        await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


def test_a_client_leaving_mid_stream_closes_the_upstream_response_under_asgi_2_4() -> None:
    stream = EngineStream(events=2000, delay_s=0.001)
    body = {"model": "tinyreason", "prompt": "x", "stream": True}
    sent = asyncio.run(_call(_app_with(stream), body, leave_after=3))
    assert stream.closed and stream.produced < 200
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200


def test_a_client_leaving_a_non_streaming_request_closes_the_upstream_response() -> None:
    stream = EngineStream(events=2000, delay_s=0.001)
    sent = asyncio.run(_call(_app_with(stream), {"model": "tinyreason", "prompt": "x"}, leave_after=0))
    assert stream.closed and stream.produced < 200
    assert sent == []  # nobody is there to read an answer


def test_a_stream_read_to_its_end_is_relayed_whole_and_ends_with_done() -> None:
    stream = EngineStream(events=5, delay_s=0.0)
    sent = asyncio.run(
        _call(_app_with(stream), {"model": "tinyreason", "prompt": "x", "stream": True}, leave_after=None)
    )
    body = b"".join(m.get("body", b"") for m in sent[1:])
    events = [e[len(b"data: ") :] for e in body.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and sent[-1]["more_body"] is False
    texts = [c["text"] for e in events[:-1] for c in json.loads(e)["choices"]]
    assert "".join(texts).startswith("t0 t1 t2 t3 t4")
    assert json.loads(events[-2])["model"] == "tinyreason"


def test_errors_keep_the_openai_shape_and_the_request_id_header() -> None:
    app = _app_with(EngineStream(events=1, delay_s=0.0))
    sent = asyncio.run(_call(app, {"model": "no-such-model", "prompt": "x"}, leave_after=None))
    assert sent[0]["status"] == 404
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == b"application/json" and b"x-request-id" in headers
    error = json.loads(sent[1]["body"])["error"]
    assert set(error) >= {"message", "type", "code"}
    sent = asyncio.run(_call(app, {}, leave_after=None, method="GET"))
    assert sent[0]["status"] == 405 and (b"allow", b"POST") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["type"] == "invalid_request_error"
