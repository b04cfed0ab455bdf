"""``budget``: stop the reasoning at a fixed number of thinking tokens (s1-style budget forcing).

The session then closes the reasoning and lets the model write its answer.
Every other policy runs inside a budget: it is the outer bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policies.base import CONTINUE, Decision, PolicyError, ProbeResult, TokenEvent, stop


@dataclass
class BudgetPolicy:
    budget: int
    name: str = field(default="budget", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    engine_params: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    engine_logprobs: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise PolicyError(f"budget: must be >= 1, got {self.budget}")

    def on_tokens(self, event: TokenEvent) -> Decision:
        if event.phase == "thinking" and event.thinking_tokens >= self.budget:
            return stop("budget")
        return CONTINUE

    def on_probe(self, result: ProbeResult) -> Decision:
        return CONTINUE
