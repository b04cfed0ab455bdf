"""``loop``: stop when the reasoning repeats itself.

The tail of the thinking text is checked for a block of ``min_period`` to
``max_period`` characters repeated ``repeats`` times back to back, the shape
of a model stuck in a loop. The check costs O(max_period x repeats) per event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policies.base import CONTINUE, Decision, PolicyError, ProbeResult, TokenEvent, stop


@dataclass
class LoopPolicy:
    min_period: int = 4
    max_period: int = 200
    repeats: int = 4
    name: str = field(default="loop", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    engine_params: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    engine_logprobs: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_period <= self.max_period:
            raise PolicyError(
                f"min_period/max_period: need 1 <= min_period <= max_period, got {self.min_period}/{self.max_period}"
            )
        if self.repeats < 2:
            raise PolicyError(f"repeats: must be >= 2, got {self.repeats}")

    def on_tokens(self, event: TokenEvent) -> Decision:
        if event.phase == "thinking" and is_looping(event.text, self.min_period, self.max_period, self.repeats):
            return stop("loop")
        return CONTINUE

    def on_probe(self, result: ProbeResult) -> Decision:
        return CONTINUE


def is_looping(text: str, min_period: int, max_period: int, repeats: int) -> bool:
    """True if ``text`` ends with some block repeated ``repeats`` times."""
    n = len(text)
    for period in range(min_period, min(max_period, n // repeats) + 1):
        # A span is p-periodic iff it equals itself shifted by p: one C-level compare per period.
        span = text[n - period * repeats :]
        if span[period:] == span[:-period]:
            return True
    return False
