"""OpenAI chunks in one place: parse them, read their text, build them, fold them into a response.

The gateway always streams from the engine, even for a non-streaming client:
the stop policies watch the token stream either way. ``ChunkParser`` turns
each OpenAI chunk (completions or chat) into ``ChoiceDelta`` events,
``choice_text`` reads choice 0's text, ``text_chunk`` and ``response_chunk``
build the chunks the gateway writes itself, and ``ResponseBuilder`` (or
``collect``) folds chunks back into one non-streaming response body.

An engine with a reasoning parser (vLLM's ``--reasoning-parser``) sends the
thinking of a chat response in ``delta.reasoning`` (vLLM 0.32) or
``delta.reasoning_content`` (older vLLM, many other engines) and only the
answer in ``content``: ``ChoiceDelta.reasoning`` carries the former, and
``ResponseBuilder`` keeps whichever field names the engine used.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.openai.protocol import Endpoint


@dataclass(slots=True)
class ChoiceDelta:
    """One choice's new output in one chunk. Treat it as immutable; it is not frozen
    because one is built per chunk and a frozen dataclass builds six times slower."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None
    logprobs: Any = None
    reasoning: str = ""  # chat only: the thinking a reasoning parser split off the content


@dataclass
class ChunkParser:
    """Token counts come from vLLM's continuous usage stats when present,
    else from the logprobs' token list, else one token per non-empty chunk."""

    endpoint: Endpoint
    _completion_tokens: int = 0
    # The field a reasoning parser puts the thinking in, once the engine has sent one.
    reasoning_field: str | None = None

    def parse(self, chunk: dict[str, Any]) -> list[ChoiceDelta]:
        choices = chunk.get("choices") or []
        usage = chunk.get("usage")
        usage_delta: int | None = None
        if isinstance(usage, dict) and choices and isinstance(usage.get("completion_tokens"), int):
            usage_delta = usage["completion_tokens"] - self._completion_tokens
            self._completion_tokens = usage["completion_tokens"]
        out = []
        chat = self.endpoint == "chat"
        for choice in choices:
            reasoning = ""
            if chat:
                delta = choice.get("delta") or {}
                text = str(delta.get("content") or "")
                if len(delta) > 1 or not text:  # a plain content delta (most chunks) carries no reasoning
                    key, reasoning = reasoning_of(delta)
                    if key is not None and self.reasoning_field is None:
                        self.reasoning_field = key
            else:
                text = str(choice.get("text") or "")
            logprobs = choice.get("logprobs")
            if usage_delta is not None and len(choices) == 1:
                tokens = usage_delta
            elif logprobs:
                tokens = _logprob_count(logprobs)
            else:
                tokens = 1 if text or reasoning else 0
            index = int(choice.get("index", 0))
            out.append(ChoiceDelta(index, text, tokens, choice.get("finish_reason"), logprobs, reasoning))
        return out


REASONING_FIELDS = ("reasoning", "reasoning_content")


def reasoning_of(delta: dict[str, Any]) -> tuple[str | None, str]:
    """The thinking in a chat delta, and its field's name (an engine may send both names, alike)."""
    for key in REASONING_FIELDS:
        value = delta.get(key)
        if value:
            return key, str(value)
    return None, ""


def _logprob_count(logprobs: dict[str, Any]) -> int:
    if isinstance(logprobs.get("content"), list):
        return len(logprobs["content"])
    if isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    return 1


@dataclass
class _ChoiceAcc:
    text: list[str] = field(default_factory=list)
    reasoning: dict[str, list[str]] = field(default_factory=dict)  # by the field name the engine used
    finish_reason: str | None = None
    stop_reason: Any = None
    logprobs: dict[str, Any] | None = None


