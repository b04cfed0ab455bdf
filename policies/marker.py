"""``marker``: stop as soon as the final answer is complete.

The route's answer pattern (a regex) is matched against the recent output;
when it matches, nothing after it is worth generating. The pattern should
only match a finished answer, e.g. ``####\\s*-?[\\d,.]+\\s`` (a number followed
by whitespace), or the engine would be cut mid-number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from policies.base import CONTINUE, Decision, PolicyError, ProbeResult, TokenEvent, stop

# How much trailing text is searched: bounds the cost per event.
_TAIL = 512


@dataclass
class MarkerPolicy:
    pattern: str
    name: str = field(default="marker", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    _regex: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._regex = re.compile(self.pattern)
        except re.error as exc:
            raise PolicyError(f"pattern: not a valid regular expression ({exc})") from exc

    def on_tokens(self, event: TokenEvent) -> Decision:
        if self._regex.search(event.text[-_TAIL:]):
            return stop("answer_complete")
        return CONTINUE

    def on_probe(self, result: ProbeResult) -> Decision:
        return CONTINUE
