"""The per-app bundle of resources that request handlers use."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.control.plane import ControlPlane
from gateway.engine.client import EngineClient
from gateway.errors import UnknownModel
from gateway.http.admission import Admission, per_worker
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
    auth: Authenticator
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self._by_model = self.routes.by_model()
        workers = self.settings.workers  # each worker admits its share of the gateway's limits
        self.admission = Admission(
            per_worker(self.settings.max_in_flight, workers),
            self.metrics,
            key_share=self.settings.key_share,
            shared=self.auth.keys > 1,
            workers=workers,
        )

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
