"""Issue 14: every client-controlled value is bounded; bad input is a 400 naming the field, never a 500.

Each test here failed on 9632926 (before the fix). The cases that need a real
`stopgate serve` process (a stalled event loop, slow headers, fd exhaustion)
are in tests/test_abuse.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.control.plane import ControlPlane
from gateway.control.stores import open_store
from gateway.evaluation.sampler import Sampler
from gateway.metrics import Metrics
from gateway.settings import ConfigError, Settings, build_settings
from gateway.stopping.runner import runner
from loadtest.fake_engine import FakeEngine, Script
from policies.base import Action, PolicyError, TokenEvent
from policies.marker import MAX_CLIENT_PATTERN_CHARS, MarkerPolicy
from policies.registry import build_policy
from tests.support.auth import KEY_ALL, KEY_OTHER, bearer, keys_file, two_routes
from tests.support.control import KEY, complete, routes_file, state
from tests.support.waiting import wait_until
from tests.support.wire import assert_openai_error

# Under each HTTP stack the engine client can use (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("engine_transport")

Gateway = tuple[str, FakeEngine, Any]
NAN = float("nan")


def completion(url: str, timeout: float = 30, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    """POST /v1/completions; the JSON is ASCII-escaped, so a lone surrogate travels as ``\\ud800``."""
    raw = json.dumps({"model": "tinyreason", "prompt": "Q: 1+2=?\n", **body})
    return httpx.post(
        f"{url}/v1/completions",
        content=raw,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=timeout,
    )


def event(text: str) -> TokenEvent:
    return TokenEvent("thinking", text[-1:], 1, len(text), text, None)


# -- 1. client regexes ----------------------------------------------------------------


def test_a_client_pattern_runs_on_a_linear_time_engine_that_refuses_backreferences() -> None:
    with pytest.raises(PolicyError) as caught:
        MarkerPolicy(r"(a)\1")
    assert caught.value.param == "pattern"
    # Catastrophic for a backtracking engine (2^512 paths); RE2 answers at once.
    assert MarkerPolicy("(a+)+b").on_tokens(event("a" * 600)).action is Action.CONTINUE
    assert MarkerPolicy("(?s)(.|[^Z])*Z").on_tokens(event("y" * 600)).action is Action.CONTINUE
    assert MarkerPolicy(r"####\s*\d+\s").on_tokens(event("x\n#### 42\n")).action is Action.STOP


def test_a_routes_file_pattern_stays_on_python_re() -> None:
    trusted = r"(?<=#)### \d+\n"  # look-behind: Python's re only
    policy = build_policy("marker", {"pattern": trusted}, budget=100, trusted_patterns={trusted})
    assert policy.on_tokens(event("x#### 7\n")).action is Action.STOP
    with pytest.raises(PolicyError):
        build_policy("marker", {"pattern": trusted}, budget=100)


def test_a_lone_surrogate_in_the_text_does_not_break_a_client_pattern() -> None:
    assert MarkerPolicy("#### 1").on_tokens(event("\ud800#### 1")).action is Action.STOP


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("(" * 1000 + ")" * 1000, id="recursion"),
        pytest.param("a{4294967295}b{99999}", id="overflow"),
        pytest.param("a" * (MAX_CLIENT_PATTERN_CHARS + 1), id="too-long"),
        pytest.param(r"(x)\1", id="backreference"),
        pytest.param("[", id="invalid"),
        pytest.param("\ud800", id="lone-surrogate"),
    ],
)
def test_a_bad_client_pattern_is_a_400_naming_stopgate_params_pattern(gateway: Gateway, pattern: str) -> None:
    url, engine, _ = gateway
    r = completion(url, stopgate={"policy": "marker", "params": {"pattern": pattern}})
    assert_openai_error(r, 400, param="stopgate.params.pattern", says="pattern")
    assert not engine.stats.requests


def test_a_catastrophic_client_pattern_does_not_stall_the_request(gateway: Gateway) -> None:
    url, engine, _ = gateway
    engine.push(Script(pieces=["<think>", *["a"] * 40, "</think>", "\n#### 3"]))
    r = completion(url, timeout=20, stopgate={"policy": "marker", "params": {"pattern": "(a+)+b"}})
    assert r.status_code == 200, r.text
    assert r.json()["stopgate"]["stop_reason"] == "finished"


# -- 2. the cost bound ------------------------------------------------------------------


@pytest.mark.parametrize("params", [{"max_samples": 1000}, {"wave": 20000, "max_samples": 20000}])
def test_an_ensemble_over_the_sample_cap_is_a_400_and_reaches_no_engine(gateway: Gateway, params: Any) -> None:
    url, engine, _ = gateway
    r = completion(url, max_tokens=480, stopgate={"policy": "ensemble", "params": params})
    assert_openai_error(r, 400, param="stopgate.params.max_samples", says="max_ensemble_samples")
    assert not engine.stats.requests


def test_an_ensemble_over_the_cost_multiple_is_a_400_naming_the_setting(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any
) -> None:
    engine, upstream = fake_engine
    with gateway_factory(upstream, max_cost_multiple=4) as (url, _):
        r = completion(url, max_tokens=100, stopgate={"policy": "ensemble", "params": {"max_samples": 6}})
        assert_openai_error(r, 400, param="stopgate.params.max_samples", says="max_cost_multiple=4")
        assert "STOPGATE_MAX_COST_MULTIPLE" in r.json()["error"]["message"]
        ok = completion(url, max_tokens=100, stopgate={"policy": "ensemble", "params": {"max_samples": 4}})
        assert ok.status_code == 200, ok.text
    assert engine.stats.requests  # the smaller ensemble ran


def test_n_times_a_batch_of_prompts_is_bounded_by_the_cost_multiple(gateway: Gateway) -> None:
    url, engine, _ = gateway
    r = completion(url, prompt=["Q: 1+2=?\n"] * 4, n=8, max_tokens=10, stopgate={"policy": "none"})
    assert_openai_error(r, 400, param="n", says="max_cost_multiple=16")
    assert not engine.stats.requests


def test_probes_spend_only_what_the_cost_ceiling_leaves(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any
) -> None:
    """``probe_every: 1`` asked for a probe per token: 16 more engine requests. Now they must fit the ceiling."""
    engine, upstream = fake_engine
    engine.default = Script(pieces=["<think>", *["x"] * 30, "</think>", "\n#### 3"])
    with gateway_factory(upstream, max_cost_multiple=2) as (url, _):
        r = completion(
            url, max_tokens=40, stopgate={"policy": "convergence", "params": {"probe_every": 1}, "budget": 64}
        )
        assert r.status_code == 200, r.text
        tokens = r.json()["stopgate"]["tokens"]
    assert tokens["net"] <= 2 * 40
    probes = [req for req in engine.stats.requests if req.get("max_tokens") == 8]
    assert len(probes) <= (2 * 40 - 32 - 16) // 8  # the slack, in probes of probe_max_tokens


# -- 4. no steering the controller by proxy ---------------------------------------------


@pytest.fixture
def plane(fake_engine: tuple[FakeEngine, str], gateway_factory: Any, tmp_path: Path) -> Any:
    """A gateway whose route `arith` has a controller and the reference items a1..a3 (tests/test_control_plane)."""
    engine, upstream = fake_engine
    engine.default = Script(pieces=["<think>", "\n", "1", "+", "2", "=", "3", "\n", "</think>", "\n#### 3"])

    def start(**settings: Any) -> Any:
        settings.setdefault("admin_key", KEY)
        return gateway_factory(upstream, routes_file=routes_file(tmp_path), **settings)

    return engine, start


def test_a_reference_id_with_another_prompt_is_refused_exactly_like_an_unknown_id(plane: Any) -> None:
    engine, start = plane
    with start() as (url, _):
        unrelated = complete(url, prompt="Q: 9+9=?\n", reference_id="a1")  # a1 exists, with another prompt
        unknown = complete(url, prompt="Q: 9+9=?\n", reference_id="a9")
        assert complete(url, reference_id="a1").status_code == 200  # the item's own prompt
    assert_openai_error(unrelated, 400, param="reference_id")
    assert unrelated.json()["error"]["message"].replace("'a1'", "'a9'") == unknown.json()["error"]["message"]


@pytest.mark.parametrize(
    "fields",
    [{"max_tokens": 1}, {"temperature": 1.5}, {"top_p": 0.1}, {"stop": ["+"]}, {"min_tokens": 4}],
    ids=["max_tokens", "temperature", "top_p", "stop", "min_tokens"],
)
def test_gold_requests_that_change_generation_do_not_move_the_budget(plane: Any, fields: Any) -> None:
    _, start = plane
    with start() as (url, _):
        # Midway between the bounds, so right answers could tighten it and wrong ones (max_tokens 1) loosen it.
        auth = {"authorization": f"Bearer {KEY}"}
        assert httpx.put(f"{url}/admin/routes/arith/budget", json={"budget": 96}, headers=auth).status_code == 200
        adjustments = state(url)["controller"]["adjustments"]
        for _ in range(40):
            assert complete(url, reference_id="a1", **fields).status_code == 200
        s = state(url)
    assert s["samples"]["gold"] == 40 and s["budget"] == 96 and s["controller"]["adjustments"] == adjustments


def test_a_key_may_be_barred_from_sending_reference_ids(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any, tmp_path: Path
) -> None:
    _, upstream = fake_engine
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump({"keys": [{"name": "plain", "key": "sk-plain-client-0123456789", "reference_ids": False}]})
    )
    auth = {"authorization": "Bearer sk-plain-client-0123456789"}
    with gateway_factory(upstream, auth="keys", api_keys_file=keys, routes_file=routes_file(tmp_path)) as (url, _):
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "arith", "prompt": "Q: 1+2=?\n", "reference_id": "a1"},
            headers=auth,
            timeout=30,
        )
        ok = httpx.post(f"{url}/v1/completions", json={"model": "arith", "prompt": "Q"}, headers=auth, timeout=30)
    assert_openai_error(r, 403, param="reference_id")
    assert ok.status_code == 200


# -- 5. batch and engine fields -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["Q"] * 100_000, "n": 8}, "prompt"),
        ({"prompt": ["Q"] * 17, "n": 2, "stopgate": {"policy": "none"}}, "prompt"),
        ({"priority": -1000}, "priority"),
        ({"ignore_eos": True, "min_tokens": 480}, "ignore_eos"),
        ({"best_of": 20}, "best_of"),
        ({"logprobs": 1_000_000}, "logprobs"),
        ({"stop": [f"s{i}" for i in range(1000)]}, "stop"),
        ({"stop": "x" * 10_000}, "stop"),
        ({"logit_bias": {str(i): 1 for i in range(1000)}}, "logit_bias"),
    ],
    ids=["batch-100k", "batch-17", "priority", "ignore_eos", "best_of", "logprobs", "stops", "long-stop", "bias"],
)
def test_unbounded_engine_fields_are_400s_naming_the_field(gateway: Gateway, fields: Any, param: str) -> None:
    url, engine, _ = gateway
    r = completion(url, **fields)
    assert_openai_error(r, 400, param=param)
    assert not engine.stats.requests


def test_a_route_may_open_priority_to_its_clients(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any, tmp_path: Path
) -> None:
    engine, upstream = fake_engine
    routes = tmp_path / "routes.yaml"
    route = {"aliases": ["tinyreason"], "upstream_model": "tinyreason", "client_fields": ["priority"]}
    routes.write_text(yaml.safe_dump({"routes": {"arith": route}}))
    with gateway_factory(upstream, routes_file=routes) as (url, _):
        assert completion(url, priority=5, logprobs=2, stop=["\n\n"]).status_code == 200
    assert engine.stats.requests[0]["priority"] == 5


# -- 6. slow bodies and one key's share ----------------------------------------------------


async def _slow_body(url: str, key: str) -> bytes:
    """A request whose body never finishes (Content-Length 1000, one byte sent); the gateway's answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
        "content-type: application/json\r\ncontent-length: 1000\r\n\r\n{"
    )
    writer.write(head.encode())
    try:
        return await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()


