"""``brake``: a zero-token stop from the main stream's own logprobs (ThinkBrake, arXiv 2510.00546).

At each step boundary of the reasoning (after ``step``, a newline by
default) the model chooses between writing another step and closing the
reasoning. When the think-close token's log probability comes within
``margin`` nats of the top token's there, the model is nearly ready to
answer: stop, and the session forces the answer. No probe is sent; the only
cost is asking the engine for the top ``top_logprobs`` alternatives of each
main-stream token (``engine_logprobs``). A close token outside the top
alternatives is treated as out of reach. ``min_tokens`` holds off the first
boundaries.

DeepConf (arXiv 2508.15260) reads the same logprobs the other way: a token's
confidence is minus the mean log probability of its top alternatives, and a
trace whose group confidence (the mean over the last ``window`` tokens) falls
below ``min_confidence`` is unlikely to end right. With ``window`` > 0 the
policy stops such a trace (``low_confidence``) instead of letting it run on.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.base import CONTINUE, Decision, PolicyError, ProbeResult, TokenEvent, stop

MAX_TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_MIN_TOKENS = 1_000_000  # far beyond any route's budget; a bound so a client cannot send a 400-digit int


@dataclass
class BrakePolicy:
    margin: float = 1.0
    close: str = "</think>"
    step: str = "\n"
    top_logprobs: int = 5
    min_tokens: int = 0
    window: int = 0
    min_confidence: float = 0.0
    name: str = field(default="brake", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    _at_boundary: bool = field(init=False, default=False)
    _recent: deque[float] = field(init=False, default_factory=deque)
    _sum: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        for name in ("margin", "min_confidence"):
            if not math.isfinite(getattr(self, name)):
                raise PolicyError(f"{name}: must be a finite number, got {getattr(self, name)}")
        if not 0.0 <= self.margin <= 50.0:
            raise PolicyError(f"margin: must be in [0, 50] nats, got {self.margin}")
        if not self.close or len(self.close) > 64:
            raise PolicyError(f"close: 1 to 64 characters, got {self.close!r}")
        if not self.step or len(self.step) > 16:
            raise PolicyError(f"step: 1 to 16 characters, got {self.step!r}")
        if not 1 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise PolicyError(f"top_logprobs: must be in 1..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if not 0 <= self.min_tokens <= MAX_MIN_TOKENS:
            raise PolicyError(f"min_tokens: must be in 0..{MAX_MIN_TOKENS}, got {self.min_tokens}")
        if not 0 <= self.window <= 4096:
            raise PolicyError(f"window: must be in 0..4096 tokens (0: off), got {self.window}")
        if not 0.0 <= self.min_confidence <= 100.0:
            raise PolicyError(f"min_confidence: must be in [0, 100], got {self.min_confidence}")

    @property
    def engine_params(self) -> dict[str, Any]:
        return {}

    @property
    def engine_logprobs(self) -> int:
        """How many top alternatives per main-stream token the engine must return."""
        return self.top_logprobs

    def on_tokens(self, event: TokenEvent) -> Decision:
        if event.phase != "thinking" or not event.top:
            return CONTINUE
        for choice in event.top:
            if self._at_boundary and event.thinking_tokens >= self.min_tokens and choice.token != self.close:
                close = choice.top.get(self.close)
                best = max([choice.logprob, *choice.top.values()])
                if close is not None and best - close <= self.margin:
                    return stop("brake")
            self._at_boundary = choice.token.endswith(self.step)
            if self.window and self._low_confidence(choice.top):
                return stop("low_confidence")
        return CONTINUE

    def _low_confidence(self, top: Mapping[str, float]) -> bool:
        """DeepConf's group confidence over the last ``window`` tokens is below ``min_confidence``."""
        finite = [v for v in top.values() if v > -1e9]
        confidence = -sum(finite) / len(finite) if finite else 0.0
        self._recent.append(confidence)
        self._sum += confidence
        if len(self._recent) > self.window:
            self._sum -= self._recent.popleft()
        return len(self._recent) == self.window and self._sum / self.window < self.min_confidence

    def on_probe(self, result: ProbeResult) -> Decision:
        return CONTINUE
