"""Admission control: requests in flight (in total, per route, per key) and the limits that turn new ones away."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from math import ceil

from gateway.errors import Draining, Overloaded
from gateway.http.auth import Principal
from gateway.metrics import Metrics
from gateway.settings import RouteConfig


def per_worker(limit: int, workers: int) -> int:
    """One worker's share of a gateway-wide limit: ``ceil(limit / workers)`` (gateway/workers.py)."""
    return ceil(limit / workers)


@dataclass
class Admission:
    """Live requests in flight, in total and per route, and the limits that turn new ones away.

    Over a limit a request gets 429 with ``Retry-After`` (the gateway is busy,
    the client may retry); while draining for shutdown it gets 503 (this
    replica is going away, another should take it). Evaluation work (canary,
    shadow) is shed before any of this: it stops at ``eval_max_in_flight``.

    With ``workers`` > 1 processes, this is one worker's: each limit (``max_total``, a route's, a key's)
    is the gateway's ``per_worker``, so the workers together admit about the configured limit.
    """

    max_total: int
    metrics: Metrics
    total: int = 0
    by_route: Counter[str] = field(default_factory=Counter)
    by_key: Counter[str] = field(default_factory=Counter)
    draining: bool = False
    # A key's share of max_total when several keys share the gateway (its keys-file max_in_flight wins).
    key_share: float = 1.0
    shared: bool = False  # more than one client key: no key may hold every place
    workers: int = 1

    def admit(self, principal: Principal | None = None) -> Ticket:
        if self.draining:
            raise Draining("The gateway is shutting down; retry on another replica.")
        if self.total >= self.max_total:
            raise Overloaded(f"The gateway is at its limit of {self.max_total} requests in flight; retry shortly.")
        key = None
        if principal is not None and (principal.max_in_flight is not None or self.shared):
            key = principal.name
            if principal.max_in_flight is not None:
                limit = per_worker(principal.max_in_flight, self.workers)
            else:
                limit = max(1, int(self.key_share * self.max_total))
            if self.by_key[key] >= limit:
                raise Overloaded(f"This API key is at its limit of {limit} requests in flight; retry shortly.")
            self.by_key[key] += 1
        self.total += 1
        self.metrics.in_flight.inc()
        return Ticket(self, key=key)


@dataclass
class Ticket:
    """One admitted request; ``release`` (idempotent) gives its places back."""

    admission: Admission
    route: str | None = None
    released: bool = False
    key: str | None = None

    def enter_route(self, route: RouteConfig) -> None:
        a = self.admission
        limit = None if route.max_in_flight is None else per_worker(route.max_in_flight, a.workers)
        if limit is not None and a.by_route[route.name] >= limit:
            raise Overloaded(
                f"The model route '{route.name}' is at its limit of {limit} requests in flight; retry shortly."
            )
        a.by_route[route.name] += 1
        self.route = route.name

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        a = self.admission
        a.total -= 1
        a.metrics.in_flight.dec()
        if self.route is not None:
            a.by_route[self.route] -= 1
        if self.key is not None:
            a.by_key[self.key] -= 1
