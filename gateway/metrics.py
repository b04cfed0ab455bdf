"""Every Prometheus metric the gateway exports, against an injected registry.

Label values are bounded: route names come from the routes file (requests
for unknown models are counted under ``route="unknown"``), codes are HTTP
statuses, error kinds come from the exception tree. Never user input.

Several workers (``stopgate serve --workers N``, gateway/workers.py): with
``PROMETHEUS_MULTIPROC_DIR`` set when the process starts, every metric is
written to files in that directory and ``exposition`` merges all workers'
files, so one scrape of any worker shows the gateway. Counters and histograms
add up; each gauge says how workers combine (``multiprocess_mode``): requests
in flight and buffered samples add up over live workers, ``leader`` is the
largest (1 while some worker leads), ``redis_up`` the smallest, and the
controller's gauges (the same published state in every worker) the most
recent value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# LLM requests take from tens of milliseconds (a tiny model, one token) to
# minutes (long reasoning on a busy GPU).
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

UNKNOWN_ROUTE = "unknown"
UNKNOWN_POLICY = "unknown"  # the request failed before its policy was known


# Probes are a few tokens each: milliseconds on a GPU, up to seconds on a busy CPU.
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Token kinds: what the client sees (prompt, completion), what the gateway added
# around it (probe, forced), and evaluation work (canary, shadow).
TOKEN_KINDS = ("prompt", "completion", "probe", "forced", "canary", "shadow")


@dataclass(frozen=True)
class _RouteSeries:
    """One route's labelled children, looked up once (``labels()`` costs microseconds per call)."""

    prompt: Counter
    completion: Counter
    probe: Counter
    forced: Counter
    duration: Histogram
    ttft: Histogram
    probe_duration: Histogram


