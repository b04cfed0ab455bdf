"""The per-app bundle of resources that request handlers use, and admission control."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gateway.auth import Authenticator
from gateway.control.plane import ControlPlane
from gateway.errors import Draining, Overloaded, UnknownModel
from gateway.metrics import Metrics
from gateway.settings import RouteConfig, RoutesConfig, Settings
from gateway.upstream import EngineClient


@dataclass
class Admission:
    """Live requests in flight, in total and per route, and the limits that turn new ones away.

    Over a limit a request gets 429 with ``Retry-After`` (the gateway is busy,
    the client may retry); while draining for shutdown it gets 503 (this
    replica is going away, another should take it). Evaluation work (canary,
    shadow) is shed before any of this: it stops at ``eval_max_in_flight``.
    """

    max_total: int
    metrics: Metrics
    total: int = 0
    by_route: Counter[str] = field(default_factory=Counter)
    draining: bool = False

    def admit(self) -> Ticket:
        if self.draining:
            raise Draining("The gateway is shutting down; retry on another replica.")
        if self.total >= self.max_total:
            raise Overloaded(f"The gateway is at its limit of {self.max_total} requests in flight; retry shortly.")
        self.total += 1
        self.metrics.in_flight.inc()
        return Ticket(self)


@dataclass
class Ticket:
    """One admitted request; ``release`` (idempotent) gives its places back."""

    admission: Admission
    route: str | None = None
    released: bool = False

    def enter_route(self, route: RouteConfig) -> None:
        a = self.admission
        if route.max_in_flight is not None and a.by_route[route.name] >= route.max_in_flight:
            raise Overloaded(
                f"The model route '{route.name}' is at its limit of {route.max_in_flight} requests in flight; "
                "retry shortly."
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


@dataclass
class Services:
    """What a request handler needs, built once per app."""

    settings: Settings
    routes: RoutesConfig
    upstream: EngineClient
    metrics: Metrics
    control: ControlPlane
    auth: Authenticator
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self._by_model = self.routes.by_model()
        self.admission = Admission(self.settings.max_in_flight, self.metrics)

    @property
    def in_flight(self) -> int:
        """Live requests being served (the control plane skips evaluation when busy)."""
        return self.admission.total

    def route_for(self, model: str) -> RouteConfig:
        route = self._by_model.get(model)
        if route is None:
            known = ", ".join(sorted(self._by_model))
            raise UnknownModel(
                f"The model '{model}' does not exist on this gateway. Known models: {known}.", param="model"
            )
        return route
