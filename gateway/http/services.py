"""The per-app bundle of resources that request handlers use."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.control.plane import ControlPlane
from gateway.engine.client import EngineClient
from gateway.errors import UnknownModel
from gateway.evaluation.sampler import Sampler
from gateway.http.admission import Admission
from gateway.http.auth import Authenticator
from gateway.metrics import Metrics
from gateway.settings import RouteConfig, RoutesConfig, Settings


@dataclass
class Services:
    """What a request handler needs, built once per app."""

    settings: Settings
    routes: RoutesConfig
    upstream: EngineClient
    metrics: Metrics
    control: ControlPlane
    sampler: Sampler
    auth: Authenticator
    admission: Admission

    def __post_init__(self) -> None:
        self._by_model = self.routes.by_model()

    @property
    def in_flight(self) -> int:
        """Live requests being served (the sampler skips evaluation when busy)."""
        return self.admission.total

    def route_for(self, model: str) -> RouteConfig:
        route = self._by_model.get(model)
        if route is None:
            known = ", ".join(sorted(self._by_model))
            raise UnknownModel(
                f"The model '{model}' does not exist on this gateway. Known models: {known}.", param="model"
            )
        return route
