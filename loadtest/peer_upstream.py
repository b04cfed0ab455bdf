"""The peer benchmark's upstream: the least an OpenAI-compatible engine can do, as the physical anchor.

A raw-ASGI app under uvicorn with its default loop and parser. ``POST /v1/completions`` and
``/v1/chat/completions`` answer ``--tokens`` one-token pieces: streamed as one SSE chunk each, every
chunk built with ``json.dumps`` (plus vLLM's usage chunk when ``stream_options.include_usage`` asks,
and usage in every chunk with ``continuous_usage_stats``), or as one JSON body when not streaming.
``GET /v1/models`` and ``/health`` list the one model. Nothing is recorded or scripted: the
gateways in front of it must parse, observe and rewrite each chunk it only builds and writes, so
its CPU per request is the floor they are measured against. ``loadtest/fake_engine.py`` is the
scripted engine the tests use.

    python -m loadtest.peer_upstream --port 9000 [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODEL = "tinyreason"  # the model gateway/routes.yaml's arith route sends upstream
PROMPT_TOKENS = 7
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class PeerUpstream:
    """The ASGI app; ``tokens`` pieces of ``piece`` per answer."""

    def __init__(self, tokens: int = 32, piece: str = "x") -> None:
        self.tokens, self.piece = tokens, piece
        self.models = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path in ("/v1/models", "/health"):
            await _body(send, 200, JSON, self.models)
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            request = json.loads(body)
            chat = path == "/v1/chat/completions"
            if request.get("stream"):
                await self._stream(request, chat, send)
            else:
                await _body(send, 200, JSON, json.dumps(self._whole(request, chat)).encode())
        else:
            await _body(send, 404, JSON, b'{"error": {"message": "not found", "type": "NotFound"}}')

    def _count(self, request: dict[str, Any]) -> int:
        return min(self.tokens, int(request.get("max_tokens") or request.get("max_completion_tokens") or self.tokens))

    def _whole(self, request: dict[str, Any], chat: bool) -> dict[str, Any]:
        n = self._count(request)
        text, finish = self.piece * n, "stop" if n == self.tokens else "length"
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        return {
            "id": "cmpl-peer",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [choice | {"finish_reason": finish}],
            "usage": _usage(n),
        }

    async def _stream(self, request: dict[str, Any], chat: bool, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        n, created = self._count(request), int(time.time())
        options = request.get("stream_options") or {}
        continuous = bool(options.get("continuous_usage_stats"))
        obj = "chat.completion.chunk" if chat else "text_completion"
        for i in range(n):
            finish = None if i < n - 1 else "stop" if n == self.tokens else "length"
            if chat:
                delta = {"role": "assistant", "content": self.piece} if i == 0 else {"content": self.piece}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": self.piece, "logprobs": None, "finish_reason": finish}
            chunk: dict[str, Any] = {"id": "cmpl-peer", "object": obj, "created": created, "model": MODEL}
            chunk["choices"] = [choice]
            if continuous:
                chunk["usage"] = _usage(i + 1)
            await send({"type": "http.response.body", "body": _event(chunk), "more_body": True})
        if options.get("include_usage"):
            last = {"id": "cmpl-peer", "object": obj, "created": created, "model": MODEL, "choices": []}
            await send({"type": "http.response.body", "body": _event(last | {"usage": _usage(n)}), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: %s\n\n" % json.dumps(chunk).encode()


def _usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS + completion}


async def _body(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description="Run the peer benchmark's minimal upstream.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--tokens", type=int, default=32, help="one-token pieces per answer")
    a = ap.parse_args(argv)
    if a.tokens < 1:
        ap.error("--tokens must be at least 1")
    # uvicorn's defaults (loop and http "auto": uvloop and httptools when installed); no access log.
    uvicorn.run(PeerUpstream(a.tokens), host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
