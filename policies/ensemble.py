"""``ensemble``: Adaptive-Consistency-style voting over samples drawn in waves.

Samples are drawn ``wave`` at a time, up to ``max_samples``; each sample may
itself run another stop policy (``inner``). After each wave the rule stops
drawing when the whole first wave agrees, or when the leader's Beta
posterior, P(p_leader > p_runner_up), reaches ``confidence``. The answer is
the majority (ties go to the answer seen first). Samples with no extractable
answer do not vote.

**Members across stopping settings.** With ``members`` (each a policy, its
parameters, a budget and a vote ``weight``), sample ``i`` runs member ``i
mod len(members)``: e.g. budget 64, budget 96 and a cue, combined by a
weighted vote (``weighted_judge``; Adaptive-Consistency over heterogeneous
members). The stopping rule is the same with weights for counts: the Beta
posterior of the leader's weight against the runner-up's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import comb, exp, lgamma, log

from policies.base import PolicyError

MAX_MEMBERS = 8
MAX_WEIGHT = 100.0


@dataclass(frozen=True)
class Member:
    """One stopping setting of a heterogeneous ensemble (``budget`` None: the request's budget)."""

    policy: str
    params: Mapping[str, object] = field(default_factory=dict)
    budget: int | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.policy == "ensemble":
            raise PolicyError("members: a member cannot be another ensemble")
        if self.budget is not None and self.budget < 1:
            raise PolicyError(f"members: budget must be >= 1, got {self.budget}")
        if not 0.0 < self.weight <= MAX_WEIGHT:
            raise PolicyError(f"members: weight must be in (0, {MAX_WEIGHT:g}], got {self.weight}")


@dataclass(frozen=True)
class EnsembleParams:
    wave: int = 2
    max_samples: int = 6
    confidence: float = 0.95
    inner: str = "none"
    temperature: float = 0.7
    members: tuple[Member, ...] = field(default=())

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
        if len(self.members) > MAX_MEMBERS:
            raise PolicyError(f"members: at most {MAX_MEMBERS}, got {len(self.members)}")

    def member(self, index: int) -> Member | None:
        """The stopping setting of sample ``index`` (None: the plan's ``inner`` policy)."""
        return self.members[index % len(self.members)] if self.members else None

    def weights(self, drawn: int) -> list[float]:
        """The vote weight of each of the first ``drawn`` samples."""
        return [m.weight if (m := self.member(i)) is not None else 1.0 for i in range(drawn)]


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


def beta_above_half(a: float, b: float, steps: int = 400) -> float:
    """P(X > 1/2) for X ~ Beta(a, b), a, b >= 1, by Simpson's rule (weights need not be whole)."""
    norm = lgamma(a) + lgamma(b) - lgamma(a + b)
    h = 0.5 / steps
    total = 0.0
    for k in range(steps + 1):
        x = 0.5 + k * h
        density = 0.0 if x >= 1.0 and b > 1 else exp((a - 1) * log(x) + (b - 1) * log(max(1e-300, 1 - x)) - norm)
        total += density * (1 if k in (0, steps) else 4 if k % 2 else 2)
    return min(1.0, max(0.0, total * h / 3))


def weighted_majority(answers: Sequence[str | None], weights: Sequence[float]) -> tuple[str | None, float, float]:
    """The answer with the most weight (ties: seen first), its weight, and the runner-up's."""
    votes: dict[str, float] = {}
    for answer, weight in zip(answers, weights, strict=True):
        if answer is not None:
            votes[answer] = votes.get(answer, 0.0) + weight
    if not votes:
        return None, 0.0, 0.0
    ranked = sorted(votes.items(), key=lambda kv: (-kv[1], answers.index(kv[0])))
    return ranked[0][0], ranked[0][1], ranked[1][1] if len(ranked) > 1 else 0.0


def weighted_judge(answers: Sequence[str | None], params: EnsembleParams) -> Verdict:
    """``judge`` for members with weights: the posterior of the leader's weight against the runner-up's."""
    drawn = len(answers)
    leader, top, second = weighted_majority(answers, params.weights(drawn))
    first_wave = answers[: params.wave]
    if drawn == params.wave and leader is not None and all(a == leader for a in first_wave):
        return Verdict(True, leader, "unanimous")
    if leader is not None and beta_above_half(top + 1, second + 1) >= params.confidence:
        return Verdict(True, leader, "posterior")
    if drawn >= params.max_samples:
        return Verdict(True, leader, "max_samples")
    return Verdict(False, leader, "drawing", min(params.wave, params.max_samples - drawn))
