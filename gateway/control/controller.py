"""The per-route feedback controller: a pure ``step(state, correct, config) -> state``.

It moves a route's thinking budget so that EM stays at the target with the
fewest tokens. The budget only changes on statistical evidence about the
budget in force, counted since the last change:

* **Loosen** (quality first, so the test is quick): once the Wilson upper
  bound (``z_loosen``) of EM at the current budget is below the target, the
  budget is marked *bad* and the controller goes back to the smallest budget
  known *good*, or grows by ``loosen`` if none is known.
* **Tighten** (tokens second, so the test is strict): once the Wilson lower
  bound (``z_tighten``) is at or above the target, after ``min_samples`` and
  a ``cooldown``, the budget is marked *good* and shrinks by ``tighten``; if
  that would reach a known-bad budget, it bisects between bad and good
  instead, and stops (settled) when they are within ``resolution``.

EM rises with the budget, so this is a noisy bisection for the smallest
budget that meets the target. Known good and bad budgets are forgotten after
``memory`` samples, so the controller keeps learning when traffic changes
(easier traffic lets it tighten again; harder traffic fails the good budget
and it loosens). ``frozen`` stops all changes (an operator's override).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ControllerConfig:
    target: float = 0.8
    min_budget: int = 8
    max_budget: int = 400
    min_samples: int = 20
    cooldown: int = 10
    z_tighten: float = 1.645
    z_loosen: float = 1.0
    min_loosen_samples: int = 8
    tighten: float = 0.8
    loosen: float = 1.3
    resolution: float = 0.05
    memory: int = 1500
    window: int = 50

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target: must be in (0, 1], got {self.target}")
        if not 1 <= self.min_budget <= self.max_budget:
            raise ValueError(f"min_budget/max_budget: need 1 <= min <= max, got {self.min_budget} > {self.max_budget}")
        if not 0.0 < self.tighten < 1.0 or self.loosen <= 1.0:
            raise ValueError("tighten must be in (0, 1) and loosen > 1")
        if self.min_samples < 1 or self.min_loosen_samples < 1 or self.window < 1 or self.memory < 1:
            raise ValueError("min_samples, min_loosen_samples, window and memory must be >= 1")


@dataclass(frozen=True)
class ControllerState:
    budget: int
    hits: int = 0  # correct samples at the current budget, since it was set
    n: int = 0  # samples at the current budget
    since_change: int = 0
    good: int | None = None  # smallest budget whose EM was shown to meet the target
    bad: int | None = None  # largest budget whose EM was shown to miss it
    age: int = 0  # samples since good/bad were learned
    window: tuple[bool, ...] = ()  # the last ``config.window`` outcomes, for reporting
    last_direction: int = 0  # +1 loosened, -1 tightened
    adjustments: int = 0
    frozen: bool = False

    @property
    def window_em(self) -> float:
        return sum(self.window) / len(self.window) if self.window else math.nan


def initial_state(config: ControllerConfig) -> ControllerState:
    """Cold start: the maximum budget, where EM is as high as the model gets."""
    return ControllerState(budget=config.max_budget)


def wilson(hits: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _move(state: ControllerState, budget: int, direction: int, **known: int | None) -> ControllerState:
    return replace(
        state,
        budget=budget,
        hits=0,
        n=0,
        since_change=0,
        last_direction=direction,
        adjustments=state.adjustments + 1,
        **known,  # type: ignore[arg-type]
    )


def step(state: ControllerState, correct: bool, config: ControllerConfig) -> ControllerState:
    """Fold one EM sample (taken at ``state.budget``) into the state."""
    window = (*state.window, correct)[-config.window :]
    s = replace(
        state,
        hits=state.hits + int(correct),
        n=state.n + 1,
        since_change=state.since_change + 1,
        age=state.age + 1,
        window=window,
    )
    if s.age >= config.memory:
        s = replace(s, good=None, bad=None, age=0)
    if s.frozen:
        return s

    _, upper = wilson(s.hits, s.n, config.z_loosen)
    if s.n >= config.min_loosen_samples and upper < config.target:
        bad = s.budget
        good = s.good if s.good is not None and s.good > bad else None
        target = good if good is not None else min(config.max_budget, math.ceil(bad * config.loosen))
        if target <= s.budget:
            return s  # already at the maximum
        return _move(s, target, +1, bad=bad, good=good, age=0)

    lower, _ = wilson(s.hits, s.n, config.z_tighten)
    if s.n >= config.min_samples and s.since_change >= config.cooldown and lower >= config.target:
        good = s.budget
        floor = s.bad if s.bad is not None and s.bad < good else config.min_budget - 1
        candidate = max(config.min_budget, math.floor(good * config.tighten))
        if candidate <= floor:
            if good - floor <= max(1, config.resolution * good):
                return replace(s, good=good)  # settled: the next budget down is known to miss
            candidate = (floor + good + 1) // 2
        if candidate >= good:
            return replace(s, good=good)
        return _move(s, candidate, -1, good=good, bad=s.bad if s.bad is not None and s.bad < candidate else None)
    return s