class Metrics:
    """Every metric, registered on ``registry`` (a fresh one per app, so tests never share counters)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Read once: prometheus_client decides at import whether values go to files.
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        r = self.registry
        # -- requests -------------------------------------------------------
        self.requests = Counter(
            "stopgate_requests",
            "Requests answered, by route, policy, stop reason and HTTP status.",
            ["route", "policy", "stop_reason", "code"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "stopgate_upstream_errors", "Failed upstream calls, by kind.", ["kind"], registry=r
        )
        self.in_flight = Gauge(
            "stopgate_in_flight_requests", "Live requests being served now.", registry=r, multiprocess_mode="livesum"
        )
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
        self.probe_duration = Histogram(
            "stopgate_probe_duration_seconds",
            "Time one answer probe took, by route.",
            ["route"],
            buckets=PROBE_BUCKETS,
            registry=r,
        )
        # -- tokens ---------------------------------------------------------
        self.tokens = Counter(
            "stopgate_tokens",
            "Tokens by route and kind: prompt, completion, probe, forced, canary, shadow.",
            ["route", "kind"],
            registry=r,
        )
        self.tokens_saved = Counter(
            "stopgate_tokens_saved",
            "Estimated generated tokens that early stops saved, by route (from shadow reruns; see the README).",
            ["route"],
            registry=r,
        )
        # -- EM and the controller ----------------------------------------------
        self.em_samples = Counter(
            "stopgate_em_samples",
            "EM samples by route, source (gold, canary, shadow) and outcome (correct, incorrect).",
            ["route", "source", "outcome"],
            registry=r,
        )
        recent: Literal["livemostrecent"] = "livemostrecent"  # every worker publishes the same controller state
        self.em_ratio = Gauge(
            "stopgate_em_ratio", "EM over the route's sliding window.", ["route"], registry=r, multiprocess_mode=recent
        )
        self.em_lower_bound = Gauge(
            "stopgate_em_lower_bound",
            "Wilson 95% lower bound of the window EM.",
            ["route"],
            registry=r,
            multiprocess_mode=recent,
        )
        self.em_target = Gauge(
            "stopgate_em_target", "The route's target EM.", ["route"], registry=r, multiprocess_mode=recent
        )
        self.budget = Gauge(
            "stopgate_budget_tokens",
            "The thinking budget in force, by route.",
            ["route"],
            registry=r,
            multiprocess_mode=recent,
        )
        self.adjustments = Counter(
            "stopgate_controller_adjustments",
            "Budget or strictness changes by the controller, by route and direction (up: looser, down: tighter).",
            ["route", "direction"],
            registry=r,
        )
        self.eval_share = Gauge(
            "stopgate_evaluation_token_share",
            "Evaluation tokens (canary, shadow) as a share of live generated tokens, by route.",
            ["route"],
            registry=r,
            multiprocess_mode=recent,
        )
        # -- the fleet: replicas sharing one Redis store (gateway/control/fleet.py) ------------------
        self.fleet_redis_up = Gauge(
            "stopgate_fleet_redis_up",
            "1 while this replica reaches the shared Redis store, else 0.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.fleet_buffered = Gauge(
            "stopgate_fleet_buffered_samples",
            "EM samples held in this replica's memory until the shared log takes them.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.fleet_dropped = Counter(
            "stopgate_fleet_dropped_samples",
            "EM samples dropped because the buffer was full while Redis was unreachable, by route.",
            ["route"],
            registry=r,
        )
        self.fleet_leader = Gauge(
            "stopgate_fleet_leader",
            "1 while this replica holds the route's lease and steps its controller.",
            ["route"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.fleet_applied = Counter(
            "stopgate_fleet_applied_samples",
            "Log entries this replica folded into the route's state.",
            ["route"],
            registry=r,
        )
        self.fleet_refused = Counter(
            "stopgate_fleet_refused_writes",
            "State writes Redis refused, by route and reason (stale: fencing token; conflict: an admin write).",
            ["route", "reason"],
            registry=r,
        )
        self.background_errors = Counter(
            "stopgate_background_errors",
            "Exceptions caught in background work (canary loop, evaluation runs), by task; the work goes on.",
            ["task"],
            registry=r,
        )
        self.fleet_loop_errors = Counter(
            "stopgate_fleet_loop_errors",
            "Fleet-loop rounds that failed with an unexpected error (not Redis being unreachable); the replica "
            "then leads nothing until a round succeeds.",
            registry=r,
        )
        self.fleet_undecodable = Counter(
            "stopgate_fleet_undecodable_entries",
            "Entries of the route's shared sample log that could not be decoded and were skipped.",
            ["route"],
            registry=r,
        )
        self.eval_skipped = Counter(
            "stopgate_evaluation_skipped",
            "Evaluation runs not started, by route, source and reason (busy, share).",
            ["route", "source", "reason"],
            registry=r,
        )
        # Caches of labelled children for the per-request path; bounded because label values are.
        self._routes: dict[str, _RouteSeries] = {}
        self._request_counts: dict[tuple[str, str, str, str], Counter] = {}

    def request_done(
        self,
        route: str,
        policy: str,
        stop_reason: str,
        code: int,
        *,
        prompt: int,
        completion: int,
        probe: int,
        forced: int,
        duration_s: float,
        ttft_s: float | None,
        probe_durations: Iterable[float] = (),
    ) -> None:
        """Count one answered request: its outcome, tokens by kind, durations and time to first token."""
        key = (route, policy, stop_reason, str(code))
        count = self._request_counts.get(key)
        if count is None:
            count = self._request_counts[key] = self.requests.labels(*key)
        count.inc()
        series = self._routes.get(route)
        if series is None:
            series = self._routes[route] = _RouteSeries(
                prompt=self.tokens.labels(route, "prompt"),
                completion=self.tokens.labels(route, "completion"),
                probe=self.tokens.labels(route, "probe"),
                forced=self.tokens.labels(route, "forced"),
                duration=self.request_duration.labels(route),
                ttft=self.ttft.labels(route),
                probe_duration=self.probe_duration.labels(route),
            )
        series.prompt.inc(prompt)
        series.completion.inc(completion)
        series.probe.inc(probe)
        series.forced.inc(forced)
        series.duration.observe(duration_s)
        for seconds in probe_durations:
            series.probe_duration.observe(seconds)
        if ttft_s is not None:
            series.ttft.observe(ttft_s)

    def exposition(self) -> bytes:
        """The text a scrape returns: this registry, or every worker's metrics when several share a directory."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
