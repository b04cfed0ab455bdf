"""``POST /v1/responses`` (issue 13): a pass-through with the completion endpoints' auth, limits, metrics, ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from loadtest.fake_engine import FakeEngine, Script
from tests.support.auth import KEY_ALL, KEY_OTHER, bearer, keys_file, two_routes
from tests.support.wire import assert_openai_error

BODY = {"model": "tinyreason", "input": "Q: 1+2=?"}


def post(url: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/responses", json={**BODY, **body}, headers=headers or {}, timeout=30)


def test_non_streamed_response_is_the_final_event_s_response(gateway: Any) -> None:
    url, engine, registry = gateway
    r = post(url, headers={"x-request-id": "resp-42"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "resp-42"
    body = r.json()
    assert body["object"] == "response" and body["status"] == "completed" and body["model"] == "tinyreason"
    assert body["output"][0]["content"][0]["text"] == "".join(Script().pieces)
    sent = engine.stats.requests[-1]
    # Always streamed from the engine, the route's upstream model, the route's default output bound.
    assert sent["stream"] is True and sent["model"] == "tinyreason" and sent["max_output_tokens"] == 400
    assert sent["input"] == "Q: 1+2=?"
    assert engine.stats.headers[-1]["x-request-id"] == "resp-42"
    labels = {"route": "arith", "policy": "none", "stop_reason": "finished", "code": "200"}
    assert registry.get_sample_value("stopgate_requests_total", labels) == 1.0
    completion = registry.get_sample_value("stopgate_tokens_total", {"route": "arith", "kind": "completion"})
    assert completion == len(Script().pieces)


def test_streamed_response_relays_the_engine_s_events(gateway: Any) -> None:
    url, _, registry = gateway
    with httpx.stream("POST", f"{url}/v1/responses", json={**BODY, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert names == [d["type"] for d in data]  # each event keeps its name
    assert "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta") == "".join(Script().pieces)
    assert data[-1]["response"]["usage"]["output_tokens"] == len(Script().pieces)
    labels = {"route": "arith", "policy": "none", "stop_reason": "finished", "code": "200"}
    assert registry.get_sample_value("stopgate_requests_total", labels) == 1.0


def test_limits_are_400s_naming_the_field(gateway: Any) -> None:
    url, engine, _ = gateway
    assert_openai_error(post(url, max_output_tokens=100_000), 400, param="max_output_tokens")
    assert_openai_error(post(url, max_output_tokens=0), 400, param="max_output_tokens")
    assert_openai_error(post(url, input=None), 400, param="input")
    assert_openai_error(post(url, stream="yes"), 400, param="stream")
    assert_openai_error(post(url, stopgate={"policy": "budget"}), 400, param="stopgate")
    assert_openai_error(post(url, input="1+" * 200_000), 400, param="input")
    assert_openai_error(post(url, model="nope"), 404, param="model")
    # The engine fields completions bound are bounded here too (issue 14, finding 5).
    assert_openai_error(post(url, priority=-1000), 400, param="priority")
    assert_openai_error(post(url, ignore_eos=True), 400, param="ignore_eos")
    assert_openai_error(post(url, top_logprobs=1_000_000), 400, param="top_logprobs")
    r = httpx.post(f"{url}/v1/responses", content=b"{", timeout=30)
    assert_openai_error(r, 400)
    assert engine.stats.requests == []  # none of them reached the engine


def test_an_engine_refusal_keeps_its_status(gateway: Any) -> None:
    url, engine, _ = gateway
    engine.push(Script(status=400, error_message="input too long for the context"))
    r = post(url, stream=True)
    assert_openai_error(r, 400)
    assert "input too long" in r.json()["error"]["message"]


def test_keys_and_route_scopes_apply(fake_engine: tuple[FakeEngine, str], gateway_factory: Any, tmp_path: Path) -> None:
    _, upstream = fake_engine
    settings = {"auth": "keys", "api_keys_file": keys_file(tmp_path), "routes_file": two_routes(tmp_path)}
    with gateway_factory(upstream, **settings) as (url, _):
        assert_openai_error(post(url), 401)
        assert_openai_error(post(url, headers=bearer(KEY_OTHER)), 403, param="model")
        assert post(url, headers=bearer(KEY_ALL)).status_code == 200


def test_engine_side_state_is_refused_and_store_forced_off(gateway: Any) -> None:
    """Issue 13 review: background runs outlive their admission ticket; response ids are not scoped to a key."""
    url, engine, _ = gateway
    assert_openai_error(post(url, background=True), 400, param="background")
    assert_openai_error(post(url, previous_response_id="resp_other_tenant"), 400, param="previous_response_id")
    assert_openai_error(post(url, conversation="conv_1"), 400, param="conversation")
    assert engine.stats.requests == []
    r = post(url, store=True, background=False)
    assert r.status_code == 200, r.text
    assert engine.stats.requests[-1]["store"] is False


def test_engine_side_state_passes_through_when_the_setting_allows_it(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any
) -> None:
    engine, upstream = fake_engine
    with gateway_factory(upstream, responses_stateful=True) as (url, _):
        r = post(url, store=True, previous_response_id="resp_1")
    assert r.status_code == 200, r.text
    sent = engine.stats.requests[-1]
    assert sent["store"] is True and sent["previous_response_id"] == "resp_1"


def test_list_input_is_measured_in_characters_not_ascii_escapes(gateway: Any) -> None:
    """Issue 13 review: json.dumps' default ensure_ascii made each non-ASCII character count as six."""
    url, _, _ = gateway
    text = "数" * 60_000  # 60k characters; 360k with \\uXXXX escapes, over the 200k limit
    r = post(url, input=[{"role": "user", "content": text}])
    assert r.status_code == 200, r.text
    assert_openai_error(post(url, input=[{"role": "user", "content": "数" * 200_001}]), 400, param="input")
