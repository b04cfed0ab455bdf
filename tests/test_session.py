"""The generation session against the scripted fake engine: probes, stops, forced answers, accounting."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from loadtest.fake_engine import Script
from policies import registry
from policies.base import CONTINUE, Decision, ProbeResult, TokenEvent
from tests.support.engine import kind
from tests.support.session import PROMPT, THINKING, complete
from tests.support.waiting import wait_until
from tests.support.wire import assert_openai_error, sse_events


def test_budget_forces_answer_when_thinking_exceeds_budget(session_gateway: Any) -> None:
    engine, start = session_gateway
    with start(Script(pieces=THINKING, delay_s=0.002)) as (url, registry_):
        body = complete(url, stopgate={"budget": 20})
    text = body["choices"][0]["text"]
    assert text == "".join(THINKING[:20]) + "</think>\n#### 3"
    ext = body["stopgate"]
    assert ext["stop_reason"] == "budget" and ext["budget"] == 20 and ext["policy"] == "none"
    assert ext["tokens"]["thinking"] == 20 and ext["tokens"]["forced"] == 1
    assert body["usage"]["completion_tokens"] == 21
    assert body["choices"][0]["finish_reason"] == "stop"
    forced = [r for r, h in zip(engine.stats.requests, engine.stats.headers, strict=True) if kind(h) == "forced"][0]
    # The forced answer continues the raw prompt plus what was generated, then closes the reasoning.
    assert forced["prompt"] == PROMPT + "".join(THINKING[:20]) + "</think>\n####"
    assert forced["max_tokens"] == 16
    assert wait_until(lambda: engine.stats.active == 0)
    assert engine.stats.cancelled == 1  # the main stream was closed, so the engine aborted it
    assert registry_.get_sample_value("stopgate_tokens_total", {"route": "arith", "kind": "forced"}) == 1.0


def test_streamed_early_stop_sends_thinking_then_suffix_then_forced_answer(session_gateway: Any) -> None:
    _, start = session_gateway
    with start(Script(pieces=THINKING)) as (url, _):
        body = {"model": "tinyreason", "prompt": PROMPT, "stream": True, "stopgate": {"budget": 10}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(THINKING[:10]) + "</think>\n#### 3"
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["stopgate"]["stop_reason"] == "budget"
    assert chunks[-1]["usage"]["completion_tokens"] == 11
    assert len({c["id"] for c in chunks}) == 1  # one response id throughout


def test_convergence_stops_when_the_last_probe_answers_agree(session_gateway: Any) -> None:
    engine, start = session_gateway
    with start(Script(pieces=THINKING, delay_s=0.01), probe=Script(pieces=[" 3"])) as (url, _):
        body = complete(url, stopgate={"policy": "convergence", "params": {"probe_every": 16, "window": 2}})
    ext = body["stopgate"]
    assert ext["stop_reason"] == "converged" and ext["policy"] == "convergence"
    assert ext["probes"]["completed"] >= 2
    tokens = ext["tokens"]
    assert 32 <= tokens["thinking"] < len(THINKING)
    assert tokens["probe"] == ext["probes"]["completed"]  # one token per probe answer
    assert tokens["probe_prompt"] == 7 * ext["probes"]["completed"]
    assert tokens["net"] == tokens["thinking"] + tokens["answer"] + tokens["forced"] + tokens["probe"]
    assert body["choices"][0]["text"].endswith("</think>\n#### 3")
    probes = [r for r, h in zip(engine.stats.requests, engine.stats.headers, strict=True) if kind(h) == "probe"]
    assert probes[0]["prompt"] == PROMPT + "".join(THINKING[:16]) + "</think>\n####"
    assert probes[0]["temperature"] == 0.0 and probes[0]["max_tokens"] == 8


def test_convergence_does_not_stop_when_probe_answers_disagree(session_gateway: Any) -> None:
    """Dynasor issue #25: w non-empty answers are not enough, they must be equal."""
    _, start = session_gateway
    answers = itertools.count()
    probe = lambda: Script(pieces=[f" {next(answers)}"])  # noqa: E731
    with start(Script(pieces=THINKING[:80], delay_s=0.01), probe=probe) as (url, _):
        body = complete(url, stopgate={"policy": "convergence", "params": {"probe_every": 16, "window": 2}})
    assert body["stopgate"]["stop_reason"] == "finished"
    assert body["stopgate"]["probes"]["completed"] >= 2
    assert body["choices"][0]["text"] == "".join(THINKING[:80])


