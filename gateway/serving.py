"""One request's generation: upstream stream in, OpenAI chunks out.

``Generation.chunks()`` is the single path for streaming and non-streaming
clients alike. It owns the upstream stream; ending it early (``watcher``
returns a reason) leaves the ``async with`` block, which closes the
connection so that the engine aborts the request. Every response ends with a
chunk that carries ``finish_reason``, ``usage`` and the ``stopgate``
extension, whether the client asked for usage or not.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.chunks import ChoiceDelta, ChunkParser
from gateway.errors import LimitExceeded
from gateway.protocol import ChatCompletionRequest, CompletionRequest, Endpoint
from gateway.settings import RouteConfig
from gateway.upstream import Upstream

PATHS: dict[Endpoint, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

# Returns a stop reason to end the upstream stream early, or None to go on.
Watcher = Callable[[ChoiceDelta], str | None]


@dataclass(frozen=True)
class RequestContext:
    endpoint: Endpoint
    request: CompletionRequest | ChatCompletionRequest
    route: RouteConfig
    request_id: str
    max_n: int = 8


@dataclass
class Accounting:
    """Net tokens of one request, by kind."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    stop_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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


class Generation:
    def __init__(
        self,
        upstream: Upstream,
        ctx: RequestContext,
        *,
        vllm: bool = True,
        watcher: Watcher | None = None,
    ) -> None:
        self.upstream = upstream
        self.ctx = ctx
        self.vllm = vllm
        self.watcher = watcher
        self.accounting = Accounting()
        self._body = upstream_body(ctx, vllm=vllm)  # validates before any I/O
        self._parser = ChunkParser(ctx.endpoint)
        self._meta: dict[str, Any] = {}

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        acc = self.accounting
        usage: dict[str, Any] | None = None
        held: dict[str, Any] | None = None
        async with self.upstream.stream(PATHS[self.ctx.endpoint], self._body, request_id=self.ctx.request_id) as stream:
            async for chunk in stream:
                self._remember_meta(chunk)
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                    acc.prompt_tokens = int(usage.get("prompt_tokens") or acc.prompt_tokens)
                if not chunk.get("choices"):
                    continue  # the usage-only chunk; usage rides on our final chunk
                stop = None
                for delta in self._parser.parse(chunk):
                    acc.completion_tokens += delta.tokens
                    if acc.first_token_at is None and delta.text:
                        acc.first_token_at = time.monotonic()
                    if self.watcher is not None and stop is None:
                        stop = self.watcher(delta)
                out = self._client_chunk(chunk)
                if held is not None:
                    yield held
                    held = None
                if stop is not None:
                    acc.stop_reason = stop
                    for choice in out["choices"]:
                        choice["finish_reason"] = "stop"
                    held = out
                    break  # leaving the block closes the upstream stream
                if any(c.get("finish_reason") for c in out["choices"]):
                    held = out
                else:
                    yield out
        final = held if held is not None else self._empty_chunk()
        final["usage"] = self._final_usage(usage)
        final["stopgate"] = self.extension()
        yield final
        req = self.ctx.request
        if req.stream_options is not None and req.stream_options.include_usage:
            usage_chunk = self._empty_chunk()
            usage_chunk["choices"] = []
            usage_chunk["usage"] = final["usage"]
            yield usage_chunk

    def extension(self) -> dict[str, Any]:
        acc = self.accounting
        finished = acc.stop_reason or "finished"
        return {
            "route": self.ctx.route.name,
            "request_id": self.ctx.request_id,
            "stop_reason": finished,
            "tokens": {"prompt": acc.prompt_tokens, "completion": acc.completion_tokens},
            **acc.extra,
        }

    def _final_usage(self, upstream_usage: dict[str, Any] | None) -> dict[str, Any]:
        acc = self.accounting
        if upstream_usage is not None and self.accounting.stop_reason is None:
            acc.completion_tokens = int(upstream_usage.get("completion_tokens") or acc.completion_tokens)
        usage = dict(upstream_usage or {})
        usage["prompt_tokens"] = acc.prompt_tokens
        usage["completion_tokens"] = acc.completion_tokens
        usage["total_tokens"] = acc.prompt_tokens + acc.completion_tokens
        return usage

    def _remember_meta(self, chunk: dict[str, Any]) -> None:
        if not self._meta:
            self._meta = {k: chunk[k] for k in ("id", "object", "created") if k in chunk}

    def _client_chunk(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """The chunk as the client sees it: its own model name; per-chunk usage only if it asked."""
        out = dict(chunk)
        out["model"] = self.ctx.request.model
        opts = self.ctx.request.stream_options
        if "usage" in out and not (opts is not None and opts.continuous_usage_stats):
            del out["usage"]
        out["choices"] = [dict(c) for c in chunk.get("choices") or []]
        return out

    def _empty_chunk(self) -> dict[str, Any]:
        obj = "text_completion" if self.ctx.endpoint == "completions" else "chat.completion.chunk"
        return {
            "id": self._meta.get("id", f"cmpl-{self.ctx.request_id}"),
            "object": self._meta.get("object", obj),
            "created": self._meta.get("created", int(time.time())),
            "model": self.ctx.request.model,
            "choices": [],
        }
