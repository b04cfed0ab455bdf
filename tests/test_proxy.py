"""The gateway as an OpenAI-compatible proxy, against the scripted fake engine."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from loadtest.fake_engine import FakeEngine, Script
from tests.support.wire import sse_events

# Under each HTTP stack the engine client can use (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("engine_transport")

Gateway = tuple[str, FakeEngine, CollectorRegistry]


def test_non_streaming_completion_returns_text_usage_and_extension(gateway: Gateway) -> None:
    url, engine, _ = gateway
    r = httpx.post(f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "Q: 1+2=?\n", "max_tokens": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["model"] == "tinyreason"
    assert body["choices"][0]["text"] == "<think>\n1+2=3\n</think>\n#### 3"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 10, "total_tokens": 17}
    assert body["stopgate"]["route"] == "arith"
    assert body["stopgate"]["stop_reason"] == "finished"
    # The engine always streams, with usage, under its own model name.
    sent = engine.stats.requests[-1]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert sent["model"] == "tinyreason"


def test_streaming_completion_ends_with_usage_chunk_and_done(gateway: Gateway) -> None:
    url, _, _ = gateway
    body = {"model": "arith", "prompt": "Q: 1+2=?\n", "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "<think>\n1+2=3\n</think>\n#### 3"
    final = chunks[-1]
    # Usage rides on the finishing chunk even though the client did not ask for it.
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] == 10
    assert final["stopgate"]["route"] == "arith"
    assert all(c["model"] == "arith" for c in chunks)
    # Per-chunk usage was only for the gateway's own counting.
    assert all("usage" not in c for c in chunks[:-1])


def test_streaming_with_include_usage_adds_the_openai_usage_chunk(gateway: Gateway) -> None:
    url, _, _ = gateway
    body = {"model": "tinyreason", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        events = sse_events(r)
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 7, "completion_tokens": 10, "total_tokens": 17}


def test_chat_streaming_and_non_streaming_agree(gateway: Gateway) -> None:
    url, engine, _ = gateway
    msgs = [{"role": "user", "content": "Q: 1+2=?"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tinyreason", "messages": msgs})
    assert r.status_code == 200, r.text
    whole = r.json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "<think>\n1+2=3\n</think>\n#### 3"}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={"model": "tinyreason", "messages": msgs, "stream": True}
    ) as s:
        events = sse_events(s)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert engine.stats.requests[-1]["messages"] == msgs


def test_max_completion_tokens_is_sent_as_max_tokens(gateway: Gateway) -> None:
    url, engine, _ = gateway
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(
        f"{url}/v1/chat/completions", json={"model": "tinyreason", "messages": msgs, "max_completion_tokens": 3}
    )
    assert r.status_code == 200
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert engine.stats.requests[-1]["max_tokens"] == 3
    assert "max_completion_tokens" not in engine.stats.requests[-1]


def test_unknown_fields_pass_through_to_the_engine(gateway: Gateway) -> None:
    url, engine, _ = gateway
    body = {"model": "tinyreason", "prompt": "x", "top_k": 3, "repetition_penalty": 1.1, "vendor_thing": {"a": 1}}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
    sent = engine.stats.requests[-1]
    assert sent["top_k"] == 3 and sent["repetition_penalty"] == 1.1 and sent["vendor_thing"] == {"a": 1}


def test_route_default_max_tokens_applies_when_the_client_gives_none(gateway: Gateway) -> None:
    url, engine, _ = gateway
    httpx.post(f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x"})
    assert engine.stats.requests[-1]["max_tokens"] == 400


def test_request_id_is_propagated_to_the_engine_and_back(gateway: Gateway) -> None:
    url, engine, _ = gateway
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x"}, headers={"x-request-id": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    assert engine.stats.headers[-1]["x-request-id"] == "abc-123"
    assert r.json()["stopgate"]["request_id"] == "abc-123"


def test_request_id_is_generated_when_missing_or_unsafe(gateway: Gateway) -> None:
    url, engine, _ = gateway
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "tinyreason", "prompt": "x"},
        headers={"x-request-id": "bad id\twith spaces"},
    )
    rid = r.headers["x-request-id"]
    assert rid != "bad id\twith spaces" and len(rid) == 32
    assert engine.stats.headers[-1]["x-request-id"] == rid


def test_models_lists_every_route_name(gateway: Gateway) -> None:
    url, _, _ = gateway
    ids = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert ids == {"arith", "tinyreason"}


def test_health_and_ready(gateway: Gateway) -> None:
    url, _, _ = gateway
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").status_code == 200


def test_ready_is_503_when_the_engine_is_down(gateway_factory: Any) -> None:
    with gateway_factory("http://127.0.0.1:9") as (url, _):
        r = httpx.get(f"{url}/ready")
        assert r.status_code == 503
        assert httpx.get(f"{url}/health").status_code == 200


def test_metrics_endpoint_counts_requests(gateway: Gateway) -> None:
    url, _, registry = gateway
    httpx.post(f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x"})
    labels = {"route": "arith", "policy": "none", "stop_reason": "finished", "code": "200"}
    assert registry.get_sample_value("stopgate_requests_total", labels) == 1.0
    assert registry.get_sample_value("stopgate_tokens_total", {"route": "arith", "kind": "completion"}) == 10.0
    text = httpx.get(f"{url}/metrics").text
    assert 'stopgate_requests_total{code="200",policy="none",route="arith",stop_reason="finished"} 1.0' in text


def test_slow_chunks_still_stream_incrementally(gateway: Gateway) -> None:
    url, engine, _ = gateway
    engine.push(Script(pieces=["a", "b", "c"], delay_s=0.3))
    arrivals = []
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x", "stream": True}
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    # Not buffered until the end: the first chunk arrived well before the last.
    assert arrivals[-1] - arrivals[0] >= 0.5


def test_in_flight_counts_a_stream_until_it_ends(gateway: Gateway) -> None:
    url, engine, registry = gateway
    engine.push(Script(pieces=["a"] * 40, delay_s=0.02))
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x", "stream": True}
    ) as r:
        lines = r.iter_lines()
        next(lines)
        assert registry.get_sample_value("stopgate_in_flight_requests") == 1.0
        for _ in lines:
            pass
    deadline = time.monotonic() + 5
    while registry.get_sample_value("stopgate_in_flight_requests") != 0.0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert registry.get_sample_value("stopgate_in_flight_requests") == 0.0


def test_engine_connections_are_reused_across_requests(gateway: Gateway) -> None:
    """A stream read only to [DONE] would drop its keep-alive connection: one reconnect per request."""
    url, engine, _ = gateway
    for stream in (False, True, False, True, False):
        body = {"model": "tinyreason", "prompt": "x", "stream": stream}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.read()
    assert len(engine.stats.client_ports) == 1


def test_a_stream_that_ends_at_max_tokens_keeps_its_engine_connection(gateway: Gateway) -> None:
    """The engine's own finish at max_tokens is read on to [DONE]: the connection is reused, and the engine's
    usage stands. (Leaving at the limit is for an engine that ignores max_tokens, tested elsewhere.)"""
    url, engine, _ = gateway
    for stream in (False, True, False, True):
        engine.push(Script(pieces=["a", "b", "c"]))
        body = {"model": "tinyreason", "prompt": "x", "stream": stream, "max_tokens": 3}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            raw = r.read()
        if not stream:
            assert json.loads(raw)["usage"]["completion_tokens"] == 3
            assert json.loads(raw)["choices"][0]["finish_reason"] in ("stop", "length")
    assert engine.stats.completed == 4 and engine.stats.cancelled == 0
    assert len(engine.stats.client_ports) == 1
