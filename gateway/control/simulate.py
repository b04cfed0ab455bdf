"""A simulator for the controller: EM-versus-budget curves, a seeded run loop, and the goal measures.

No engine: each request's outcome is a Bernoulli draw with the probability
that a curve gives for the budget and level in force. Tests, the README and
demos use it to show what the controller does over thousands of samples in a
fraction of a second.

A curve is any ``(budget, level) -> EM`` function. ``MEASURED`` is the curve
of the bundled model (EM at forced budgets 0/32/64/96/128/256), ``stretched``
makes traffic harder (the same curve needs ``factor`` times the budget),
``logistic`` is a smooth synthetic one, and ``with_levels`` adds strictness
levels that raise EM at a given budget.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.control.controller import ControllerConfig, ControllerState, Sample, initial_state, step

Curve = Callable[[int, int], float]
"""EM at ``(budget, level)``; non-decreasing in both."""

MEASURED_POINTS: tuple[tuple[int, float], ...] = (
    (0, 0.010),
    (32, 0.302),
    (64, 0.664),
    (96, 0.974),
    (128, 1.000),
    (256, 0.996),
)
"""EM of the bundled model at forced thinking budgets (the budget sweep)."""


def piecewise(points: Sequence[tuple[int, float]]) -> Curve:
    """Linear interpolation through ``points``, made monotone (capped at the running maximum), flat outside."""
    xs = [x for x, _ in points]
    ys: list[float] = []
    for _, y in points:
        ys.append(max(y, ys[-1]) if ys else y)

    def curve(budget: int, level: int = 0) -> float:
        if budget <= xs[0]:
            return ys[0]
        for i in range(1, len(xs)):
            if budget <= xs[i]:
                return ys[i - 1] + (ys[i] - ys[i - 1]) * (budget - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[-1]

    return curve


MEASURED: Curve = piecewise(MEASURED_POINTS)


def stretched(curve: Curve, factor: float) -> Curve:
    """The same curve needing ``factor`` times the budget (factor > 1: harder traffic)."""

    def harder(budget: int, level: int = 0) -> float:
        return curve(int(round(budget / factor)), level)

    return harder


def logistic(midpoint: float, scale: float, floor: float = 0.0, ceiling: float = 1.0) -> Curve:
    """A smooth S-curve from ``floor`` to ``ceiling`` centred on ``midpoint`` tokens."""

    def s_curve(budget: int, level: int = 0) -> float:
        return floor + (ceiling - floor) / (1 + math.exp(-(budget - midpoint) / scale))

    return s_curve


def with_levels(curve: Curve, gain: float) -> Curve:
    """A 2-D curve: each level up acts like ``gain`` times the budget (gain > 1 raises EM at a budget)."""

    def leveled(budget: int, level: int = 0) -> float:
        return curve(int(round(budget * gain**level)), 0)

    return leveled


def smallest_budget(curve: Curve, target: float, level: int, min_budget: int, max_budget: int) -> int | None:
    """b*: the smallest budget whose true EM meets ``target`` at ``level``; None if even ``max_budget`` misses."""
    for budget in range(min_budget, max_budget + 1):
        if curve(budget, level) >= target:
            return budget
    return None


@dataclass(frozen=True)
class Trace:
    """One run, sample by sample: the setting each sample ran at, its outcome, and the state after it."""

    budgets: tuple[int, ...]  # the budget in force after each sample
    levels: tuple[int, ...]
    outcomes: tuple[bool, ...]
    window_em: tuple[float, ...]  # the controller's reporting window after each sample
    final: ControllerState


def run(
    config: ControllerConfig,
    curves: Sequence[tuple[int, Curve]],
    samples: int,
    seed: int,
    state: ControllerState | None = None,
    delay: int = 0,
) -> Trace:
    """Feed ``samples`` Bernoulli outcomes to the controller.

    ``curves`` lists ``(from_sample, curve)`` in order; the first must start at
    0, and each applies from its sample on (a shift of traffic). ``delay``
    makes each sample arrive that many samples late, at the setting its
    request ran at (as late gold samples do in the gateway).
    """
    if not curves or curves[0][0] != 0:
        raise ValueError("curves: the first curve must start at sample 0")
    rng = random.Random(seed)
    state = initial_state(config) if state is None else state
    pending: list[Sample] = []
    budgets: list[int] = []
    levels: list[int] = []
    outcomes: list[bool] = []
    ems: list[float] = []
    which = 0
    for i in range(samples):
        while which + 1 < len(curves) and curves[which + 1][0] <= i:
            which += 1
        curve = curves[which][1]
        correct = rng.random() < curve(state.budget, state.level)
        pending.append(Sample(correct=correct, budget=state.budget, level=state.level, source="sim"))
        outcomes.append(correct)
        if len(pending) > delay:
            state = step(state, pending.pop(0), config)
        budgets.append(state.budget)
        levels.append(state.level)
        ems.append(state.window_em)
    return Trace(tuple(budgets), tuple(levels), tuple(outcomes), tuple(ems), state)


def settled_from(budgets: Sequence[int], b_star: int, tolerance: float = 0.1) -> int:
    """The first sample index from which the budget stays within ``tolerance`` of ``b_star`` to the end."""
    lo, hi = b_star * (1 - tolerance), b_star * (1 + tolerance)
    i = len(budgets)
    while i > 0 and lo <= budgets[i - 1] <= hi:
        i -= 1
    return i


def first_at_or_above(values: Sequence[float], threshold: float, start: int = 0) -> int | None:
    """Samples after ``start`` until ``values`` first reach ``threshold``; None if never."""
    for i in range(start, len(values)):
        if values[i] >= threshold:
            return i - start
    return None


def longest_run_below(values: Sequence[float], threshold: float, start: int = 0) -> int:
    """The longest run of consecutive ``values`` below ``threshold`` (NaN counts as not below)."""
    longest = current = 0
    for v in values[start:]:
        current = current + 1 if v < threshold else 0
        longest = max(longest, current)
    return longest


def direction_changes(budgets: Sequence[int]) -> int:
    """How many times the budget's direction of movement reverses."""
    changes, last = 0, 0
    for a, b in zip(budgets, budgets[1:], strict=False):
        d = (b > a) - (b < a)
        if d:
            changes += int(last != 0 and d != last)
            last = d
    return changes


def recovery(values: Sequence[float], threshold: float, start: int) -> int:
    """Samples from ``start`` until ``values`` are back at or above ``threshold`` after first falling below it.

    0 when they never fall below; ``len(values) - start`` when they never come back.
    """
    dip = next((i for i in range(start, len(values)) if values[i] < threshold), None)
    if dip is None:
        return 0
    back = first_at_or_above(values, threshold, dip)
    return len(values) - start if back is None else dip + back - start
