"""Metric values, label sets and buckets, read from each gateway's own fresh registry after scripted requests."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import DURATION_BUCKETS, PROBE_BUCKETS, TTFT_BUCKETS, Metrics
from loadtest.fake_engine import Script
from tests.support.control import ADMIN, complete, state
from tests.support.session import PROMPT, THINKING
from tests.support.waiting import wait_until


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def label_sets(registry: CollectorRegistry, metric: str) -> set[tuple[str, ...]]:
    return {tuple(sorted(s.labels)) for m in registry.collect() if m.name == metric for s in m.samples}


def test_every_metric_has_the_stopgate_prefix_and_bounded_labels() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    names = {m.name for m in registry.collect()}
    expected = {
        "stopgate_requests",
        "stopgate_tokens",
        "stopgate_tokens_saved",
        "stopgate_em_samples",
        "stopgate_em_ratio",
        "stopgate_em_lower_bound",
        "stopgate_em_target",
        "stopgate_budget_tokens",
        "stopgate_controller_adjustments",
        "stopgate_request_duration_seconds",
        "stopgate_time_to_first_token_seconds",
        "stopgate_probe_duration_seconds",
        "stopgate_upstream_errors",
        "stopgate_in_flight_requests",
        "stopgate_evaluation_token_share",
        "stopgate_evaluation_skipped",
    }
    assert expected <= names and all(n.startswith("stopgate_") for n in names)


def test_request_done_counts_the_series_the_labels_api_counts_and_reuses_its_children() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    for ttft in (0.02, None):
        m.request_done(
            "arith",
            "budget",
            "budget",
            200,
            prompt=5,
            completion=7,
            probe=3,
            forced=2,
            duration_s=0.5,
            ttft_s=ttft,
            probe_durations=(0.01, 0.02),
        )
    m.requests.labels("arith", "budget", "budget", "200").inc()  # the labels() API counts the same series
    labels = {"route": "arith", "policy": "budget", "stop_reason": "budget", "code": "200"}
    assert value(registry, "stopgate_requests_total", **labels) == 3
    for kind, count in (("prompt", 10), ("completion", 14), ("probe", 6), ("forced", 4)):
        assert value(registry, "stopgate_tokens_total", route="arith", kind=kind) == count
    assert value(registry, "stopgate_request_duration_seconds_count", route="arith") == 2
    assert value(registry, "stopgate_probe_duration_seconds_count", route="arith") == 4
    assert value(registry, "stopgate_time_to_first_token_seconds_count", route="arith") == 1
    assert value(registry, "stopgate_tokens_total", route="arith", kind="canary") == 0


def test_an_early_stop_counts_its_request_and_tokens_by_kind(session_gateway: Any) -> None:  # noqa: F811
    _, start = session_gateway
    with start(Script(pieces=THINKING, delay_s=0.001)) as (url, registry):
        body = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tinyreason", "prompt": PROMPT, "stopgate": {"policy": "budget", "budget": 20}},
            timeout=30,
        ).json()
    tokens = body["stopgate"]["tokens"]
    labels = {"route": "arith", "policy": "budget", "stop_reason": "budget", "code": "200"}
    assert value(registry, "stopgate_requests_total", **labels) == 1
    assert (
        value(registry, "stopgate_tokens_total", route="arith", kind="completion")
        == tokens["thinking"] + tokens["answer"]
    )
    assert value(registry, "stopgate_tokens_total", route="arith", kind="forced") == tokens["forced"] == 1
    assert value(registry, "stopgate_tokens_total", route="arith", kind="prompt") == 7
    assert value(registry, "stopgate_request_duration_seconds_count", route="arith") == 1
    assert value(registry, "stopgate_time_to_first_token_seconds_count", route="arith") == 1


def test_probe_durations_are_observed_per_probe(session_gateway: Any) -> None:  # noqa: F811
    _, start = session_gateway
    with start(Script(pieces=THINKING, delay_s=0.01), probe=Script(pieces=[" 3"])) as (url, registry):
        body = httpx.post(
            f"{url}/v1/completions",
            json={
                "model": "tinyreason",
                "prompt": PROMPT,
                "stopgate": {"policy": "convergence", "params": {"probe_every": 16, "window": 2}},
            },
            timeout=30,
        ).json()
    assert body["stopgate"]["stop_reason"] == "converged"
    launched = body["stopgate"]["probes"]["launched"]
    assert launched >= 2
    assert value(registry, "stopgate_probe_duration_seconds_count", route="arith") == launched
    assert value(registry, "stopgate_tokens_total", route="arith", kind="probe") == body["stopgate"]["tokens"]["probe"]
    labels = {"route": "arith", "policy": "convergence", "stop_reason": "converged", "code": "200"}
    assert value(registry, "stopgate_requests_total", **labels) == 1


def test_errors_are_counted_with_bounded_labels(gateway: Any) -> None:
    url, engine, registry = gateway
    r = httpx.post(f"{url}/v1/completions", json={"model": "some user's model", "prompt": "x"}, timeout=10)
    assert r.status_code == 404
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x", "stopgate": {"policy": "nope"}}, timeout=10
    )
    assert r.status_code == 400
    engine.queue.append(Script(status=503))
    assert (
        httpx.post(f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x"}, timeout=10).status_code == 502
    )
    unknown = {"route": "unknown", "policy": "unknown", "stop_reason": "error", "code": "404"}
    assert value(registry, "stopgate_requests_total", **unknown) == 1
    bad_policy = {"route": "arith", "policy": "unknown", "stop_reason": "error", "code": "400"}
    assert value(registry, "stopgate_requests_total", **bad_policy) == 1  # never the user's "nope"
    kinds = {s.labels["kind"] for m in registry.collect() if m.name == "stopgate_upstream_errors" for s in m.samples}
    assert len(kinds) == 1 and value(registry, "stopgate_upstream_errors_total", kind=kinds.pop()) == 1
    routes = {s.labels["route"] for m in registry.collect() if m.name == "stopgate_requests" for s in m.samples}
    assert routes <= {"arith", "unknown"}


def test_histogram_buckets_fit_llm_latencies() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.request_duration.labels("arith").observe(0.3)
    m.ttft.labels("arith").observe(0.3)
    m.probe_duration.labels("arith").observe(0.3)
    for name, buckets in (
        ("stopgate_request_duration_seconds", DURATION_BUCKETS),
        ("stopgate_time_to_first_token_seconds", TTFT_BUCKETS),
        ("stopgate_probe_duration_seconds", PROBE_BUCKETS),
    ):
        les = [
            s.labels["le"]
            for metric in registry.collect()
            if metric.name == name
            for s in metric.samples
            if s.name.endswith("_bucket")
        ]
        assert les == [str(float(b)) for b in buckets] + ["+Inf"]
    assert DURATION_BUCKETS[0] <= 0.025 and DURATION_BUCKETS[-1] >= 300  # a one-token answer to a long reasoning
    assert TTFT_BUCKETS[0] <= 0.005 and TTFT_BUCKETS[-1] >= 30


def test_em_and_controller_metrics_follow_the_samples(plane_gateway: Any) -> None:  # noqa: F811
    _, start = plane_gateway
    with start() as (url, registry):
        assert value(registry, "stopgate_budget_tokens", route="arith") == 400
        assert value(registry, "stopgate_em_target", route="arith") == 0.8
        for _ in range(30):
            complete(url, reference_id="a1")  # right
        complete(url, prompt="Q: 2+2=?\n", reference_id="a2")  # wrong
        s = state(url)
    assert value(registry, "stopgate_em_samples_total", route="arith", source="gold", outcome="correct") == 30
    assert value(registry, "stopgate_em_samples_total", route="arith", source="gold", outcome="incorrect") == 1
    window = s["controller"]["window"]
    assert value(registry, "stopgate_em_ratio", route="arith") == pytest.approx(window["em"])
    assert value(registry, "stopgate_em_lower_bound", route="arith") == pytest.approx(window["wilson95"][0])
    assert value(registry, "stopgate_budget_tokens", route="arith") == s["budget"] < 400
    assert value(registry, "stopgate_controller_adjustments_total", route="arith", direction="down") >= 1
    assert value(registry, "stopgate_controller_adjustments_total", route="arith", direction="up") == 0


def test_evaluation_tokens_share_and_savings_are_exported(plane_gateway: Any) -> None:  # noqa: F811
    engine, start = plane_gateway
    long_answer = ["<think>", "\n"] + list("1+2=3\n") * 20 + ["</think>", "\n#### 3"]
    engine.responder = lambda body, headers: (
        Script(pieces=[" 3"]) if headers.get("x-request-id", "").endswith("-forced") else Script(pieces=long_answer)
    )
    with start(evaluation={"shadow_share": 1.0}, eval_share=100.0) as (url, registry):
        httpx.put(f"{url}/admin/routes/arith/budget", json={"budget": 20}, headers=ADMIN, timeout=10)
        body = complete(url, prompt="Q: 9+9=?\n").json()
        assert wait_until(lambda: state(url)["samples"]["shadow"] == 1)
    live = body["stopgate"]["tokens"]["net"]
    full = len(long_answer)
    assert value(registry, "stopgate_tokens_total", route="arith", kind="shadow") == full
    assert value(registry, "stopgate_evaluation_token_share", route="arith") == pytest.approx(full / live)
    assert value(registry, "stopgate_tokens_saved_total", route="arith") == full - live  # share 1.0: one for one
    assert value(registry, "stopgate_em_samples_total", route="arith", source="shadow", outcome="correct") == 1


def test_a_failing_metric_update_never_fails_the_request(gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _, registry = gateway

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("metrics backend broke")

    monkeypatch.setattr(Metrics, "request_done", broken)
    r = httpx.post(f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x"}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={"model": "tinyreason", "prompt": "x", "stream": True}
    ) as s:
        assert s.status_code == 200 and s.read().endswith(b"data: [DONE]\n\n")
