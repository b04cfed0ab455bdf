"""The gateway's exception tree, rendered as OpenAI error JSON by one handler.

Status, ``type`` and ``code`` of the rendered error; classes outside this module name their module.

    GatewayError                      (500, internal_error) a bug: no details, see ``internal_error()``
    ├── InvalidRequest                (400, invalid_request_error) names ``param``
    │   ├── UnknownModel              (404, model_not_found; 400 would hide typos)
    │   └── LimitExceeded             (400, limit_exceeded) names the limit
    ├── PayloadTooLarge               (413, invalid_request_error, payload_too_large)
    ├── RequestTimeout                (408, invalid_request_error, request_timeout) body not in ``body_timeout_s``
    ├── ClientClosed                  (499, invalid_request_error, client_closed_request) left while sending
    ├── Unauthorized                  (401, authentication_error, invalid_api_key) + ``WWW-Authenticate``
    ├── Forbidden                     (403, permission_error, route_not_allowed) the key may not use the route
    ├── NotFound                      (404, not_found_error, not_found) admin API: no such endpoint or route
    ├── Overloaded                    (429, rate_limit_error, overloaded) + ``Retry-After``
    ├── StateUnavailable              (503, unavailable_error, state_store_unavailable) shared store down
    ├── Draining                      (503, unavailable_error, shutting_down) + ``Connection: close``
    ├── PolicyFailed                  (500, policy_error) gateway/stopping/session.py: a policy raised
    └── UpstreamError                 (502, upstream_error) a bad response from the engine
        ├── UpstreamUnavailable       (503, upstream_unavailable) connect refused, DNS, reset
        │   └── CircuitOpen           (503, circuit_open) gateway/engine/pool.py: no replica left + ``Retry-After``
        ├── UpstreamTimeout           (504, upstream_timeout) no bytes within the read/total timeout
        └── UpstreamRejected          (the engine's 4xx, invalid_request_error) its message passed through

Foreign errors (httpx, the engine) are translated at the boundary with
``raise ... from exc``; nothing else may leak a traceback to a client.
Start-up and operator errors are not client errors and stay outside the tree:
``ConfigError`` (gateway/settings.py), ``StoreError`` (gateway/control/store.py),
``EngineStartError`` (gateway/engine/embedded.py); the CLI prints them on one line.
tests/test_architecture.py checks that every ``GatewayError`` subclass is drawn here.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status_code = 500
    error_type = "internal_error"
    code: str | None = None
    headers: dict[str, str] = {}  # sent with the error response (read-only)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class UnknownModel(InvalidRequest):
    status_code = 404
    code = "model_not_found"


class LimitExceeded(InvalidRequest):
    code = "limit_exceeded"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class Unauthorized(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"
    headers = {"www-authenticate": "Bearer"}


class NotFound(GatewayError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class Forbidden(GatewayError):
    status_code = 403
    error_type = "permission_error"
    code = "route_not_allowed"


class RequestTimeout(GatewayError):
    """The client did not send its request body within ``body_timeout_s``; the connection is closed."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"
    headers = {"connection": "close"}


class ClientClosed(GatewayError):
    """The client left before its request body arrived (nobody reads the answer; no traceback is logged)."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_closed_request"


class Overloaded(GatewayError):
    """Too many requests in flight: the client should retry after ``Retry-After`` seconds."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "overloaded"
    headers = {"retry-after": "1"}


class StateUnavailable(GatewayError):
    """The shared state store (Redis) cannot be reached: an admin write cannot be made durable now."""

    status_code = 503
    error_type = "unavailable_error"
    code = "state_store_unavailable"
    headers = {"retry-after": "1"}


class Draining(GatewayError):
    """The gateway is shutting down: another replica should take the request."""

    status_code = 503
    error_type = "unavailable_error"
    code = "shutting_down"
    headers = {"retry-after": "1", "connection": "close"}


class UpstreamError(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    kind = "bad_response"


class UpstreamUnavailable(UpstreamError):
    status_code = 503
    code = "upstream_unavailable"
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"
    kind = "timeout"


class UpstreamRejected(UpstreamError):
    """The engine refused the request (4xx); its status and message pass through."""

    error_type = "invalid_request_error"
    kind = "rejected"

    def __init__(self, status_code: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status_code = status_code


def internal_error() -> GatewayError:
    """What a client sees for a bug in the gateway: no details, no traceback."""
    return GatewayError("The gateway hit an internal error; it has been logged.")