def test_probes_run_beside_the_main_stream_without_pausing_it(session_gateway: Any) -> None:
    engine, start = session_gateway
    main = Script(pieces=THINKING[:100], delay_s=0.005)  # about 0.5 s of streaming
    with start(main, probe=Script(pieces=[" 3"], stall_s=5.0)) as (url, _):
        body = complete(url, stopgate={"policy": "convergence", "params": {"probe_every": 10, "window": 2}})
    assert body["stopgate"]["stop_reason"] == "finished"
    probes = body["stopgate"]["probes"]
    # Two may run at once; later ones are skipped while they stall, until the oldest is 64 tokens stale and
    # is replaced; every one is cancelled in the end, none answered. The skips are the proof that the stream
    # went on: it passed probe points while earlier probes were still stalled (a stream that paused for a
    # probe would have none in flight at the next point, so nothing to skip).
    assert 3 <= probes["launched"] <= 4 and probes["skipped"] >= 4
    assert probes["cancelled"] == probes["launched"] and probes["completed"] == 0
    assert wait_until(lambda: engine.stats.active == 0)


def test_probe_count_is_bounded_per_request(session_gateway: Any) -> None:
    _, start = session_gateway
    answers = itertools.count()
    probe = lambda: Script(pieces=[f" {next(answers)}"])  # noqa: E731
    with start(Script(pieces=THINKING, delay_s=0.002), probe=probe, max_probes=3) as (url, _):
        body = complete(url, stopgate={"policy": "convergence", "params": {"probe_every": 4, "window": 2}})
    assert body["stopgate"]["probes"]["launched"] == 3


def test_client_disconnect_during_a_probe_leaves_nothing_running(session_gateway: Any) -> None:
    engine, start = session_gateway
    main = Script(pieces=THINKING, delay_s=0.02)
    with start(main, probe=Script(pieces=[" 3"], stall_s=30)) as (url, _):
        body = {
            "model": "tinyreason",
            "prompt": PROMPT,
            "stream": True,
            "stopgate": {"policy": "convergence", "params": {"probe_every": 4, "window": 3}},
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n > 20:
                    break
        assert wait_until(lambda: engine.stats.active == 0, timeout=5)
        assert engine.stats.cancelled >= 2  # the main stream and at least one probe


def test_chat_forced_answer_continues_the_partial_assistant_message(session_gateway: Any) -> None:
    engine, start = session_gateway
    with start(Script(pieces=THINKING)) as (url, _):
        msgs = [{"role": "user", "content": "Q: 1+2=?"}]
        r = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "tinyreason", "messages": msgs, "stopgate": {"budget": 12}}
        )
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert content == "".join(THINKING[:12]) + "</think>\n#### 3"
    forced = [r for r, h in zip(engine.stats.requests, engine.stats.headers, strict=True) if kind(h) == "forced"][0]
    assert forced["messages"][-1] == {"role": "assistant", "content": "".join(THINKING[:12]) + "</think>\n####"}
    assert forced["continue_final_message"] is True and forced["add_generation_prompt"] is False


def test_route_policy_applies_without_a_request_override(session_gateway: Any) -> None:
    _, start = session_gateway
    policy = {"name": "convergence", "params": {"probe_every": 8, "window": 2}}
    with start(Script(pieces=THINKING, delay_s=0.01), policy=policy) as (url, _):
        body = complete(url)
    assert body["stopgate"]["policy"] == "convergence" and body["stopgate"]["stop_reason"] == "converged"


def test_marker_stops_once_the_answer_is_complete(session_gateway: Any) -> None:
    engine, start = session_gateway
    pieces = ["<think>", "\n", "x", "</think>", "\n", "#### ", "4", "2", "\n", "and more"] + ["z"] * 200
    with start(Script(pieces=pieces, delay_s=0.002)) as (url, _):
        body = complete(url, stopgate={"policy": "marker", "params": {"pattern": r"####\s*\d+\s"}})
    assert body["stopgate"]["stop_reason"] == "answer_complete"
    assert body["choices"][0]["text"] == "<think>\nx</think>\n#### 42\n"
    assert not any(kind(h) == "forced" for h in engine.stats.headers)  # the answer was already there


def test_a_plain_string_marker_is_also_the_engines_stop_string(session_gateway: Any) -> None:
    engine, start = session_gateway
    cue = ["<think>", "\n", "1+2=3", "\ncheck\n"]
    with start(Script(pieces=cue + ["1+2=3"] * 200, delay_s=0.002)) as (url, _):
        default = engine.responder

        def respond(body: dict[str, Any], headers: dict[str, str]) -> Script:
            if kind(headers) == "main" and "\ncheck\n" in (body.get("stop") or []):
                return Script(pieces=cue)  # a vLLM engine ends the sequence at the stop string itself
            return default(body, headers)

        engine.responder = respond
        marker = {"policy": "marker", "params": {"pattern": r"\ncheck\n"}}
        bodies = [
            complete(url, stopgate=marker),
            complete(url, stopgate={"policy": "marker", "params": {"pattern": r"\ncheck\s"}}),  # a regex
            complete(url, stop=["zzz"], stopgate=marker),  # the client's own stop strings win
        ]
    mains = [r for r, h in zip(engine.stats.requests, engine.stats.headers, strict=True) if kind(h) == "main"]
    assert mains[0]["stop"] == ["\ncheck\n"] and mains[0]["include_stop_str_in_output"] is True
    assert "stop" not in mains[1] and "include_stop_str_in_output" not in mains[1]
    assert mains[2]["stop"] == ["zzz"] and "include_stop_str_in_output" not in mains[2]
    for body in bodies:  # the client sees the same answer whichever side stopped
        assert body["stopgate"]["stop_reason"] == "answer_complete"
        assert body["choices"][0]["text"] == "".join(cue) + "</think>\n#### 3"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["stopgate"]["tokens"]["thinking"] == len(cue)


