"""stopgate: a gateway in front of vLLM that stops reasoning early while holding exact match at a target."""

from gateway.http.app import create_app
from gateway.settings import Settings, build_settings

__all__ = ["Settings", "build_settings", "create_app"]
