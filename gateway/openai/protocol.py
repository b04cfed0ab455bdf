"""Request models for the OpenAI-compatible endpoints.

Only the fields the gateway acts on are declared and validated; every other
field is kept and passed through to the engine, as vLLM itself allows.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

from gateway.errors import InvalidRequest


def _json_int(value: Any) -> Any:
    """JSON has one number type: ``418.0`` is the integer 418. ``"418"``, ``true`` and ``1.5`` stay errors."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool | str):
        raise ValueError("expected an integer")
    return value


JsonInt = Annotated[int, BeforeValidator(_json_int)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_json_int)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class StopgateOptions(BaseModel):
    """The one request field that overrides the route's stopping settings.

    ``{"stopgate": {"policy": "convergence", "params": {"window": 2}, "budget": 128}}``
    """

    model_config = ConfigDict(extra="forbid")

    policy: str | None = None
    params: dict[str, Any] | None = None
    budget: Annotated[int, Field(ge=1, le=1 << 30), BeforeValidator(_json_int)] | None = None
    # The reference item this request replays: its EM is scored against the item's gold answers.
    reference_id: str | None = Field(default=None, min_length=1, max_length=256)

    @property
    def overrides(self) -> bool:
        """Whether the request changes the stopping settings (its EM then says nothing about the route's)."""
        return self.policy is not None or self.params is not None or self.budget is not None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: PositiveInt | None = None
    n: PositiveInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stopgate: StopgateOptions | None = None
    # Also accepted at the top level, as `stopgate.reference_id`; never sent to the engine.
    reference_id: str | None = Field(default=None, min_length=1, max_length=256)

    def passthrough(self) -> dict[str, Any]:
        """The request as sent, minus what the gateway rewrites or owns."""
        return self.model_dump(
            exclude_unset=True, exclude={"model", "stream", "stream_options", "stopgate", "reference_id"}
        )

    @property
    def reference(self) -> str | None:
        if self.stopgate is not None and self.stopgate.reference_id is not None:
            return self.stopgate.reference_id
        return self.reference_id


class CompletionRequest(_Common):
    prompt: str | list[str] | list[JsonInt] | list[list[JsonInt]]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None

    def passthrough(self) -> dict[str, Any]:
        body = super().passthrough()
        # Newer OpenAI clients send max_completion_tokens; engines know max_tokens.
        if self.max_completion_tokens is not None:
            body.pop("max_completion_tokens", None)
            body.setdefault("max_tokens", self.max_completion_tokens)
        return body

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


Endpoint = Literal["completions", "chat"]
# The engine path of each endpoint (the gateway serves the same paths).
PATHS: dict[Endpoint, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _no_constant(name: str) -> Any:
    raise InvalidRequest(f"The request body is not valid JSON: {name} is not a JSON number.")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A JSON object from the body: strict JSON (no NaN or Infinity), valid Unicode (no lone surrogates)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise InvalidRequest("The request body is not valid UTF-8.") from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}."
        ) from exc
    except RecursionError as exc:
        raise InvalidRequest("The request body nests too deeply.") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        param = ".".join(_lone_surrogate(body, ())) or None
        raise InvalidRequest(
            f"Invalid value for '{param}': a lone surrogate (an unpaired \\ud800-\\udfff escape) is not valid Unicode.",
            param=param,
        ) from None
    return body


def _lone_surrogate(value: Any, path: tuple[str, ...]) -> tuple[str, ...]:
    """Where in ``value`` a string with a lone surrogate sits (its field path; list indices left out)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or ("body",)
        return ()
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, path if isinstance(key, int) else (*path, str(key)))
        if found:
            return found
    return ()


def validate_request(endpoint: Endpoint, body: dict[str, Any]) -> CompletionRequest | ChatCompletionRequest:
    model = CompletionRequest if endpoint == "completions" else ChatCompletionRequest
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param(err["loc"])
        raise InvalidRequest(f"Invalid value for '{param}': {_message(err)}", param=param) from exc


def _param(loc: tuple[int | str, ...]) -> str | None:
    """``("prompt", "list[int]", 0)`` -> ``"prompt"``: drop pydantic's union-member names."""
    parts = [str(p) for p in loc if isinstance(p, int) or ("[" not in p and p not in _TYPE_NAMES)]
    return ".".join(parts) or None


_TYPE_NAMES = {"str", "int", "list", "dict", "bool", "float"}


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "this field is required."
    if kind in {"int_type", "int_parsing"}:
        return "expected an integer."
    if kind == "bool_type":
        return "expected a boolean."
    if kind == "value_error":
        return str(err["ctx"]["error"]) + "."
    if kind == "greater_than_equal":
        return f"must be at least {err['ctx']['ge']}."
    return str(err["msg"]) + "."