def test_confidence_stops_on_a_confident_probe(session_gateway: Any, fake_engine: Any) -> None:
    _, start = session_gateway
    with start(Script(pieces=THINKING, delay_s=0.01)) as (url, _):
        body = complete(url, stopgate={"policy": "confidence", "params": {"probe_every": 16, "threshold": 0.5}})
    # The fake engine sends no logprobs, so confidence never has evidence: it must not stop.
    assert body["stopgate"]["stop_reason"] == "finished"


@pytest.mark.parametrize(
    ("stopgate", "says"),
    [
        ({"policy": "dynasor"}, "unknown policy 'dynasor'"),
        ({"policy": "convergence", "params": {"window": 0}}, "window"),
        ({"policy": "convergence", "params": {"windw": 2}}, "no parameter 'windw'"),
        ({"policy": "confidence", "params": {"threshold": 1.5}}, "threshold"),
        ({"policy": "marker", "params": {"pattern": "(unclosed"}}, "pattern"),
        ({"budget": 0}, "budget"),
        ({"policy": 3}, "policy"),
    ],
)
def test_bad_stopping_settings_are_a_400(session_gateway: Any, stopgate: Any, says: str) -> None:
    _, start = session_gateway
    with start(Script()) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tinyreason", "prompt": PROMPT, "stopgate": stopgate})
        err = assert_openai_error(r, 400, param=r.json()["error"]["param"], says=says)
        assert err["param"].startswith("stopgate")
        complete(url)  # still serving


@dataclass
class _Exploding:
    name: str = field(default="exploding", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    engine_params: dict[str, Any] = field(default_factory=dict, init=False)
    engine_logprobs: int = field(default=0, init=False)

    def on_tokens(self, event: TokenEvent) -> Decision:
        if event.thinking_tokens > 5:
            raise ZeroDivisionError("policy bug")
        return CONTINUE

    def on_probe(self, result: ProbeResult) -> Decision:
        return CONTINUE


def test_a_policy_that_raises_ends_only_its_request(session_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STREAM_POLICIES, "exploding", _Exploding)
    _, start = session_gateway
    with start(Script(pieces=THINKING)) as (url, registry_):
        body = {"model": "tinyreason", "prompt": PROMPT, "stream": True, "stopgate": {"policy": "exploding"}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["type"] == "policy_error" and "policy bug" in events[-2]["error"]["message"]
        r2 = httpx.post(
            f"{url}/v1/completions", json={"model": "tinyreason", "prompt": PROMPT, "stopgate": {"policy": "exploding"}}
        )
        assert_openai_error(r2, 500, says="policy bug")
        labels = {"route": "arith", "policy": "exploding", "stop_reason": "error", "code": "500"}
        assert registry_.get_sample_value("stopgate_requests_total", labels) == 2.0
        complete(url)  # the gateway goes on


def test_ensemble_stops_after_a_unanimous_first_wave(session_gateway: Any) -> None:
    engine, start = session_gateway
    with start(Script(pieces=["<think>", "\n", "1+2=3\n", "</think>", "\n#### 3"])) as (url, _):
        body = complete(url, stopgate={"policy": "ensemble", "params": {"wave": 2, "max_samples": 6}})
    ext = body["stopgate"]
    assert ext["stop_reason"] == "ensemble_unanimous"
    assert ext["ensemble"]["samples"] == 2 and ext["ensemble"]["votes"] == ["3", "3"]
    assert body["choices"][0]["text"].endswith("#### 3")
    assert ext["tokens"]["thinking"] == 2 * 4  # both samples counted
    sent = [r for r, h in zip(engine.stats.requests, engine.stats.headers, strict=True) if "-s" in h["x-request-id"]]
    assert len(sent) == 2 and all(r["temperature"] == 0.7 for r in sent)


def test_ensemble_draws_more_waves_while_the_vote_is_split(session_gateway: Any) -> None:
    engine, start = session_gateway

    def respond(body: dict[str, Any], headers: dict[str, str]) -> Script:
        answer = "4" if headers["x-request-id"].endswith("-s1") else "3"
        return Script(pieces=["<think>", "x", "</think>", f"\n#### {answer}"])

    with start(Script()) as (url, _):
        engine.responder = respond
        body = complete(url, stopgate={"policy": "ensemble", "params": {"wave": 2, "max_samples": 6}})
    ext = body["stopgate"]
    assert ext["ensemble"]["votes"] == ["3", "4", "3", "3", "3", "3"]
    assert ext["stop_reason"] == "ensemble_max_samples" and ext["ensemble"]["answer"] == "3"
    assert body["choices"][0]["text"].endswith("#### 3")
