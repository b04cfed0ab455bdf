"""A scripted OpenAI-compatible engine: a small raw-ASGI app that speaks vLLM's SSE.

Used by the unit tests (as a real HTTP peer, so timeouts and disconnects are
real) and by the overhead benchmark (it answers in microseconds). Behaviour
comes from a ``Script``: the text pieces to stream, per-chunk delay, a stall
before the first byte, an HTTP error status, or a failure mid-stream. Run it
alone with ``python -m loadtest.fake_engine --port 9000``.

A chat script with ``reasoning="reasoning"`` (or ``"reasoning_content"``)
streams like vLLM with ``--reasoning-parser deepseek_r1``: ``<think>`` and
``</think>`` are tokens that never appear as text (each is counted with the
next chunk), the thinking between them goes in that delta field, the rest in
``content``, and usage carries ``completion_tokens_details.reasoning_tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class Script:
    pieces: list[str] = field(
        default_factory=lambda: ["<think>", "\n", "1", "+", "2", "=", "3", "\n", "</think>", "\n#### 3"]
    )
    delay_s: float = 0.0
    stall_s: float = 0.0  # before the response starts
    status: int = 200
    error_message: str = "scripted error"
    fail_after: int | None = None  # drop the connection after this many chunks
    error_event_after: int | None = None  # send an SSE error event after this many chunks
    finish_reason: str = "stop"
    # vLLM's stop_reason on the last chunk: the stop string the sequence ended at (the fake matches none itself).
    stop_reason: str | None = None
    prompt_tokens: int = 7
    # Chat only: stream the thinking in this delta field, as a reasoning parser does (None: all in content).
    reasoning: str | None = None
    # Per piece, the top alternatives {token: logprob} at its position; sent when the request asks for logprobs.
    top_logprobs: list[dict[str, float]] | None = None
    ignore_max_tokens: bool = False  # an engine that streams past the request's max_tokens


@dataclass
class Stats:
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    active: int = 0
    completed: int = 0
    cancelled: int = 0
    chunks_sent: int = 0
    client_ports: set[int] = field(default_factory=set)  # one per TCP connection the gateway opened


class FakeEngine:
    def __init__(self, model: str = "tinyreason", default: Script | None = None) -> None:
        self.model = model
        self.default = default or Script()
        self.queue: deque[Script] = deque()
        self.stats = Stats()
        self.record = True
        # Refuse to continue an assistant message the template would strip (as vLLM does with DeepSeek-R1's).
        self.strips_reasoning = False
        # Picks a script from the request body and headers; takes precedence over the queue.
        self.responder: Callable[[dict[str, Any], dict[str, str]], Script | None] | None = None

    def push(self, *scripts: Script) -> None:
        """Scripts for the next requests, in order; then the default again."""
        self.queue.extend(scripts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] == "GET" and path in ("/v1/models", "/health"):
            await _json(send, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
            return
        if scope["method"] != "POST" or path not in (
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/responses",
            "/tokenize",
            "/detokenize",
        ):
            await _json(send, 404, {"error": {"message": f"no route {path}", "type": "NotFound"}})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        if self.record:
            client = scope.get("client")
            if client:
                self.stats.client_ports.add(int(client[1]))
            self.stats.requests.append(request)
            self.stats.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if path in ("/tokenize", "/detokenize"):
            await _json(send, 200, _tokenize(request) if path == "/tokenize" else _detokenize(request))
            return
        if self.strips_reasoning and _continues_stripped(request):
            message = (
                "continue_final_message is set but the final message does not appear in the chat after "
                "applying the chat template!"
            )
            await _json(send, 400, {"error": {"message": message, "type": "BadRequestError", "code": 400}})
            return
        script = self.responder(request, headers) if self.responder is not None else None
        if script is None:
            script = self.queue.popleft() if self.queue else self.default
        if path == "/v1/responses" and script.status == 200 and request.get("stream"):
            await self._respond_events(script, request, send)
            return
        await self._respond(script, request, path == "/v1/chat/completions", receive, send)

    async def _respond_events(self, script: Script, request: dict[str, Any], send: Send) -> None:
        """A Responses API stream: created, one output_text delta per piece, completed (no [DONE])."""
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        pieces = script.pieces[: int(request.get("max_output_tokens") or 1 << 30)]
        response: dict[str, Any] = {"id": "resp_fake", "object": "response", "model": self.model, "output": []}

        async def emit(kind: str, **fields: Any) -> None:
            data = json.dumps({"type": kind, **fields})
            await send(
                {"type": "http.response.body", "body": f"event: {kind}\ndata: {data}\n\n".encode(), "more_body": True}
            )
            self.stats.chunks_sent += 1

        await emit("response.created", response={**response, "status": "in_progress"})
        for piece in pieces:
            await emit("response.output_text.delta", delta=piece, output_index=0, content_index=0)
            if script.delay_s:
                await asyncio.sleep(script.delay_s)
        text = {"type": "output_text", "text": "".join(pieces)}
        usage = {"input_tokens": script.prompt_tokens, "output_tokens": len(pieces)}
        done = {**response, "status": "completed", "usage": usage}
        done["output"] = [{"type": "message", "role": "assistant", "content": [text]}]
        await emit("response.completed", response=done)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.stats.completed += 1

    async def _respond(self, script: Script, request: dict[str, Any], chat: bool, receive: Receive, send: Send) -> None:
        if script.stall_s:
            stall = asyncio.ensure_future(asyncio.sleep(script.stall_s))
            gone = asyncio.ensure_future(_wait_disconnect(receive))
            await asyncio.wait({stall, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                stall.cancel()
                self.stats.cancelled += 1
                return
            gone.cancel()
        if script.status != 200:
            await _json(
                send,
                script.status,
                {
                    "object": "error",
                    "message": script.error_message,
                    "type": "BadRequestError",
                    "param": None,
                    "code": script.status,
                },
            )
            return
        if not request.get("stream"):
            await _json(send, 400, {"error": {"message": "the fake engine only streams"}})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        options = request.get("stream_options") or {}
        continuous = bool(options.get("continuous_usage_stats"))
        self.stats.active += 1
        # Like vLLM: watch for the client leaving and abort the generation.
        streaming = asyncio.ensure_future(self._stream(script, request, chat, continuous, options, send))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
            if streaming.done():
                streaming.result()
                self.stats.completed += 1
            else:
                streaming.cancel()
                self.stats.cancelled += 1
        except OSError:
            self.stats.cancelled += 1
            raise
        finally:
            gone.cancel()
            self.stats.active -= 1

    async def _stream(
        self, script: Script, request: dict[str, Any], chat: bool, continuous: bool, options: dict[str, Any], send: Send
    ) -> None:
        rid = "cmpl-fake"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        limit = 1 << 30 if script.ignore_max_tokens else int(request.get("max_tokens") or 1 << 30)
        pieces = script.pieces[:limit]
        finish = script.finish_reason if len(script.pieces) <= limit else "length"

        async def emit(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            self.stats.chunks_sent += 1

        if chat:
            await emit(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": self.model,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        events = _deltas(pieces, "content" if chat else "text", script.reasoning if chat else None)
        completion = reasoning_tokens = 0
        for i, (delta, tokens, reasoning) in enumerate(events):
            if script.fail_after is not None and i == script.fail_after:
                raise OSError("scripted connection drop")
            if script.error_event_after is not None and i == script.error_event_after:
                await emit({"error": {"message": script.error_message, "type": "InternalServerError", "code": 500}})
                await emit("[DONE]")
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            completion += tokens
            reasoning_tokens += reasoning
            last = i == len(events) - 1
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish if last else None}
            if last and script.stop_reason is not None:
                choice["stop_reason"] = script.stop_reason
            if script.top_logprobs is not None and request.get("logprobs") and i < len(script.top_logprobs):
                piece = next(iter(delta.values()))
                choice["logprobs"] = _logprobs(piece, script.top_logprobs[i], chat)
            if chat:
                choice["delta"] = delta
            else:
                choice.update(delta)
            chunk: dict[str, Any] = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self.model,
                "choices": [choice],
            }
            if continuous:
                chunk["usage"] = _usage(script, completion, reasoning_tokens if script.reasoning else None)
            await emit(chunk)
            if script.delay_s:
                await asyncio.sleep(script.delay_s)
        if options.get("include_usage"):
            await emit(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": self.model,
                    "choices": [],
                    "usage": _usage(script, completion, reasoning_tokens if script.reasoning else None),
                }
            )
        await emit("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _deltas(pieces: list[str], key: str, reasoning: str | None) -> list[tuple[dict[str, str], int, int]]:
    """(delta, tokens, reasoning tokens) per chunk: one piece each, or split as a reasoning parser does."""
    if reasoning is None:
        return [({key: piece}, 1, 0) for piece in pieces]
    out: list[tuple[dict[str, str], int, int]] = []
    carried, thinking = 0, True
    for piece in pieces:
        if thinking and piece in ("<think>", "</think>"):
            carried += 1  # a delimiter token: generated, counted, never shown
            thinking = piece == "<think>"
            continue
        out.append(({reasoning if thinking else key: piece}, 1 + carried, int(thinking)))
        carried = 0
    if carried or not out:
        out.append(({key: ""}, carried, 0))
    return out


# The fake chat template: a message is <|role|>content, and the generation prompt opens an assistant turn.
# Like DeepSeek-R1's, it drops the thinking from past assistant turns (continue_final_message can't continue it);
# with chat_template_kwargs {"thinking": true} the generation prompt also opens the thinking, as newer R1 ones do.


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool, *, thinking: bool = False) -> str:
    parts = []
    for m in messages:
        content = str(m.get("content") or "")
        if m.get("role") == "assistant" and "</think>" in content:
            content = content.split("</think>")[-1]
        parts.append(f"<|{m.get('role')}|>{content}\n")
    opening = "<|assistant|>" + ("<think>\n" if thinking else "")
    return "".join(parts) + (opening if add_generation_prompt else "")


def _continues_stripped(request: dict[str, Any]) -> bool:
    messages = request.get("messages") or []
    final = str(messages[-1].get("content") or "") if messages else ""
    return bool(request.get("continue_final_message")) and "</think>" in final


def _tokenize(request: dict[str, Any]) -> dict[str, Any]:
    """``POST /tokenize``: one token per character (the code point), of the rendered chat or the prompt."""
    if "messages" in request:
        kwargs = request.get("chat_template_kwargs") or {}
        text = render_chat(
            request["messages"], bool(request.get("add_generation_prompt", True)), thinking=bool(kwargs.get("thinking"))
        )
    else:
        text = str(request.get("prompt", ""))
    tokens = [ord(c) for c in text]
    return {"count": len(tokens), "max_model_len": 4096, "tokens": tokens, "token_strs": None}


def _detokenize(request: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": "".join(chr(t) for t in request["tokens"])}


def _usage(script: Script, completion: int, reasoning_tokens: int | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": script.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": script.prompt_tokens + completion,
    }
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _logprobs(piece: str, top: dict[str, float], chat: bool) -> dict[str, Any]:
    """One token's logprobs in the endpoint's shape; the piece's own logprob is its top entry, if listed."""
    own = top.get(piece, min(top.values(), default=0.0) - 1.0)
    if chat:
        alts = [{"token": t, "logprob": v} for t, v in top.items()]
        return {"content": [{"token": piece, "logprob": own, "top_logprobs": alts}]}
    return {"tokens": [piece], "token_logprobs": [own], "top_logprobs": [dict(top)], "text_offset": [0]}


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


