"""``confidence``: DEER-style stop on a confident trial answer.

Probes request token logprobs. When a probe's answer is non-empty and the
probability of its tokens, aggregated by ``mean`` or ``min``, reaches
``threshold``, the model is confident enough: stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from policies.base import CONTINUE, PROBE, Decision, PolicyError, ProbeResult, TokenEvent, stop


@dataclass
class ConfidencePolicy:
    probe_every: int = 32
    threshold: float = 0.95
    aggregate: str = "mean"
    min_tokens: int = 0
    name: str = field(default="confidence", init=False)
    wants_logprobs: bool = field(default=True, init=False)
    engine_params: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    engine_logprobs: int = field(default=0, init=False, repr=False)
    _next_probe_at: int = field(init=False, default=0)
    _last_at: int = field(init=False, default=-1)

    def __post_init__(self) -> None:
        if self.probe_every < 1:
            raise PolicyError(f"probe_every: must be >= 1, got {self.probe_every}")
        if not 0.0 < self.threshold <= 1.0:
            raise PolicyError(f"threshold: must be in (0, 1], got {self.threshold}")
        if self.aggregate not in ("mean", "min"):
            raise PolicyError(f"aggregate: must be 'mean' or 'min', got {self.aggregate!r}")
        if self.min_tokens < 0:
            raise PolicyError(f"min_tokens: must be >= 0, got {self.min_tokens}")
        self._next_probe_at = max(self.probe_every, self.min_tokens)

    def on_tokens(self, event: TokenEvent) -> Decision:
        if event.phase != "thinking" or event.thinking_tokens < self._next_probe_at:
            return CONTINUE
        while self._next_probe_at <= event.thinking_tokens:
            self._next_probe_at += self.probe_every
        return PROBE

    def on_probe(self, result: ProbeResult) -> Decision:
        if result.at_tokens <= self._last_at:
            return CONTINUE
        self._last_at = result.at_tokens
        if not result.answer or not result.logprobs:
            return CONTINUE
        if confidence(result.logprobs, self.aggregate) >= self.threshold:
            return stop("confident")
        return CONTINUE


def confidence(logprobs: tuple[float, ...], aggregate: str) -> float:
    probs = [math.exp(lp) for lp in logprobs]
    return min(probs) if aggregate == "min" else sum(probs) / len(probs)
