"""The gateway's exception tree, rendered as OpenAI error JSON by one handler.

    GatewayError                      (500, internal_error)
    ├── InvalidRequest                (400, invalid_request_error) names ``param``
    │   ├── UnknownModel              (404 in OpenAI; 400 here would hide typos, so 404)
    │   └── LimitExceeded             (400, names the limit)
    ├── PayloadTooLarge               (413)
    ├── RequestTimeout                (408) the body did not arrive within ``body_timeout_s``
    ├── ClientClosed                  (499) the client left while sending its body
    ├── UpstreamError                 (502, upstream_error)
    │   ├── UpstreamUnavailable       (503) connect refused, DNS, reset before a response
    │   ├── UpstreamTimeout           (504) no bytes within the read/total timeout
    │   └── UpstreamRejected          (upstream's own 4xx status, its message passed through)
    └── (more come with auth and backpressure)

Foreign errors (httpx, the engine) are translated at the boundary with
``raise ... from exc``; nothing else may leak a traceback to a client.
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
