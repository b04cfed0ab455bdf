"""The per-app bundle of resources that request handlers use."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.control.plane import ControlPlane
from gateway.errors import UnknownModel
from gateway.metrics import Metrics
from gateway.settings import RouteConfig, RoutesConfig, Settings
from gateway.upstream import Upstream


@dataclass
class Services:
    """What a request handler needs, built once per app."""

    settings: Settings
    routes: RoutesConfig
    upstream: Upstream
    metrics: Metrics
    control: ControlPlane
    in_flight: int = field(default=0)  # live requests being served (the plane skips evaluation when busy)

    def __post_init__(self) -> None:
        self._by_model = self.routes.by_model()

    def route_for(self, model: str) -> RouteConfig:
        route = self._by_model.get(model)
        if route is None:
            known = ", ".join(sorted(self._by_model))
            raise UnknownModel(
                f"The model '{model}' does not exist on this gateway. Known models: {known}.", param="model"
            )
        return route
