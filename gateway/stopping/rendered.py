"""Where a side generation (probe, forced answer) goes, and on which prompt: the route's ``continuation``.

* ``message`` (default): ``/v1/chat/completions`` with the client's messages
  plus a partial assistant message, continued in place (gateway/stopping/
  continuation.py). Templates that strip the reasoning from assistant turns
  (DeepSeek-R1's) make vLLM refuse it with a 400 ("final message does not
  appear ...").
* ``rendered``: ``/v1/completions`` on the engine's own rendering of the
  messages (``POST /tokenize`` then ``/detokenize``, once per request), plus
  ``think_open`` unless the generation prompt opens the thinking, plus the
  reasoning and the suffix: the very text the model was continuing. Its text
  chunks become chat chunks for the client.
* ``auto``: ``message`` until the engine refuses it, then ``rendered`` for the
  rest of the request (one refused request each; name the construction where
  the template is known).

Completions requests are continued on their text prompt either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from gateway.engine.client import ChunkSource, EngineClient
from gateway.errors import UpstreamError, UpstreamRejected
from gateway.openai.protocol import PATHS, ChatCompletionRequest, CompletionRequest, Endpoint
from gateway.settings import RouteConfig
from gateway.stopping.continuation import continuation_body, sampling_body, template_fields


def refused_by_template(exc: UpstreamRejected) -> bool:
    """vLLM's 400 for a partial assistant message that the chat template does not render verbatim."""
    return exc.status_code == 400 and "final message" in exc.message


class Continuer:
    """One request's side generations: the engine path, the body, and the shape of the chunks that come back."""

    def __init__(
        self,
        upstream: EngineClient,
        *,
        endpoint: Endpoint,
        request: CompletionRequest | ChatCompletionRequest,
        route: RouteConfig,
        request_id: str,
    ) -> None:
        self.upstream = upstream
        self.endpoint = endpoint
        self.request = request
        self.route = route
        self.request_id = request_id
        chat = isinstance(request, ChatCompletionRequest)
        self.rendered = route.continuation == "rendered" and chat
        self.auto = route.continuation == "auto" and chat  # may still switch to rendered
        self._prompt: str | None = None
        self._lock = asyncio.Lock()

    @property
    def shape(self) -> Endpoint:
        """The format of the chunks a side generation streams back."""
        return "completions" if self.rendered else self.endpoint

    @asynccontextmanager
    async def stream(
        self, generated: str, suffix: str, *, max_tokens: int, greedy: bool, logprobs: bool, request_id: str
    ) -> AsyncIterator[ChunkSource]:
        """The side generation's upstream stream; read ``shape`` once it is open (``auto`` may switch)."""
        async with AsyncExitStack() as stack:
            path, body = await self.request_for(
                generated, suffix, max_tokens=max_tokens, greedy=greedy, logprobs=logprobs
            )
            try:
                chunks = await stack.enter_async_context(self.upstream.stream(path, body, request_id=request_id))
            except UpstreamRejected as exc:
                if not (self.auto and not self.rendered and refused_by_template(exc)):
                    raise
                self.rendered = True
                path, body = await self.request_for(
                    generated, suffix, max_tokens=max_tokens, greedy=greedy, logprobs=logprobs
                )
                chunks = await stack.enter_async_context(self.upstream.stream(path, body, request_id=request_id))
            yield chunks

    async def request_for(
        self, generated: str, suffix: str, *, max_tokens: int, greedy: bool, logprobs: bool
    ) -> tuple[str, dict[str, Any]]:
        """(path, body) of a side generation that continues ``generated`` (think_open + reasoning) + ``suffix``."""
        if not self.rendered:
            body = continuation_body(
                self.request,
                self.route.upstream_model,
                generated,
                suffix,
                max_tokens=max_tokens,
                greedy=greedy,
                logprobs=logprobs,
            )
            return PATHS[self.endpoint], body
        prompt = await self.prompt()
        think_open = self.route.think_open
        if think_open and prompt.rstrip().endswith(think_open) and generated.startswith(think_open):
            generated = generated[len(think_open) :]  # the template's generation prompt opened the thinking
        body = sampling_body(self.request, self.route.upstream_model, max_tokens=max_tokens, greedy=greedy)
        body["prompt"] = prompt + generated + suffix
        body["add_special_tokens"] = False  # the rendered text holds the template's own BOS and the like
        if logprobs:
            body["logprobs"] = 1
        return PATHS["completions"], body

    async def prompt(self) -> str:
        """The chat prompt as the engine's template renders it, asked of the engine once."""
        async with self._lock:
            if self._prompt is None:
                self._prompt = await self._render()
            return self._prompt

    async def _render(self) -> str:
        assert isinstance(self.request, ChatCompletionRequest)
        rid = f"{self.request_id}-render"
        body: dict[str, Any] = {
            "model": self.route.upstream_model,
            "messages": [m.model_dump(exclude_unset=True) for m in self.request.messages],
            "add_generation_prompt": True,
            **template_fields(self.request),
        }
        tokens = await self.upstream.post_json("/tokenize", body, request_id=rid)
        ids = tokens.get("tokens") if isinstance(tokens, dict) else None
        if not isinstance(ids, list):
            raise UpstreamError("The upstream engine's /tokenize answer has no 'tokens'.")
        text = await self.upstream.post_json(
            "/detokenize", {"model": self.route.upstream_model, "tokens": ids}, request_id=rid
        )
        prompt = text.get("prompt") if isinstance(text, dict) else None
        if not isinstance(prompt, str):
            raise UpstreamError("The upstream engine's /detokenize answer has no 'prompt'.")
        return prompt
