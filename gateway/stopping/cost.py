"""The cost bound of one request: engine tokens at most ``max_cost_multiple`` times its own ``max_tokens``.

One ``CostMeter`` counts everything the engine generates for a request (DESIGN
decision 4). Before any I/O, ``sequences x max_tokens`` must fit (else a 400
naming ``max_cost_multiple``). While it runs, a probe launches only if it fits
beside what the main stream and the forced answer may still need; the forced
answer gets what is left; the main stream stops (``cost_limit``) at the
ceiling; an ensemble draws no wave that would not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import LimitExceeded
from gateway.openai.fields import prompt_count
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest

COST_STOP = "cost_limit"


def sequences(request: CompletionRequest | ChatCompletionRequest) -> int:
    """How many sequences the engine generates for the request: ``n`` (or ``best_of``) for each prompt of a batch."""
    best_of = (request.model_extra or {}).get("best_of")  # a passthrough field; getattr on a model raises inside
    per_prompt = max(request.n, best_of if isinstance(best_of, int) and not isinstance(best_of, bool) else 1)
    return per_prompt * prompt_count(request)


@dataclass
class CostMeter:
    """Engine tokens one request may still spend (shared by an ensemble's samples)."""

    limit: int
    multiple: float
    spent: int = 0

    @classmethod
    def for_request(cls, max_tokens: int, multiple: float) -> CostMeter:
        return cls(max(1, int(multiple * max_tokens)), multiple)

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent)

    def fits(self, tokens: int) -> bool:
        return self.spent + tokens <= self.limit

    def charge(self, tokens: int) -> bool:
        """Count ``tokens``; False once the request is past its ceiling."""
        self.spent += tokens
        return self.spent <= self.limit

    def require(self, sequences: int, max_tokens: int, *, param: str, what: str) -> None:
        """Refuse, before any I/O, a request whose own shape asks for more than the ceiling."""
        asked = sequences * max_tokens
        if asked > self.limit:
            raise LimitExceeded(
                f"{what} asks the engine for up to {asked} tokens ({sequences} x max_tokens {max_tokens}); "
                f"a request may cost at most max_cost_multiple={self.multiple:g} x its max_tokens "
                f"= {self.limit} tokens (STOPGATE_MAX_COST_MULTIPLE).",
                param=param,
            )