THINK_FILLER = ("Let", " me", " add", " 1", " and", " 2", ".", "\n")


def reasoning_pieces(n: int) -> list[str]:
    """``n`` pieces shaped like a reasoning answer: ``<think>``, filler, ``</think>``, ``\n#### 3``."""
    filler = [THINK_FILLER[i % len(THINK_FILLER)] for i in range(n - 3)]
    return ["<think>", *filler, "</think>", "\n#### 3"]


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description="Run the scripted fake engine.")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--tokens", type=int, default=10, help="pieces per response")
    ap.add_argument("--tokens-max", type=int, help="vary pieces per response uniformly in [--tokens, this]")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds to wait after each piece")
    ap.add_argument("--think", action="store_true", help="pieces shaped like reasoning: <think> ... </think> #### 3")
    ap.add_argument("--seed", type=int, default=0, help="for --tokens-max")
    args = ap.parse_args(argv)
    low, high = args.tokens, args.tokens if args.tokens_max is None else args.tokens_max
    if not (1 + 2 * args.think <= low <= high) or args.delay < 0:
        ap.error("need 1 <= --tokens <= --tokens-max (3 with --think) and --delay >= 0")

    def script(n: int) -> Script:
        return Script(pieces=reasoning_pieces(n) if args.think else ["x"] * n, delay_s=args.delay)

    engine = FakeEngine(default=script(low))
    engine.record = False
    if high > low:
        rng = random.Random(args.seed)
        engine.responder = lambda request, headers: script(rng.randint(low, high))
    uvicorn.run(engine, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
