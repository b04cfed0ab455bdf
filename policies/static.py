"""``static``: vLLM's own ``thinking_token_budget``, passed through as a baseline.

The engine enforces the cap itself (it needs ``--reasoning-config`` with the
think delimiters); the gateway only forwards the parameter and watches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policies.base import CONTINUE, Decision, PolicyError, ProbeResult, TokenEvent


@dataclass
class StaticPolicy:
    thinking_token_budget: int
    name: str = field(default="static", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    engine_logprobs: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.thinking_token_budget < 0:
            raise PolicyError(f"thinking_token_budget: must be >= 0, got {self.thinking_token_budget}")

    @property
    def engine_params(self) -> dict[str, Any]:
        return {"thinking_token_budget": self.thinking_token_budget}

    def on_tokens(self, event: TokenEvent) -> Decision:
        return CONTINUE

    def on_probe(self, result: ProbeResult) -> Decision:
        return CONTINUE
