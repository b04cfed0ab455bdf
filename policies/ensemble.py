"""``ensemble``: Adaptive-Consistency-style voting over samples drawn in waves.

Samples are drawn ``wave`` at a time, up to ``max_samples``; each sample may
itself run another stop policy (``inner``). After each wave the rule stops
drawing when the whole first wave agrees, or when the leader's Beta
posterior, P(p_leader > p_runner_up), reaches ``confidence``. The answer is
the majority (ties go to the answer seen first). Samples with no extractable
answer do not vote.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import comb

from policies.base import PolicyError


@dataclass(frozen=True)
class EnsembleParams:
    wave: int = 2
    max_samples: int = 6
    confidence: float = 0.95
    inner: str = "none"
    temperature: float = 0.7

    def __post_init__(self) -> None:
        if self.wave < 1:
            raise PolicyError(f"wave: must be >= 1, got {self.wave}")
        if self.max_samples < self.wave:
            raise PolicyError(f"max_samples: must be >= wave ({self.wave}), got {self.max_samples}")
        if not 0.5 < self.confidence < 1.0:
            raise PolicyError(f"confidence: must be in (0.5, 1), got {self.confidence}")
        if self.inner == "ensemble":
            raise PolicyError("inner: an ensemble cannot nest another ensemble")
        if not 0.0 <= self.temperature <= 2.0:
            raise PolicyError(f"temperature: must be in [0, 2], got {self.temperature}")


@dataclass(frozen=True)
class Verdict:
    done: bool
    answer: str | None
    reason: str
    next_wave: int = 0


def leader_posterior(leader: int, runner_up: int) -> float:
    """P(X > 1/2) for X ~ Beta(leader + 1, runner_up + 1), exactly, for integer counts.

    Uses P(Beta(a, b) <= x) = P(Binomial(a + b - 1, x) >= a).
    """
    n = leader + runner_up + 1
    return float(sum(comb(n, j) for j in range(leader + 1)) / 2**n)


def majority(answers: list[str | None]) -> tuple[str | None, int, int]:
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0, 0
    ranked = sorted(votes.items(), key=lambda kv: (-kv[1], answers.index(kv[0])))
    leader, count = ranked[0]
    runner_up = ranked[1][1] if len(ranked) > 1 else 0
    return leader, count, runner_up


def judge(answers: list[str | None], params: EnsembleParams) -> Verdict:
    """After a wave: stop (with the majority answer) or draw another wave."""
    drawn = len(answers)
    leader, count, runner_up = majority(answers)
    first_wave = answers[: params.wave]
    if drawn == params.wave and leader is not None and all(a == leader for a in first_wave):
        return Verdict(True, leader, "unanimous")
    if leader is not None and leader_posterior(count, runner_up) >= params.confidence:
        return Verdict(True, leader, "posterior")
    if drawn >= params.max_samples:
        return Verdict(True, leader, "max_samples")
    return Verdict(False, leader, "drawing", min(params.wave, params.max_samples - drawn))
