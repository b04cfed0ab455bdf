"""What one request runs with: its context, its stop spec, its engine request and its policy.

Everything here is decided before any I/O, so a bad request is a 400 before the engine sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.control.controller import Controlled
from gateway.errors import InvalidRequest, LimitExceeded
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest, Endpoint
from gateway.settings import RouteConfig
from gateway.stopping.continuation import text_prompt
from gateway.stopping.cost import CostMeter
from policies.base import PolicyError, StopPolicy
from policies.registry import build_policy

PASSTHROUGH = "none"
ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class RequestContext:
    endpoint: Endpoint
    request: CompletionRequest | ChatCompletionRequest
    route: RouteConfig
    request_id: str
    max_n: int = 8
    controlled: Controlled | None = None  # the controller's settings; the request's override wins
    # Engine tokens per request, as a multiple of its max_tokens (gateway/stopping/cost.py).
    max_cost_multiple: float = 16.0
    max_ensemble_samples: int = 8
    cost: CostMeter | None = None  # shared by an ensemble's samples; else the request gets its own


@dataclass(frozen=True)
class StopSpec:
    """The stopping settings one request runs with: route defaults, then the request's override."""

    policy: str
    params: dict[str, Any]
    budget: int


def resolve_stop_spec(ctx: RequestContext) -> StopSpec:
    route = ctx.route
    override = ctx.request.stopgate
    policy = route.policy.name
    params = dict(route.policy.params)
    budget = route.budget
    if ctx.controlled is not None:
        budget = ctx.controlled.budget
        if ctx.controlled.param is not None:
            params[ctx.controlled.param] = ctx.controlled.value
    if override is not None:
        if override.policy is not None and override.policy != policy:
            policy, params = override.policy, {}
        if override.params is not None:
            params = {**params, **override.params}
        if override.budget is not None:
            budget = override.budget
    return StopSpec(policy, params, budget)


def max_tokens_for(ctx: RequestContext) -> int:
    req = ctx.request
    asked = req.effective_max_tokens if isinstance(req, ChatCompletionRequest) else req.max_tokens
    if asked is None:
        return ctx.route.default_max_tokens
    if asked > ctx.route.max_tokens_limit:
        raise LimitExceeded(
            f"max_tokens={asked} exceeds the limit of {ctx.route.max_tokens_limit} for model '{req.model}'.",
            param="max_tokens",
        )
    return asked


def upstream_body(ctx: RequestContext, *, vllm: bool) -> dict[str, Any]:
    """The engine request: the client's fields, our model name, always streamed with usage."""
    req = ctx.request
    if req.n > ctx.max_n:
        raise LimitExceeded(f"n={req.n} exceeds the limit of {ctx.max_n}.", param="n")
    body = req.passthrough()
    body["model"] = ctx.route.upstream_model
    body["max_tokens"] = max_tokens_for(ctx)
    body["stream"] = True
    options: dict[str, Any] = {"include_usage": True}
    if vllm:
        options["continuous_usage_stats"] = True
    body["stream_options"] = options
    return body


def policy_param(exc: PolicyError) -> str:
    """The request field a bad policy setting came from, e.g. ``stopgate.params.pattern``."""
    return f"stopgate.params.{exc.param}" if exc.param else "stopgate"


def build_request_policy(ctx: RequestContext, spec: StopSpec) -> StopPolicy | None:
    """The request's policy, or None for a plain pass-through. Bad settings are a 400."""
    if spec.policy == ENSEMBLE:
        raise InvalidRequest("policy 'ensemble' is served by the ensemble path", param="stopgate.policy")
    try:
        policy = build_policy(spec.policy, spec.params, budget=spec.budget, trusted_patterns=ctx.route.trusted_patterns)
    except PolicyError as exc:
        raise InvalidRequest(f"Invalid stopping settings: {exc}", param=policy_param(exc)) from exc
    if ctx.request.n > 1:
        if spec.policy not in (PASSTHROUGH, "static"):
            raise InvalidRequest(
                f"policy '{spec.policy}' stops one sequence at a time; with n > 1 use stopgate.policy 'none' "
                "or 'ensemble'.",
                param="n",
            )
        return None
    if isinstance(ctx.request, CompletionRequest):
        text_prompt(ctx.request)  # a 400 now if the prompt cannot be continued
    return policy
