"""``none``: never stop early (the budget still bounds it). The no-policy baseline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policies.base import CONTINUE, Decision, ProbeResult, TokenEvent


@dataclass
class NoPolicy:
    name: str = field(default="none", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    engine_params: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    engine_logprobs: int = field(default=0, init=False, repr=False)

    def on_tokens(self, event: TokenEvent) -> Decision:
        return CONTINUE

    def on_probe(self, result: ProbeResult) -> Decision:
        return CONTINUE


@dataclass
class BudgetOnly(NoPolicy):
    """``budget``: nothing but the budget, named so in metrics and the response extension."""

    name: str = field(default="budget", init=False)
