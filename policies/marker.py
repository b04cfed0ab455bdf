"""``marker``: stop as soon as the final answer is complete.

The route's answer pattern (a regex) is matched against the recent output;
when it matches, nothing after it is worth generating. The pattern should
only match a finished answer, e.g. ``####\\s*-?[\\d,.]+\\s`` (a number followed
by whitespace), or the engine would be cut mid-number.

A pattern that is a plain string (``\\ncheck\\n``: no character classes,
repeats or anchors) is also handed to a vLLM engine as a stop string, so the
engine ends the sequence at that step itself instead of generating on until
the gateway's disconnect reaches it (``engine_params``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from policies.base import CONTINUE, Decision, PolicyError, ProbeResult, TokenEvent, stop

# How much trailing text is searched: bounds the cost per event.
_TAIL = 512
_SPECIAL = set("()[]{}?*+|^$.")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def literal(pattern: str) -> str | None:
    """The exact string ``pattern`` matches if it is a plain string (escapes allowed), else None."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c in _SPECIAL:
            return None
        if c == "\\":
            if i + 1 == len(pattern):
                return None
            nxt = pattern[i + 1]
            if nxt in _ESCAPES:
                c = _ESCAPES[nxt]
            elif nxt.isalnum():  # \d, \s, \b, \1, ...: a class, an anchor or a group
                return None
            else:
                c = nxt  # an escaped punctuation character stands for itself
            i += 1
        out.append(c)
        i += 1
    return "".join(out) or None


@dataclass
class MarkerPolicy:
    pattern: str
    name: str = field(default="marker", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    _regex: re.Pattern[str] = field(init=False, repr=False)
    _literal: str | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._regex = re.compile(self.pattern)
        except re.error as exc:
            raise PolicyError(f"pattern: not a valid regular expression ({exc})") from exc
        self._literal = literal(self.pattern)

    @property
    def engine_params(self) -> dict[str, Any]:
        """Stop-string fields for a vLLM engine (none for a real regex); the text keeps the marker."""
        if self._literal is None:
            return {}
        return {"stop": [self._literal], "include_stop_str_in_output": True}

    def on_tokens(self, event: TokenEvent) -> Decision:
        if self._regex.search(event.text[-_TAIL:]):
            return stop("answer_complete")
        return CONTINUE

    def on_probe(self, result: ProbeResult) -> Decision:
        return CONTINUE
