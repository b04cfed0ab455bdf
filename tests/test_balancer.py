"""Several engine replicas: balancing, the circuit breaker (open, fail fast, probe, recover), retries, total timeout."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from gateway.engine.embedded import free_port
from gateway.engine.pool import Breaker
from gateway.http.server import serve_in_thread
from loadtest.fake_engine import FakeEngine, Script
from tests.support.wire import assert_openai_error, sse_events

# Under each HTTP stack the engine client can use (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("engine_transport")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_consecutive_failures_and_is_probed_after_the_cooldown() -> None:
    clock = Clock()
    breaker = Breaker(failures=3, cooldown_s=5.0, clock=clock)
    assert not breaker.failure() and not breaker.failure()
    breaker.success()  # not consecutive any more
    assert not breaker.failure() and not breaker.failure() and breaker.failure()
    assert breaker.is_open and not breaker.due_for_probe()
    clock.now += 5.0
    assert breaker.due_for_probe()
    assert not breaker.failure()  # a failed probe: another cooldown
    assert breaker.is_open and not breaker.due_for_probe()
    clock.now += 5.0
    breaker.success()
    assert not breaker.is_open and breaker.consecutive == 0


def post(url: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x", **body}, timeout=30)


def test_a_dead_replica_is_skipped_and_the_other_serves(gateway_factory: Any) -> None:
    live = FakeEngine()
    dead = f"http://127.0.0.1:{free_port()}"
    with serve_in_thread(live) as live_url, gateway_factory(f"{dead},{live_url}", breaker_failures=2) as (url, reg):
        for _ in range(6):
            assert post(url).status_code == 200  # a refused connection never reached an engine: retried
        assert len(live.stats.requests) == 6
        # The dead replica failed twice, then its breaker opened: later requests go straight to the live one.
        assert (
            reg.get_sample_value(
                "stopgate_requests_total",
                {"route": "arith", "policy": "none", "stop_reason": "finished", "code": "200"},
            )
            == 6
        )


def test_the_breaker_fails_fast_while_the_engine_is_down_and_recovers_when_it_returns(gateway_factory: Any) -> None:
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    with gateway_factory(upstream, breaker_failures=2, breaker_cooldown_s=0.5) as (url, _):
        for _ in range(2):
            assert_openai_error(post(url), 503)  # unreachable
        r = post(url)
        assert_openai_error(r, 503)
        assert r.json()["error"]["code"] == "circuit_open" and r.headers["retry-after"] == "5"
        # Failing fast: no replica was tried (a failed probe says "every replica failed"), so no connection.
        assert "circuit breaker is open" in r.json()["error"]["message"]
        engine = FakeEngine()
        with serve_in_thread(engine, port=port):
            time.sleep(0.6)  # the cooldown passes; the next request probes the engine first
            assert post(url).status_code == 200
            assert post(url).status_code == 200
        assert len(engine.stats.requests) == 2


def test_an_engine_4xx_does_not_open_the_breaker(fake_engine: tuple[FakeEngine, str], gateway_factory: Any) -> None:
    engine, upstream = fake_engine
    with gateway_factory(upstream, breaker_failures=2) as (url, _):
        for _ in range(4):
            engine.queue.append(Script(status=400, error_message="prompt too long"))
            assert_openai_error(post(url), 400)
        assert post(url).status_code == 200


def test_requests_spread_over_healthy_replicas(gateway_factory: Any) -> None:
    a, b = FakeEngine(default=Script(stall_s=0.3)), FakeEngine(default=Script(stall_s=0.3))
    with serve_in_thread(a) as ua, serve_in_thread(b) as ub, gateway_factory(f"{ua},{ub}") as (url, _):
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: post(url).status_code, range(8)))
    assert codes == [200] * 8
    assert len(a.stats.requests) >= 2 and len(b.stats.requests) >= 2  # least in flight, not all on one


def test_a_stream_past_the_total_timeout_ends_with_a_504_event(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any
) -> None:
    engine, upstream = fake_engine
    engine.default = Script(pieces=["<think>"] + ["x"] * 40, delay_s=0.05)  # 2 s, each gap well under the read timeout
    with gateway_factory(upstream, total_timeout_s=0.5) as (url, _):
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x", "stream": True}
        ) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "upstream_timeout"
        engine.default = Script()
        assert post(url).status_code == 200


@pytest.mark.parametrize("urls", ["http://a:1,ftp://b", "http://a:1,"])
def test_bad_upstream_lists_are_refused(urls: str) -> None:
    from gateway.settings import ConfigError, build_settings

    with pytest.raises(ConfigError, match="upstream_url"):
        build_settings(upstream_url=urls)
