"""Parse upstream chunks into tokens and text, and merge chunks into a response.

The gateway always streams from the engine, even for a non-streaming client:
the stop policies watch the token stream either way. ``ChunkParser`` turns
each OpenAI chunk (completions or chat) into ``ChoiceDelta`` events, and
``ResponseBuilder`` folds chunks back into one non-streaming response body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.protocol import Endpoint


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    text: str
    tokens: int
    finish_reason: str | None
    logprobs: Any = None


@dataclass
class ChunkParser:
    """Token counts come from vLLM's continuous usage stats when present,
    else from the logprobs' token list, else one token per non-empty chunk."""

    endpoint: Endpoint
    _completion_tokens: int = 0

    def parse(self, chunk: dict[str, Any]) -> list[ChoiceDelta]:
        choices = chunk.get("choices") or []
        usage = chunk.get("usage")
        usage_delta: int | None = None
        if isinstance(usage, dict) and choices and isinstance(usage.get("completion_tokens"), int):
            usage_delta = usage["completion_tokens"] - self._completion_tokens
            self._completion_tokens = usage["completion_tokens"]
        out = []
        for choice in choices:
            text = self._text(choice)
            logprobs = choice.get("logprobs")
            if usage_delta is not None and len(choices) == 1:
                tokens = usage_delta
            elif logprobs:
                tokens = _logprob_count(logprobs)
            else:
                tokens = 1 if text else 0
            out.append(ChoiceDelta(int(choice.get("index", 0)), text, tokens, choice.get("finish_reason"), logprobs))
        return out

    def _text(self, choice: dict[str, Any]) -> str:
        if self.endpoint == "completions":
            return str(choice.get("text") or "")
        delta = choice.get("delta") or {}
        return str(delta.get("content") or "")


def _logprob_count(logprobs: dict[str, Any]) -> int:
    if isinstance(logprobs.get("content"), list):
        return len(logprobs["content"])
    if isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    return 1


@dataclass
class _ChoiceAcc:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
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
            acc = self.choices.setdefault(int(choice.get("index", 0)), _ChoiceAcc())
            if self.endpoint == "completions":
                acc.text.append(choice.get("text") or "")
            else:
                delta = choice.get("delta") or {}
                acc.text.append(delta.get("content") or "")
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    acc.reasoning.append(reasoning)
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
                if acc.reasoning:
                    message["reasoning_content"] = "".join(acc.reasoning)
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