class ResponseBuilder:
    """Fold streamed chunks into the non-streaming response object."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, _ChoiceAcc] = {}
        self.usage: dict[str, Any] | None = None
        self.extension: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk and key not in self.meta:
                self.meta[key] = chunk[key]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if "stopgate" in chunk:
            self.extension = chunk["stopgate"]
        for choice in chunk.get("choices") or []:
            index = int(choice.get("index", 0))
            acc = self.choices.get(index)
            if acc is None:
                acc = self.choices[index] = _ChoiceAcc()
            if self.endpoint == "completions":
                acc.text.append(choice.get("text") or "")
            else:
                delta = choice.get("delta") or {}
                acc.text.append(delta.get("content") or "")
                for key in REASONING_FIELDS:
                    if delta.get(key):
                        acc.reasoning.setdefault(key, []).append(delta[key])
            if choice.get("finish_reason") is not None:
                acc.finish_reason = choice["finish_reason"]
            if choice.get("stop_reason") is not None:
                acc.stop_reason = choice["stop_reason"]
            if choice.get("logprobs"):
                acc.logprobs = _merge_logprobs(acc.logprobs, choice["logprobs"])

    def build(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            acc = self.choices[index]
            text = "".join(acc.text)
            if self.endpoint == "completions":
                item: dict[str, Any] = {"index": index, "text": text, "logprobs": acc.logprobs}
            else:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                for key, pieces in acc.reasoning.items():
                    message[key] = "".join(pieces)
                item = {"index": index, "message": message, "logprobs": acc.logprobs}
            item["finish_reason"] = acc.finish_reason
            if acc.stop_reason is not None:
                item["stop_reason"] = acc.stop_reason
            choices.append(item)
        body: dict[str, Any] = {
            "id": self.meta.get("id"),
            "object": "text_completion" if self.endpoint == "completions" else "chat.completion",
            "created": self.meta.get("created"),
            "model": self.meta.get("model"),
            "choices": choices,
            "usage": self.usage,
        }
        if "system_fingerprint" in self.meta:
            body["system_fingerprint"] = self.meta["system_fingerprint"]
        if self.extension is not None:
            body["stopgate"] = self.extension
        return body


def _merge_logprobs(acc: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Concatenate list-valued logprob fields (chat ``content``; completions' parallel lists)."""
    if acc is None:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in new.items()}
    for key, value in new.items():
        if isinstance(value, list) and isinstance(acc.get(key), list):
            acc[key].extend(value)
        elif key not in acc:
            acc[key] = value
    return acc


def choice_text(chunk: Mapping[str, Any]) -> str:
    """The text of choice 0 in a completion or chat chunk, or in a whole response."""
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) == 0:
            if "text" in choice:
                return str(choice.get("text") or "")
            delta = choice.get("delta") or choice.get("message") or {}
            return str(delta.get("content") or "")
    return ""


def text_chunk(
    endpoint: Endpoint,
    text: str,
    *,
    model: str,
    meta: Mapping[str, Any],
    default_id: str,
    finish_reason: str | None = None,
    field: str = "content",
) -> dict[str, Any]:
    """A one-choice chunk the gateway writes itself (chat: ``text`` in ``field`` of the delta).

    ``meta`` holds the upstream stream's ``id``, ``object`` and ``created``, so the gateway's chunks join it.
    """
    chat = endpoint == "chat"
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    if chat:
        choice["delta"] = {field: text} if text else {}
    else:
        choice["text"] = text
    return {
        "id": meta.get("id", default_id),
        "object": meta.get("object", "chat.completion.chunk" if chat else "text_completion"),
        "created": meta.get("created", int(time.time())),
        "model": model,
        "choices": [choice],
    }


def response_chunk(
    body: Mapping[str, Any], endpoint: Endpoint, *, model: str, extension: dict[str, Any]
) -> dict[str, Any]:
    """A whole response (choice 0) as one final stream chunk; its ``usage`` is the extension's token count."""
    chat = endpoint == "chat"
    choice = dict(body["choices"][0])
    if chat:
        message = choice.pop("message", {})
        choice["delta"] = {"role": "assistant", "content": message.get("content", "")}
    tokens = extension["tokens"]
    completion = tokens["thinking"] + tokens["answer"] + tokens["forced"]
    return {
        "id": body.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": body.get("created"),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": tokens["prompt"],
            "completion_tokens": completion,
            "total_tokens": tokens["prompt"] + completion,
        },
        "stopgate": extension,
    }


async def collect(chunks: AsyncIterator[dict[str, Any]], endpoint: Endpoint) -> dict[str, Any]:
    """Read a chunk stream to its end and fold it into the non-streaming response body."""
    builder = ResponseBuilder(endpoint)
    async for chunk in chunks:
        builder.add(chunk)
    return builder.build()
