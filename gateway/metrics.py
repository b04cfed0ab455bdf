"""Every Prometheus metric the gateway exports, against an injected registry.

Label values are bounded: route names come from the routes file (requests
for unknown models are counted under ``route="unknown"``), codes are HTTP
statuses, error kinds come from the exception tree. Never user input.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LLM requests take from tens of milliseconds (a tiny model, one token) to
# minutes (long reasoning on a busy GPU).
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

UNKNOWN_ROUTE = "unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stopgate_requests",
            "Requests answered, by route, stop reason and HTTP status.",
            ["route", "stop_reason", "code"],
            registry=r,
        )
        self.tokens = Counter(
            "stopgate_tokens",
            "Tokens by route and kind (prompt, completion).",
            ["route", "kind"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "stopgate_upstream_errors", "Failed upstream calls, by kind.", ["kind"], registry=r
        )
        self.in_flight = Gauge("stopgate_in_flight_requests", "Requests being served now.", registry=r)
        self.request_duration = Histogram(
            "stopgate_request_duration_seconds",
            "Time from request to last byte, by route.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "stopgate_time_to_first_token_seconds",
            "Time from request to the first generated text, by route.",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        # EM sampling and the controller (issue 5).
        self.em_samples = Counter(
            "stopgate_em_samples",
            "EM samples by route, source (gold, canary, shadow) and outcome.",
            ["route", "source", "correct"],
            registry=r,
        )
        self.eval_tokens = Counter(
            "stopgate_eval_tokens",
            "Tokens spent on evaluation work (canary replays, shadow reruns), by route and source.",
            ["route", "source"],
            registry=r,
        )
        self.eval_skipped = Counter(
            "stopgate_eval_skipped",
            "Evaluation runs not started, by route, source and reason (busy, share).",
            ["route", "source", "reason"],
            registry=r,
        )
        self.budget = Gauge("stopgate_budget_tokens", "The thinking budget in force, by route.", ["route"], registry=r)
        self.window_em = Gauge("stopgate_window_em", "EM over the route's sliding window.", ["route"], registry=r)
        self.target_em = Gauge("stopgate_target_em", "The route's target EM.", ["route"], registry=r)
