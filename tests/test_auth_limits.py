"""Client keys, per-key routes, request limits, backpressure and the graceful drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.engine.embedded import free_port
from gateway.http.app import create_app
from gateway.settings import ConfigError, Settings
from loadtest.fake_engine import FakeEngine, Script
from tests.support.auth import KEY_ALL, KEY_OTHER, bearer, keys_file, two_routes
from tests.support.cli import assert_clean_failure, run_cli
from tests.support.waiting import wait_until
from tests.support.wire import assert_openai_error


@pytest.fixture
def keyed(fake_engine: tuple[FakeEngine, str], gateway_factory: Any, tmp_path: Path) -> Any:
    engine, upstream = fake_engine
    with gateway_factory(
        upstream, auth="keys", api_keys_file=keys_file(tmp_path), routes_file=two_routes(tmp_path)
    ) as (url, _):
        yield url, engine


def post(url: str, model: str = "arith", headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions", json={"model": model, "prompt": "Q: 1+2=?\n", **body}, headers=headers, timeout=30
    )


# -- keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer"}, {"authorization": "Basic abc"}, bearer("nope")])
def test_a_missing_or_wrong_key_is_a_401_and_reaches_no_engine(keyed: Any, headers: dict[str, str]) -> None:
    url, engine = keyed
    r = post(url, headers=headers)
    assert_openai_error(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    assert engine.stats.requests == []
    assert_openai_error(httpx.get(f"{url}/v1/models", headers=headers, timeout=10), 401)


def test_a_key_may_use_only_its_routes(keyed: Any) -> None:
    url, engine = keyed
    assert post(url, headers=bearer(KEY_ALL)).status_code == 200
    assert post(url, model="other", headers=bearer(KEY_OTHER)).status_code == 200
    r = post(url, model="tinyreason", headers=bearer(KEY_OTHER))
    assert_openai_error(r, 403, param="model")
    assert "arith" in r.json()["error"]["message"] and KEY_OTHER not in r.text
    assert len(engine.stats.requests) == 2
    names = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=bearer(KEY_OTHER), timeout=10).json()["data"]}
    assert names == {"other"}


def test_health_ready_and_metrics_need_no_key(keyed: Any) -> None:
    url, _ = keyed
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200


def test_keys_are_required_unless_auth_is_off_explicitly(fake_engine: Any) -> None:
    _, upstream = fake_engine
    with pytest.raises(ConfigError, match="--auth off"):
        create_app(Settings(upstream_url=upstream, auth="keys"))
    assert_clean_failure(
        run_cli("serve", "--upstream", upstream, "--port", str(free_port()), env={"STOPGATE_AUTH": "keys"}),
        "api_keys_file",
    )


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ([{"name": "a"}], "exactly one of 'key' or 'sha256'"),
        ([{"name": "a", "key": "short"}], "keys[0].key"),
        ([{"name": "a", "sha256": "xyz"}], "keys[0].sha256"),
        ([{"name": "a", "key": KEY_ALL, "routes": ["nope"]}], "unknown routes ['nope']"),
        ([{"name": "a", "key": KEY_ALL}, {"name": "a", "key": KEY_OTHER}], "unique"),
        ([], "non-empty"),
    ],
)
def test_a_bad_keys_file_stops_start_up_naming_the_entry(
    fake_engine: Any, tmp_path: Path, keys: list[Any], says: str
) -> None:
    _, upstream = fake_engine
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": keys}))
    with pytest.raises(ConfigError) as err:
        create_app(Settings(upstream_url=upstream, auth="keys", api_keys_file=path, routes_file=two_routes(tmp_path)))
    assert says in str(err.value) and KEY_ALL not in str(err.value)


# -- limits -------------------------------------------------------------------------


def test_a_prompt_over_the_character_limit_is_a_400_naming_the_limit(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any
) -> None:
    engine, upstream = fake_engine
    with gateway_factory(upstream, max_prompt_chars=100) as (url, _):
        r = post(url, prompt="x" * 101)
        assert_openai_error(r, 400, param="prompt")
        assert "max_prompt_chars" in r.json()["error"]["message"] and r.json()["error"]["code"] == "limit_exceeded"
        messages = [{"role": "user", "content": "y" * 60}, {"role": "user", "content": "z" * 60}]
        chat = {"model": "arith", "messages": messages}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=10)
        assert_openai_error(r, 400, param="messages")
        assert post(url, prompt="x" * 100).status_code == 200
    assert len(engine.stats.requests) == 1


# -- backpressure -------------------------------------------------------------------


def _hold(url: str, n: int, model: str = "arith") -> list[threading.Thread]:
    threads = [threading.Thread(target=post, args=(url, model)) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_past_max_in_flight_the_gateway_answers_429_with_retry_after(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any
) -> None:
    engine, upstream = fake_engine
    engine.default = Script(stall_s=3.0)
    with gateway_factory(upstream, max_in_flight=2) as (url, registry):
        held = _hold(url, 2)
        assert wait_until(lambda: len(engine.stats.requests) == 2)
        r = post(url)
        assert_openai_error(r, 429)
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
        for t in held:
            t.join(10)
        assert post(url).status_code == 200  # places are given back
        labels = {"route": "unknown", "policy": "unknown", "stop_reason": "error", "code": "429"}
        assert registry.get_sample_value("stopgate_requests_total", labels) == 1
        assert registry.get_sample_value("stopgate_in_flight_requests") == 0
    assert len(engine.stats.requests) == 3


def test_a_route_limit_turns_away_only_that_route(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any, tmp_path: Path
) -> None:
    engine, upstream = fake_engine
    engine.default = Script(stall_s=3.0)
    with gateway_factory(upstream, routes_file=two_routes(tmp_path, max_in_flight=1)) as (url, _):
        held = _hold(url, 1)
        assert wait_until(lambda: len(engine.stats.requests) == 1)
        r = post(url)
        assert_openai_error(r, 429)
        assert "arith" in r.json()["error"]["message"]
        engine.default = Script()
        assert post(url, model="other").status_code == 200
        for t in held:
            t.join(10)


# -- graceful drain -----------------------------------------------------------------


def test_sigterm_drains_in_flight_streams_and_refuses_new_connections(fake_engine: tuple[FakeEngine, str]) -> None:
    engine, upstream = fake_engine
    engine.default = Script(pieces=["<think>", "\n"] + ["a"] * 40 + ["</think>", "\n#### 3"], delay_s=0.05)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--upstream", upstream, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "STOPGATE_DRAIN_TIMEOUT_S": "20"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _up(url), timeout=30)
        body: list[bytes] = []

        def stream() -> None:
            payload = {"model": "arith", "prompt": "Q: 1+2=?\n", "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=30) as r:
                body.extend(r.iter_bytes())

        reader = threading.Thread(target=stream)
        reader.start()
        assert wait_until(lambda: engine.stats.active == 1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # the listener is closed: no new requests
            httpx.get(f"{url}/health", timeout=2)
        reader.join(30)
        assert b"".join(body).endswith(b"data: [DONE]\n\n") and b"#### 3" in b"".join(body)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert engine.stats.cancelled == 0  # the stream finished; nothing was cut


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"model": "arith", "prompt": "\xff\xfe"}', "not valid UTF-8"),
        (b'{"model": "arith", "prompt": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests too deeply"),
        (b"[" * 200_000, "nests too deeply"),
    ],
)
def test_invalid_utf8_and_nesting_bombs_are_400s_and_the_gateway_goes_on(gateway: Any, body: bytes, says: str) -> None:
    url, engine, _ = gateway
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=10)
    assert_openai_error(r, 400)
    assert says in r.json()["error"]["message"]
    assert post(url).status_code == 200
    assert len(engine.stats.requests) == 1
