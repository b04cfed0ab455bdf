"""``convergence``: Dynasor-CoT-style answer-convergence probes.

Every ``probe_every`` thinking tokens the session asks the model, in a side
generation, for its answer now. The policy stops once the last ``window``
probe answers are all non-empty and equal (after the route's normaliser).
With ``step_delimiter`` set, probes wait for the end of a reasoning step.
Dynasor's published stop rule forgot the "equal" part (its issue #25); here
it is the rule. Probes whose text hesitates ("wait", "hmm", ...) count as
empty, and results older than the newest one seen are stale and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policies.base import CONTINUE, PROBE, Decision, PolicyError, ProbeResult, TokenEvent, stop

DEFAULT_HESITATION = ("wait", "hmm", "but ", "however", "actually", "double-check", "let me check")


@dataclass
class ConvergencePolicy:
    probe_every: int = 32
    window: int = 3
    hesitation_words: tuple[str, ...] = DEFAULT_HESITATION
    min_tokens: int = 0
    # When set (e.g. "\n"), a due probe waits for the end of the current reasoning
    # step, so every probe sees whole steps and agreement means "no step changed it".
    step_delimiter: str = ""
    name: str = field(default="convergence", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    engine_params: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    engine_logprobs: int = field(default=0, init=False, repr=False)
    _next_probe_at: int = field(init=False, default=0)
    _answers: list[str | None] = field(init=False, default_factory=list)
    _last_at: int = field(init=False, default=-1)

    def __post_init__(self) -> None:
        if self.probe_every < 1:
            raise PolicyError(f"probe_every: must be >= 1, got {self.probe_every}")
        if self.window < 1:
            raise PolicyError(f"window: must be >= 1, got {self.window}")
        if self.min_tokens < 0:
            raise PolicyError(f"min_tokens: must be >= 0, got {self.min_tokens}")
        self.hesitation_words = tuple(w.lower() for w in self.hesitation_words)
        self._next_probe_at = max(self.probe_every, self.min_tokens)

    def on_tokens(self, event: TokenEvent) -> Decision:
        if event.phase != "thinking" or event.thinking_tokens < self._next_probe_at:
            return CONTINUE
        if self.step_delimiter:
            if self.step_delimiter not in event.new_text:
                return CONTINUE
            self._next_probe_at = event.thinking_tokens + self.probe_every
            return PROBE
        while self._next_probe_at <= event.thinking_tokens:
            self._next_probe_at += self.probe_every
        return PROBE

    def on_probe(self, result: ProbeResult) -> Decision:
        if result.at_tokens <= self._last_at:
            return CONTINUE  # stale: a newer probe already answered
        self._last_at = result.at_tokens
        text = result.text.lower()
        hesitant = any(w in text for w in self.hesitation_words)
        self._answers.append(None if hesitant or not result.answer else result.answer)
        recent = self._answers[-self.window :]
        if len(recent) == self.window and recent[0] is not None and all(a == recent[0] for a in recent):
            return stop("converged")
        return CONTINUE
