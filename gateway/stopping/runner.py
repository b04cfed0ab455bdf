"""One generation run to its end, as text: what evaluation runs (canary and shadow) go through.

The evaluation sampler (gateway/evaluation/sampler.py) receives ``run`` from
``runner`` where the app is wired, so that it replays requests through the same
generation path as live traffic without importing it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.control.controller import Controlled
from gateway.engine.client import EngineClient
from gateway.openai.chunks import choice_text
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest, Endpoint
from gateway.settings import RouteConfig
from gateway.stopping.session import Generation
from gateway.stopping.spec import RequestContext

RunToText = Callable[
    [RouteConfig, CompletionRequest | ChatCompletionRequest, str, Controlled | None],
    Awaitable[tuple[Generation, str]],
]


def runner(upstream: EngineClient, *, vllm: bool) -> RunToText:
    """``run(route, request, request_id, controlled)``: the finished session and choice 0's text."""

    async def run(
        route: RouteConfig,
        request: CompletionRequest | ChatCompletionRequest,
        request_id: str,
        controlled: Controlled | None,
    ) -> tuple[Generation, str]:
        endpoint: Endpoint = "completions" if isinstance(request, CompletionRequest) else "chat"
        gen = Generation(
            upstream, RequestContext(endpoint, request, route, request_id, controlled=controlled), vllm=vllm
        )
        pieces = [choice_text(chunk) async for chunk in gen.chunks()]
        return gen, "".join(pieces)

    return run
