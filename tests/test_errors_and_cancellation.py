"""Bad input, engine faults and disconnects: OpenAI errors, nothing hangs, serving goes on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.engine.client import Upstream
from gateway.openai.protocol import CompletionRequest
from gateway.settings import RouteConfig
from gateway.stopping.session import Generation
from gateway.stopping.spec import RequestContext
from loadtest.fake_engine import FakeEngine, Script
from tests.support.waiting import wait_until
from tests.support.wire import assert_openai_error, sse_events

# Under each HTTP stack the engine client can use (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("engine_transport")

Gateway = tuple[str, FakeEngine, CollectorRegistry]
OK_BODY = {"model": "tinyreason", "prompt": "Q: 1+2=?\n"}


def still_serving(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json=OK_BODY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"].endswith("#### 3")


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"model": "tinyreason", "prompt": "x", "max_tokens": "10"}, "max_tokens", "integer"),
        ({"model": "tinyreason", "prompt": "x", "max_tokens": -5}, "max_tokens", "at least 1"),
        ({"model": "tinyreason", "prompt": "x", "max_tokens": 10**9}, "max_tokens", "exceeds the limit of 480"),
        ({"model": "tinyreason", "prompt": "x", "n": 0}, "n", "at least 1"),
        ({"model": "tinyreason", "prompt": "x", "n": 99}, "n", "exceeds the limit"),
        ({"model": "tinyreason", "prompt": "x", "stream": "yes"}, "stream", "boolean"),
        ({"model": "tinyreason"}, "prompt", "required"),
        ({"prompt": "x"}, "model", "required"),
        ({"model": "tinyreason", "prompt": {"a": 1}}, "prompt", ""),
    ],
)
def test_invalid_completion_request_is_a_400_naming_the_parameter(
    gateway: Gateway, body: Any, param: str, says: str
) -> None:
    url, engine, _ = gateway
    before = len(engine.stats.requests)
    assert_openai_error(httpx.post(f"{url}/v1/completions", json=body), 400, param=param, says=says)
    assert len(engine.stats.requests) == before  # nothing reached the engine
    still_serving(url)


def test_invalid_chat_messages_name_the_message_field(gateway: Gateway) -> None:
    url, _, _ = gateway
    body = {"model": "tinyreason", "messages": [{"role": "robot", "content": "hi"}]}
    assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=body), 400, param="messages.0.role")
    body = {"model": "tinyreason", "messages": []}
    assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=body), 400, param="messages")


@pytest.mark.parametrize(
    ("raw", "says"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"), (b"\xff\xfe", "not valid")],
)
def test_malformed_body_is_a_400(gateway: Gateway, raw: bytes, says: str) -> None:
    url, _, _ = gateway
    r = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400, says=says)
    still_serving(url)


def test_unknown_model_is_a_404_listing_known_models(gateway: Gateway) -> None:
    url, _, _ = gateway
    err = assert_openai_error(
        httpx.post(f"{url}/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, param="model", says="gpt-9"
    )
    assert "tinyreason" in err["message"] and err["code"] == "model_not_found"


def test_oversized_body_is_a_413(gateway_factory: Any, fake_engine: tuple[FakeEngine, str]) -> None:
    _, upstream = fake_engine
    with gateway_factory(upstream, max_request_bytes=2048) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x" * 5000})
        assert_openai_error(r, 413, says="limit")
        still_serving(url)


def test_unknown_path_is_an_openai_style_404(gateway: Gateway) -> None:
    url, _, _ = gateway
    assert_openai_error(httpx.get(f"{url}/v1/nothing"), 404)


def test_engine_4xx_passes_through_with_its_message(gateway: Gateway) -> None:
    url, engine, _ = gateway
    message = "This model's maximum context length is 512 tokens. However, you requested 900 tokens."
    engine.push(Script(status=400, error_message=message))
    assert_openai_error(httpx.post(f"{url}/v1/completions", json=OK_BODY), 400, says="maximum context length")
    engine.push(Script(status=400, error_message=message))
    with httpx.stream("POST", f"{url}/v1/completions", json={**OK_BODY, "stream": True}) as r:
        assert r.status_code == 400  # refused before streaming started: a real status
    still_serving(url)


def test_engine_5xx_is_a_502(gateway: Gateway) -> None:
    url, engine, registry = gateway
    engine.push(Script(status=500, error_message="CUDA out of memory"))
    assert_openai_error(httpx.post(f"{url}/v1/completions", json=OK_BODY), 502, says="out of memory")
    assert registry.get_sample_value("stopgate_upstream_errors_total", {"kind": "bad_response"}) == 1.0
    still_serving(url)


def test_unreachable_engine_is_a_503(gateway_factory: Any) -> None:
    with gateway_factory("http://127.0.0.1:9") as (url, registry):
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=OK_BODY), 503, says="unreachable")
        with httpx.stream("POST", f"{url}/v1/completions", json={**OK_BODY, "stream": True}) as r:
            assert r.status_code == 503
        assert registry.get_sample_value("stopgate_upstream_errors_total", {"kind": "connect"}) == 2.0


def test_slow_engine_times_out_with_a_504(gateway_factory: Any, fake_engine: tuple[FakeEngine, str]) -> None:
    engine, upstream = fake_engine
    with gateway_factory(upstream, read_timeout_s=0.3) as (url, _):
        # A gateway that waited the stall out would relay the engine's answer (200), not a 504.
        engine.push(Script(stall_s=3))
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=OK_BODY), 504, says="in time")
        still_serving(url)


def test_engine_dying_mid_stream_gives_an_error_event_then_done(gateway: Gateway) -> None:
    url, engine, _ = gateway
    engine.push(Script(fail_after=4))
    with httpx.stream("POST", f"{url}/v1/completions", json={**OK_BODY, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2] and events[-2]["error"]["type"] == "upstream_error"
    text = "".join(e["choices"][0]["text"] for e in events[:-2] if isinstance(e, dict) and e.get("choices"))
    assert text == "<think>\n1+"  # what came before the failure
    still_serving(url)


def test_engine_error_event_mid_stream_is_relayed_then_done(gateway: Gateway) -> None:
    url, engine, _ = gateway
    engine.push(Script(error_event_after=2, error_message="engine dead"))
    with httpx.stream("POST", f"{url}/v1/completions", json={**OK_BODY, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "engine dead" in events[-2]["error"]["message"]


def test_engine_dying_mid_request_is_a_502_for_a_non_streaming_client(gateway: Gateway) -> None:
    url, engine, _ = gateway
    engine.push(Script(fail_after=4))
    assert_openai_error(httpx.post(f"{url}/v1/completions", json=OK_BODY), 503)
    still_serving(url)


def test_client_disconnect_mid_stream_closes_the_upstream_request(gateway: Gateway) -> None:
    url, engine, registry = gateway
    engine.push(Script(pieces=["x"] * 500, delay_s=0.01))
    with httpx.stream("POST", f"{url}/v1/completions", json={**OK_BODY, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk
    assert wait_until(lambda: engine.stats.cancelled == 1 and engine.stats.active == 0)
    assert engine.stats.chunks_sent < 400
    assert wait_until(lambda: registry.get_sample_value("stopgate_in_flight_requests") == 0.0)
    still_serving(url)


def test_client_disconnect_during_non_streaming_request_closes_the_upstream_request(gateway: Gateway) -> None:
    url, engine, _ = gateway
    engine.push(Script(pieces=["x"] * 500, delay_s=0.01))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=OK_BODY, timeout=0.5)
    assert wait_until(lambda: engine.stats.cancelled == 1 and engine.stats.active == 0)
    assert engine.stats.chunks_sent < 400
    still_serving(url)


def test_gateway_can_end_the_upstream_stream_itself(fake_engine: tuple[FakeEngine, str], engine_transport: str) -> None:
    """The hook early stopping uses: a stop decision closes the engine stream mid-generation."""
    engine, upstream_url = fake_engine
    engine.push(Script(pieces=["a"] * 300, delay_s=0.005), Script(pieces=[" 7"]))
    route = RouteConfig(name="arith", upstream_model="tinyreason")
    request = CompletionRequest(model="arith", prompt="x", stopgate={"budget": 5})
    ctx = RequestContext("completions", request, route, "rid-1")

    async def run() -> list[dict[str, Any]]:
        upstream = Upstream(upstream_url, transport=engine_transport)
        try:
            return [c async for c in Generation(upstream, ctx).chunks()]
        finally:
            await upstream.aclose()

    chunks = asyncio.run(run())
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["stopgate"]["stop_reason"] == "budget"
    assert final["stopgate"]["tokens"]["thinking"] == 5
    assert wait_until(lambda: engine.stats.cancelled == 1 and engine.stats.active == 0)
    assert json.dumps(final)  # serialisable as an SSE event


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_event_stream_body_is_cancelled_when_the_client_leaves_under_any_asgi_version(spec_version: str) -> None:
    """Starlette stops listening for the disconnect under ASGI 2.4; uvicorn's send then returns quietly.

    The gateway's own stream response must still cancel the body (that closes the engine request).
    """
    from gateway.openai.sse import EventStreamResponse

    produced: list[int] = []
    closed = asyncio.Event()

    async def body() -> Any:
        try:
            for i in range(10_000):
                produced.append(i)
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)  # like uvicorn after a disconnect: accepted, never raises

    async def receive() -> Any:
        while len(sent) < 3:
            await asyncio.sleep(0.001)
        return {"type": "http.disconnect"}

    async def run() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}
        await asyncio.wait_for(EventStreamResponse(body())(scope, receive, send), timeout=5)

    asyncio.run(run())
    assert closed.is_set()
    assert len(produced) < 100
    assert sent[0]["type"] == "http.response.start"
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]


def test_event_stream_sends_every_event_then_ends_the_body() -> None:
    from gateway.openai.sse import EventStreamResponse

    async def body() -> Any:
        for i in range(3):
            yield f"data: {i}\n\n".encode()

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        await asyncio.sleep(3600)  # the client stays

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
    asyncio.run(asyncio.wait_for(EventStreamResponse(body())(scope, receive, send), timeout=5))
    assert [m.get("body") for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    assert sent[-1]["more_body"] is False
