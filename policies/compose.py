"""Composition: the budget is always the outer bound of whatever policy runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.base import Action, Decision, ProbeResult, StopPolicy, TokenEvent
from policies.budget import BudgetPolicy


@dataclass
class Bounded:
    """Run ``inner`` inside ``budget``: a budget stop wins over anything the inner policy says."""

    budget: BudgetPolicy
    inner: StopPolicy
    name: str = field(init=False)
    wants_logprobs: bool = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.inner.name
        self.wants_logprobs = self.inner.wants_logprobs

    @property
    def engine_params(self) -> Mapping[str, Any]:
        return self.inner.engine_params

    @property
    def engine_logprobs(self) -> int:
        return self.inner.engine_logprobs

    def on_tokens(self, event: TokenEvent) -> Decision:
        outer = self.budget.on_tokens(event)
        if outer.action is Action.STOP:
            return outer
        return self.inner.on_tokens(event)

    def on_probe(self, result: ProbeResult) -> Decision:
        return self.inner.on_probe(result)