def test_one_key_with_slow_bodies_cannot_hold_every_slot(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any, tmp_path: Path
) -> None:
    _, upstream = fake_engine
    settings = {"auth": "keys", "api_keys_file": keys_file(tmp_path), "routes_file": two_routes(tmp_path)}
    with gateway_factory(upstream, max_in_flight=4, body_timeout_s=3, **settings) as (url, _):

        async def attack() -> tuple[list[bytes], httpx.Response]:
            slow = [asyncio.ensure_future(_slow_body(url, KEY_ALL)) for _ in range(4)]
            await asyncio.sleep(1.0)  # the slow ones hold their places now
            async with httpx.AsyncClient(timeout=30) as client:
                other = await client.post(
                    f"{url}/v1/completions", json={"model": "other", "prompt": "Q"}, headers=bearer(KEY_OTHER)
                )
            return list(await asyncio.gather(*slow)), other

        answers, other = asyncio.run(attack())
    assert other.status_code == 200, other.text
    assert sum(a.startswith(b"HTTP/1.1 429") for a in answers) == 2, [a[:20] for a in answers]
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(timed_out) == 2 and all(b"body_timeout_s" in a for a in timed_out)


# -- 7. the admin key --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["x", "short-key-15chr"])
def test_an_admin_key_under_16_characters_stops_start_up(value: str) -> None:
    with pytest.raises(ConfigError, match="admin_key.*16 characters"):
        build_settings(upstream_url="http://127.0.0.1:9", admin_key=value)


