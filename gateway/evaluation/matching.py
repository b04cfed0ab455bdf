"""Matching live requests to reference items.

A request names its item explicitly (``reference_id``), or it matches by an
exact hash of its normalised prompt. Normalising is deliberately light so a
match is never a guess: Unicode NFC, each run of whitespace to one space, ends
stripped. Case and punctuation count.

A chat request keys on its messages; a single user message keys like a plain
prompt, so an item written with ``prompt`` matches a chat request that sends
the same text as its one user message.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gateway.evaluation.references import ReferenceItem, ReferenceSet
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["ReferenceIndex", "messages_key", "normalize_prompt", "prompt_key", "request_key", "steering_override"]

_SPACE = re.compile(r"\s+")


def normalize_prompt(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def prompt_key(text: str) -> str:
    return hashlib.sha256(normalize_prompt(text).encode()).hexdigest()


def messages_key(messages: Sequence[tuple[str, str]]) -> str:
    """Key of a chat prompt given as ``(role, content)`` pairs."""
    if len(messages) == 1 and messages[0][0] == "user":
        return prompt_key(messages[0][1])
    return prompt_key("\n".join(f"{role}: {normalize_prompt(content)}" for role, content in messages))


def request_key(request: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The key of a live request's prompt (None for a batch, token ids or non-text chat content)."""
    if isinstance(request, CompletionRequest):
        return prompt_key(request.prompt) if isinstance(request.prompt, str) else None
    pairs = [(m.role, m.content) for m in request.messages if isinstance(m.content, str)]
    return messages_key(pairs) if len(pairs) == len(request.messages) else None


# Fields a gold request may send without changing what the route would generate: who asked, and
# how the answer comes back. Sampling at the canaries' own setting (greedy) is the route's too.
_NEUTRAL = frozenset(
    {"prompt", "messages", "user", "logprobs", "top_logprobs", "echo", "max_completion_tokens", "max_tokens"}
)
_ROUTE_SAMPLING = {"temperature": 0}


def steering_override(request: CompletionRequest | ChatCompletionRequest, default_max_tokens: int) -> str | None:
    """The field that makes a request's EM say nothing about the route's settings, or None (issue 14).

    The ``stopgate`` override, any field that changes what is generated (sampling, stop strings,
    penalties, ``n``, ...), and ``max_tokens`` below what the route gives a request by default.
    """
    if request.stopgate is not None and request.stopgate.overrides:
        return "stopgate"
    if request.n != 1:
        return "n"
    asked = request.max_tokens
    if isinstance(request, ChatCompletionRequest):
        asked = request.effective_max_tokens
    if asked is not None and asked < default_max_tokens:
        return "max_tokens"
    for name, value in request.passthrough().items():
        if name in _NEUTRAL:
            continue
        if name in _ROUTE_SAMPLING and value == _ROUTE_SAMPLING[name]:
            continue
        return name
    return None


def item_key(item: ReferenceItem) -> str:
    if item.prompt is not None:
        return prompt_key(item.prompt)
    assert item.messages is not None
    return messages_key([(m.role, m.content) for m in item.messages])


@dataclass(frozen=True)
class ReferenceIndex:
    """The reference items of one route, from one or more sets, by id and by prompt key.

    Immutable: an upload builds a new index and swaps it in whole, so a reader
    never sees half a set.
    """

    sets: tuple[ReferenceSet, ...] = ()
    _by_id: dict[str, ReferenceItem] = field(init=False, repr=False, compare=False)
    _by_key: dict[str, ReferenceItem] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id: dict[str, ReferenceItem] = {}
        by_key: dict[str, ReferenceItem] = {}
        for ref_set in self.sets:
            for item in ref_set:
                if item.id in by_id:
                    raise ValueError(f"reference set {ref_set.name!r}: duplicate id {item.id!r} (also in another set)")
                by_id[item.id] = item
                by_key.setdefault(item_key(item), item)
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_by_key", by_key)

    def replace(self, ref_set: ReferenceSet) -> ReferenceIndex:
        """A new index with ``ref_set`` added, or replacing the set of the same name."""
        return ReferenceIndex((*(s for s in self.sets if s.name != ref_set.name), ref_set))

    def without(self, name: str) -> ReferenceIndex:
        """A new index without the set called ``name``."""
        return ReferenceIndex(tuple(s for s in self.sets if s.name != name))

    def by_id(self, item_id: str) -> ReferenceItem | None:
        return self._by_id.get(item_id)

    def by_key(self, key: str) -> ReferenceItem | None:
        return self._by_key.get(key)

    def items(self) -> list[ReferenceItem]:
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def names(self) -> Iterable[str]:
        return (s.name for s in self.sets)
