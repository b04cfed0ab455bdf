"""``marker``: stop as soon as the final answer is complete.

The route's answer pattern (a regex) is matched against the recent output;
when it matches, nothing after it is worth generating. The pattern should
only match a finished answer, e.g. ``####\\s*-?[\\d,.]+\\s`` (a number followed
by whitespace), or the engine would be cut mid-number.

A pattern that is a plain string (``\\ncheck\\n``: no character classes,
repeats or anchors) is also handed to a vLLM engine as a stop string, so the
engine ends the sequence at that step itself instead of generating on until
the gateway's disconnect reaches it (``engine_params``).

Where the pattern came from decides how it runs (issue 14). A pattern from
the routes file is trusted: Python's ``re``, checked at start-up. A pattern a
client sent runs on RE2 (``google-re2``), which matches in time linear in the
text and refuses backreferences and look-around, and it may be at most
``MAX_CLIENT_PATTERN_CHARS`` long. Either way only the last ``_TAIL``
characters of the phase are searched, so a search costs a bounded amount per
token event.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any, Protocol

import re2  # type: ignore[import-untyped]

from policies.base import CONTINUE, Decision, PolicyError, ProbeResult, TokenEvent, stop

# How much trailing text is searched: bounds the cost per event.
_TAIL = 512
# A client's pattern, in characters; the routes file may use longer ones.
MAX_CLIENT_PATTERN_CHARS = 256
# RE2's memory for one compiled client pattern (its default is 8 MiB).
_RE2_MAX_MEM = 1 << 20


class _Searcher(Protocol):
    def search(self, text: str) -> object | None: ...


class _Everything:
    """A container that holds every pattern: the routes file's own patterns are all trusted."""

    def __contains__(self, item: object) -> bool:
        return True


ALL_TRUSTED: Container[str] = _Everything()


def _compile_trusted(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise PolicyError(f"pattern: not a valid regular expression ({exc})", param="pattern") from exc


class _ClientRegex:
    """A client's pattern on RE2: linear-time search over UTF-8 bytes."""

    def __init__(self, pattern: str) -> None:
        if len(pattern) > MAX_CLIENT_PATTERN_CHARS:
            raise PolicyError(
                f"pattern: at most {MAX_CLIENT_PATTERN_CHARS} characters, got {len(pattern)}", param="pattern"
            )
        options = re2.Options()
        options.log_errors = False
        options.max_mem = _RE2_MAX_MEM
        try:
            self._regex = re2.compile(pattern.encode("utf-8"), options)
        except UnicodeEncodeError as exc:
            raise PolicyError("pattern: not valid Unicode (a lone surrogate)", param="pattern") from exc
        except re2.error as exc:
            detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            raise PolicyError(
                f"pattern: not a regular expression this gateway runs for clients ({detail}; RE2 syntax: "
                "no backreferences or look-around)",
                param="pattern",
            ) from exc

    def search(self, text: str) -> object | None:
        found: object | None = self._regex.search(text.encode("utf-8", "replace"))
        return found


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
    # True only for the routes file's own patterns (never settable by a client: see ``registry.construct``).
    _trusted: bool = field(default=False, repr=False)
    name: str = field(default="marker", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    engine_logprobs: int = field(default=0, init=False, repr=False)
    _regex: _Searcher = field(init=False, repr=False)
    _literal: str | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._regex = _compile_trusted(self.pattern) if self._trusted else _ClientRegex(self.pattern)
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