def test_an_empty_admin_key_turns_the_admin_api_off(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, upstream = fake_engine
    monkeypatch.setenv("STOPGATE_ADMIN_KEY", "")
    with gateway_factory(upstream) as (url, _):
        assert httpx.get(f"{url}/admin/routes", timeout=10).status_code == 404
        assert httpx.put(f"{url}/admin/routes/tinyreason/budget", json={"budget": 8}, timeout=10).status_code == 404


# -- 13. what the public schema and headers say ------------------------------------------------


def test_the_public_schema_lists_no_admin_paths_and_the_docs_pages_are_a_setting(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any
) -> None:
    _, upstream = fake_engine
    with gateway_factory(upstream, admin_key=KEY) as (url, _):
        public = httpx.get(f"{url}/openapi.json", timeout=10)
        admin = httpx.get(f"{url}/openapi.json", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
        docs = [httpx.get(f"{url}{page}", timeout=10).status_code for page in ("/docs", "/redoc")]
        r = completion(url)
    assert "/v1/completions" in public.json()["paths"]
    assert not [p for p in public.json()["paths"] if p.startswith("/admin")]
    assert "/admin/routes/{route}/target" in admin.json()["paths"]
    assert docs == [404, 404]
    with gateway_factory(upstream, api_docs=True) as (url, _):
        assert httpx.get(f"{url}/docs", timeout=10).status_code == 200
    assert r.status_code == 200  # (no `server: uvicorn` from `stopgate serve`: tests/test_abuse.py)


def test_admin_bearer_parsing_is_the_clients(fake_engine: tuple[FakeEngine, str], gateway_factory: Any) -> None:
    _, upstream = fake_engine
    with gateway_factory(upstream, admin_key=KEY) as (url, _):
        for header in (f"Bearer  {KEY}", f"bearer {KEY}", f"BEARER {KEY}"):
            assert httpx.get(f"{url}/admin/routes", headers={"authorization": header}, timeout=10).status_code == 200
        assert httpx.get(f"{url}/admin/routes", headers={"authorization": "Bearer"}, timeout=10).status_code == 401


# -- 8. 500s that were the client's mistakes -----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('{"model": "tinyreason", "prompt": "\\ud800"}', "prompt"),
        ('{"model": "tinyreason", "messages": [{"role": "user", "content": "a\\udfffb"}]}', "messages.content"),
        ('{"model": "tinyreason", "prompt": "Q", "temperature": NaN}', None),
        ('{"model": "tinyreason", "prompt": "Q", "top_p": -Infinity}', None),
    ],
    ids=["surrogate-prompt", "surrogate-chat", "nan", "infinity"],
)
def test_lone_surrogates_and_nan_are_400s(gateway: Gateway, raw: str, param: str | None) -> None:
    url, engine, _ = gateway
    path = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
    r = httpx.post(f"{url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(r, 400, param=param)
    assert not engine.stats.requests


def test_a_huge_budget_is_a_400(gateway: Gateway) -> None:
    url, engine, _ = gateway
    r = completion(url, stopgate={"budget": 1e30})
    assert_openai_error(r, 400, param="stopgate.budget")


def test_admin_input_errors_are_400s(plane: Any) -> None:
    _, start = plane
    deep = {"id": "m1", "prompt": "Q: 4+4=?\n", "answers": ["8"], "route": "arith"}
    deep_line = json.dumps(deep)[:-1] + ', "meta": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"
    surrogate = json.dumps({**deep, "prompt": "\ud800"})
    with start() as (url, _):
        auth = {"authorization": f"Bearer {KEY}"}
        r = httpx.put(f"{url}/admin/routes/arith/target", json={"target": 0.1}, headers=auth, timeout=10)
        assert_openai_error(r, 400, param="target", says="drift_drop")
        for line in (deep_line, surrogate, json.dumps({**deep, "id": "caf\u00e9"}), json.dumps({**deep, "x": NAN})):
            r = httpx.put(f"{url}/admin/routes/arith/references/x", content=line + "\n", headers=auth, timeout=10)
            assert_openai_error(r, 400, param="body")


# -- 9. reference ids, background loops, deleting a set ------------------------------------------


class _BrokenEngine:
    """An engine client whose every stream fails with a non-gateway error (a bug, bad data)."""

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any], *, request_id: str) -> AsyncIterator[Any]:
        raise UnicodeEncodeError("ascii", request_id, 0, 1, "not ascii")
        yield  # pragma: no cover


def test_the_canary_loop_survives_any_exception_and_counts_it(tmp_path: Path) -> None:
    settings = Settings(
        upstream_url="http://127.0.0.1:9",
        routes_file=routes_file(tmp_path, canary_per_minute=60.0),
        eval_share=100.0,
        state_path=":memory:",
    )
    metrics = Metrics(CollectorRegistry())
    plane = ControlPlane(settings, settings.load_routes(), open_store(":memory:"), metrics)
    replay = runner(_BrokenEngine(), vllm=settings.upstream_is_vllm)  # type: ignore[arg-type]
    sampler = Sampler(settings, plane, metrics, run=replay, in_flight=lambda: 0)
    plane.count_live("arith", 10_000)
    naps = 0

    async def sleep(seconds: float) -> None:
        nonlocal naps
        naps += 1
        if naps > 3:
            raise asyncio.CancelledError

    async def run() -> None:
        with pytest.raises(asyncio.CancelledError):
            await sampler.run_canaries(sleep=sleep)

    asyncio.run(run())
    assert metrics.registry.get_sample_value("stopgate_background_errors_total", {"task": "canary"}) == 3


def test_a_reference_set_can_be_deleted_and_stays_deleted(plane: Any, tmp_path: Path) -> None:
    _, start = plane
    db = str(tmp_path / "state.db")
    auth = {"authorization": f"Bearer {KEY}"}
    line = json.dumps({"id": "b1", "prompt": "Q: 7+7=?\n", "answers": ["14"], "route": "arith"}) + "\n"
    with start(state_path=db) as (url, _):
        assert httpx.put(f"{url}/admin/routes/arith/references/x", content=line, headers=auth).status_code == 200
        r = httpx.delete(f"{url}/admin/routes/arith/references/x", headers=auth, timeout=10)
        assert r.status_code == 200 and r.json()["references"] == {"sets": ["refs"], "items": 3}
        r = httpx.delete(f"{url}/admin/routes/arith/references/refs", headers=auth, timeout=10)  # the routes file's
        assert r.status_code == 200 and r.json()["references"] == {"sets": [], "items": 0}
        missing = httpx.delete(f"{url}/admin/routes/arith/references/nope", headers=auth, timeout=10)
        anonymous = httpx.delete(f"{url}/admin/routes/arith/references/x", timeout=10)
    assert_openai_error(missing, 404, param="name")
    assert anonymous.status_code == 401
    with start(state_path=db) as (url, _):
        assert state(url)["references"] == {"sets": [], "items": 0}
        assert complete(url, reference_id="a1").status_code == 400


# -- 10. a chunked admin upload ----------------------------------------------------------------


def test_a_chunked_upload_is_counted_against_the_cap_while_it_streams(plane: Any) -> None:
    _, start = plane
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        chunk = b'{"id": "z", "prompt": "Q", "answers": ["1"], "route": "arith"}\n' * (1 << 14)  # ~1 MB
        while sent < 200 << 20:
            sent += len(chunk)
            yield chunk

    with start() as (url, _):
        auth = {"authorization": f"Bearer {KEY}"}
        # No Content-Length: the old cap looked only at that header, buffered all 200 MB, then said 400.
        r = httpx.put(f"{url}/admin/routes/arith/references/big", content=body(), headers=auth, timeout=60)
        assert_openai_error(r, 413, says="too large")
        assert state(url)["references"]["sets"] == ["refs"]


# -- 11. a streaming ensemble whose client leaves early ---------------------------------------------


def test_a_streaming_ensemble_is_cancelled_when_its_client_leaves_before_the_first_chunk(gateway: Gateway) -> None:
    url, engine, _ = gateway
    engine.default = Script(pieces=["<think>", *["x"] * 400], delay_s=0.05)  # 20 s per sample
    body = {"model": "tinyreason", "prompt": "Q", "stream": True, "stopgate": {"policy": "ensemble"}}
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0)) as r:
            r.read()
    assert wait_until(lambda: engine.stats.cancelled >= 2 and engine.stats.active == 0, timeout=10), (
        engine.stats.cancelled,
        engine.stats.active,
    )


# -- 12. an engine that ignores max_tokens ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_the_gateway_enforces_max_tokens_itself(gateway: Gateway, stream: bool) -> None:
    url, engine, _ = gateway
    engine.default = Script(pieces=["<think>", *["x"] * 3777], delay_s=0.001, ignore_max_tokens=True)
    body = {"max_tokens": 20, "stopgate": {"policy": "none", "budget": 4000}}
    if stream:
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "Q", "stream": True, **body}
        ) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        final = events[-1]
        text = "".join(c["text"] for e in events for c in e["choices"])
    else:
        final = completion(url, **body).json()
        text = final["choices"][0]["text"]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 20 and len(text) == 20 + len("<think>") - 1
    assert wait_until(lambda: engine.stats.active == 0, timeout=10)
    assert engine.stats.chunks_sent < 3777
