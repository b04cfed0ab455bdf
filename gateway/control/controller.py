"""The per-route feedback controller: a pure ``step(state, sample, config) -> state``.

It moves a route's thinking **budget** (and, when the route offers more than one, the policy's strictness
**level**) so that EM stays at the target with the fewest tokens: loosen when EM falls, tighten when it holds.
Each change rests on a Wilson test of the samples taken at the setting in force (the *arm*); the search
bisects between the largest budget shown bad and the smallest shown good; three drift checks (a CUSUM for a
sudden fall, a small lasting deficit, a long deficit of the reporting window) re-open it. ``mode`` reads the
target as a level to track or as a floor; ``frozen`` and ``override_budget`` are the operator's.

docs/controller.md describes the verdicts, the search, levels, drift, late samples, target changes, the
two modes and every parameter, with what the simulator (gateway/control/simulate.py) shows.
No I/O here: the plane (gateway/control/plane.py) persists and publishes the state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

MODES = ("track", "floor")
"""``track``: hold EM at the target; ``floor``: hold the target as a floor (docs/controller.md, "EM as a floor")."""


@dataclass(frozen=True)
class ControllerConfig:
    """The parameters of one route's controller; ``__post_init__`` refuses unsafe values."""

    target: float = 0.8
    min_budget: int = 8
    max_budget: int = 400
    levels: int = 1
    min_samples: int = 10
    cooldown: int = 20
    max_samples: int = 80
    z_tighten: float = 1.645
    z_loosen: float = 1.0
    z_decide: float = 0.0
    z_drift: float = 2.5
    tighten: float = 0.5
    loosen: float = 2.0
    resolution: float = 0.05
    window: int = 50
    drift_step: int = 1
    drift_drop: float = 0.15
    drift_threshold: float = 4.5
    deficit: float = 0.1
    deficit_samples: int = 25
    mode: str = "track"
    z_floor: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target: must be in (0, 1], got {self.target}")
        if self.min_budget < 1:
            raise ValueError(f"min_budget: must be >= 1, got {self.min_budget}")
        if self.min_budget > self.max_budget:
            raise ValueError(
                f"min_budget/max_budget: budget bounds with min > max ({self.min_budget} > {self.max_budget})"
            )
        if self.levels < 1:
            raise ValueError(f"levels: must be >= 1, got {self.levels}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples: must be >= 1, got {self.min_samples}")
        if self.cooldown < self.min_samples:
            raise ValueError(f"cooldown: must be >= min_samples ({self.min_samples}), got {self.cooldown}")
        if self.max_samples < self.cooldown:
            raise ValueError(f"max_samples: must be >= cooldown ({self.cooldown}), got {self.max_samples}")
        for name in ("z_tighten", "z_loosen", "z_decide", "z_drift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.tighten < 1.0:
            raise ValueError(f"tighten: must be in (0, 1), got {self.tighten}")
        if self.loosen <= 1.0:
            raise ValueError(f"loosen: must be > 1, got {self.loosen}")
        if not 0.0 <= self.resolution < 1.0:
            raise ValueError(f"resolution: must be in [0, 1), got {self.resolution}")
        if self.window < 1:
            raise ValueError(f"window: must be >= 1, got {self.window}")
        if self.drift_step < 1:
            raise ValueError(f"drift_step: must be >= 1, got {self.drift_step}")
        if not 0.0 < self.drift_drop < self.target:
            raise ValueError(f"drift_drop: must be in (0, target), got {self.drift_drop}")
        if self.drift_threshold <= 0:
            raise ValueError(f"drift_threshold: must be > 0, got {self.drift_threshold}")
        if not 0.0 < self.deficit < self.target:
            raise ValueError(f"deficit: must be in (0, target), got {self.deficit}")
        if self.deficit_samples < 1:
            raise ValueError(f"deficit_samples: must be >= 1, got {self.deficit_samples}")
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.z_floor < 0:
            raise ValueError(f"z_floor: must be >= 0, got {self.z_floor}")


@dataclass(frozen=True)
class Sample:
    """One EM observation: was the answer correct, and at which budget and level did the request run."""

    correct: bool
    budget: int
    level: int = 0
    source: str = "gold"


@dataclass(frozen=True)
class ControllerState:
    """Everything the controller knows about one route; JSON-serialisable via ``state_to_dict``."""

    budget: int
    level: int = 0
    hits: int = 0  # correct samples at the setting in force, since it was set
    n: int = 0  # samples at the setting in force, since it was set
    recent: tuple[bool, ...] = ()  # the last ``window`` outcomes at the setting in force (drift checks)
    good: int | None = None  # smallest budget shown to meet the target (at this level)
    bad: int | None = None  # largest budget shown to miss it (at this level)
    floor_level: int = 0  # stricter levels than this were shown to miss
    probing_level: bool = False  # the setting in force is a stricter-level trial at the same budget
    settled: bool = False
    target: float | None = None  # the target that good/bad/floor_level hold for
    window: tuple[bool, ...] = ()  # the last ``window`` outcomes at any setting (reporting)
    samples: int = 0  # samples seen in all
    last_direction: int = 0  # +1 last budget move was up, -1 down
    adjustments: int = 0  # changes of budget or level
    reversals: int = 0  # budget moves opposite to the previous one
    frozen: bool = False
    drop: float = 0.0  # CUSUM of the evidence that EM fell by ``drift_drop`` at the setting in force
    short: int = 0  # consecutive samples with the full reporting window more than ``deficit`` below target

    @property
    def window_em(self) -> float:
        """EM over the reporting window (NaN when empty)."""
        return sum(self.window) / len(self.window) if self.window else math.nan


def wilson(hits: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def window_interval(state: ControllerState, z: float = 1.96) -> tuple[float, float]:
    """Wilson interval of EM over the reporting window."""
    return wilson(sum(state.window), len(state.window), z)


def initial_state(config: ControllerConfig) -> ControllerState:
    """Cold start: the maximum budget at the loosest level, where EM is as high as the model gets."""
    return ControllerState(budget=config.max_budget, level=config.levels - 1, target=config.target)


def override_budget(
    state: ControllerState, budget: int, config: ControllerConfig, level: int | None = None
) -> ControllerState:
    """The operator's manual move: run at ``budget`` (clamped to the bounds) and start learning afresh.

    The evidence about the old setting and the known good and bad budgets are
    dropped, so the next changes rest only on samples taken at the new
    setting. ``frozen`` is kept: freeze to pin the budget.
    """
    budget = min(config.max_budget, max(config.min_budget, budget))
    new_level = state.level if level is None else min(config.levels - 1, max(0, level))
    return replace(
        _forget(state, config),
        budget=budget,
        level=new_level,
        hits=0,
        n=0,
        recent=(),
        drop=0.0,
        last_direction=0,
        adjustments=state.adjustments + int((budget, new_level) != (state.budget, state.level)),
    )


def set_frozen(state: ControllerState, frozen: bool) -> ControllerState:
    """Freeze (no changes, samples still recorded) or unfreeze the controller."""
    return replace(state, frozen=frozen)


def retarget(state: ControllerState, config: ControllerConfig) -> ControllerState:
    """Forget what was learned under another target; keep the evidence about the setting in force.

    ``step`` calls this itself when ``config.target`` differs from
    ``state.target``; the admin API may call it at once after a change.
    """
    if state.target == config.target:
        return state
    return _forget(state, config)


def _forget(state: ControllerState, config: ControllerConfig) -> ControllerState:
    return replace(
        state,
        good=None,
        bad=None,
        floor_level=0,
        probing_level=False,
        settled=False,
        target=config.target,
        drop=0.0,
    )


def floor_target(target: float, z: float, n: int) -> float:
    """The smallest EM ``p`` whose Wilson lower bound at ``z`` over ``n`` samples at EM ``p`` reaches ``target``.

    Closed form: with ``a = z**2 / n`` and ``c = target * (1 + a) - a / 2``, the bound equals the
    target at the larger root of ``(1 + a) p**2 - (2c + a) p + c**2 - a**2 / 4``; 1.0 if that is out of reach.
    """
    a = z * z / n
    c = target * (1 + a) - a / 2
    b = 2 * c + a
    disc = b * b - 4 * (1 + a) * (c * c - a * a / 4)
    if disc < 0:
        return 1.0
    return min(1.0, max(target, (b + math.sqrt(disc)) / (2 * (1 + a))))


def wilson_bound(p: float, n: int, z: float) -> float:
    """The Wilson lower bound at ``z`` of ``n`` samples whose share of hits is ``p`` (not only whole hits)."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    return centre - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom


def deciding(config: ControllerConfig) -> ControllerConfig:
    """The config the tests run against: in ``floor`` mode, its target is ``floor_target``."""
    if config.mode != "floor":
        return config
    return replace(config, target=floor_target(config.target, config.z_floor, config.window), mode="track")


def step(state: ControllerState, sample: Sample, config: ControllerConfig) -> ControllerState:
    """Fold one EM sample into the state, and change the setting when the evidence says so."""
    if config.mode == "track":
        return _step(state, sample, config)
    decide = deciding(config)
    s = retarget(state, config)  # what was learned holds for the target as set
    s = _step(replace(s, target=decide.target), sample, decide)
    return replace(s, target=config.target)


def _step(state: ControllerState, sample: Sample, config: ControllerConfig) -> ControllerState:
    window = (*state.window, sample.correct)[-config.window :]
    short = len(window) >= config.window and sum(window) < (config.target - config.deficit) * len(window)
    s = replace(state, window=window, samples=state.samples + 1, short=state.short + 1 if short else 0)
    if s.frozen:
        return s
    s = retarget(s, config)
    if (sample.budget, sample.level) != (s.budget, s.level):
        return s  # a late sample: it says nothing about the setting in force
    s = replace(
        s,
        hits=s.hits + int(sample.correct),
        n=s.n + 1,
        recent=(*s.recent, sample.correct)[-config.window :],
    )
    level = min(config.target, s.hits / s.n) if s.settled and s.n >= config.cooldown else config.target
    s = replace(s, drop=max(0.0, s.drop + _drop_llr(sample.correct, level, config)))
    if s.drop >= config.drift_threshold and (s.good is None or s.settled):
        # A sudden fall (harder traffic): the budget in force is bad, and what was good
        # above it is stale. Loosen by the full factor at once.
        return _loosen(replace(s, settled=False, good=None, floor_level=0, drop=0.0), config, jump=True)
    if s.short >= config.deficit_samples and s.n >= config.deficit_samples and s.hits < config.target * s.n:
        # Users have seen EM far below the target for a while, and the arm in force misses
        # too: it is bad now, whatever its own test would say later.
        return _loosen(replace(s, settled=False, floor_level=0, short=0), config)
    if s.settled:
        return _watch(s, config)
    return _search(s, config)


def _watch(s: ControllerState, config: ControllerConfig) -> ControllerState:
    """Settled: re-open the search only when the evidence says EM moved off the target."""
    if s.n >= config.window and wilson(s.hits, s.n, config.z_drift)[1] < config.target:
        # A small, lasting deficit (the search settled a little low): step up a little.
        return _loosen(replace(s, settled=False, good=None, floor_level=0), config)
    hits, n = sum(s.recent), len(s.recent)
    headroom = config.target + (1.0 - config.target) / 2
    if n >= config.window and wilson(hits, n, config.z_drift)[0] >= headroom:
        # Easier traffic: bisect again, between this budget and ``tighten`` times it.
        below = max(config.min_budget - 1, math.floor(s.budget * config.tighten))
        return _tighten(replace(s, settled=False, bad=below, floor_level=0), config)
    return s


def _drop_llr(correct: bool, level: float, config: ControllerConfig) -> float:
    """Log-likelihood ratio of one outcome: EM at ``level - drift_drop`` against EM at ``level``."""
    p0 = min(max(level, 1e-3), 1.0 - 1e-3)
    p1 = max(p0 - config.drift_drop, p0 / 2)
    return math.log(p1 / p0) if correct else math.log((1.0 - p1) / (1.0 - p0))


def _search(s: ControllerState, config: ControllerConfig) -> ControllerState:
    lower = wilson(s.hits, s.n, config.z_tighten)[0]
    upper = wilson(s.hits, s.n, config.z_loosen)[1]
    if s.n >= config.min_samples and upper < config.target:
        return _loosen(s, config)
    if s.n >= config.cooldown and lower >= config.target and not _window_low(s, config):
        return _tighten(s, config)
    if s.n >= config.max_samples:
        # Within noise of the target: more samples would cost more than they tell, so the
        # point estimate decides.
        if wilson(s.hits, s.n, config.z_decide)[0] < config.target:
            return _loosen(s, config)
        if not _window_low(s, config):
            return _tighten(s, config)
    return s


def _window_low(s: ControllerState, config: ControllerConfig) -> bool:
    """The reporting window (all settings) misses the target: no budget cut until it recovers."""
    return len(s.window) >= config.window and s.window_em < config.target


def _settle_gap(budget: int, config: ControllerConfig) -> int:
    return max(1, math.ceil(config.resolution * budget))


def _move(s: ControllerState, budget: int, level: int, drop: float = 0.0, **changes: Any) -> ControllerState:
    direction = (budget > s.budget) - (budget < s.budget)
    reversed_ = direction != 0 and s.last_direction != 0 and direction != s.last_direction
    return replace(
        s,
        budget=budget,
        level=level,
        hits=0,
        n=0,
        recent=(),
        last_direction=direction or s.last_direction,
        adjustments=s.adjustments + 1,
        reversals=s.reversals + int(reversed_),
        drop=drop,
        **changes,
    )


def _tighten(s: ControllerState, config: ControllerConfig) -> ControllerState:
    """The arm in force is good: try a stricter level, else a smaller budget, else settle."""
    s = replace(s, good=s.budget, probing_level=False)
    if s.level > s.floor_level:
        # Budgets shown bad at this level stay bad at a stricter one; good ones must be shown again.
        return _move(s, s.budget, s.level - 1, probing_level=True)
    return _budget_down(s, config)


def _budget_down(s: ControllerState, config: ControllerConfig) -> ControllerState:
    """``s.budget`` is good at ``s.level``: bisect towards ``bad``, or shrink by ``tighten``, or settle."""
    if s.bad is not None:
        if s.budget - s.bad <= _settle_gap(s.budget, config):
            return replace(s, settled=True)
        return _move(s, (s.bad + s.budget + 1) // 2, s.level)
    candidate = max(config.min_budget, math.floor(s.budget * config.tighten))
    if candidate >= s.budget:
        return replace(s, settled=True)
    return _move(s, candidate, s.level)


def _loosen(s: ControllerState, config: ControllerConfig, jump: bool = False) -> ControllerState:
    """The arm in force is bad: undo a level trial, else a larger budget, else a looser level."""
    if s.probing_level:
        # The stricter level misses at this budget, which is good at the level above: go back
        # there, stop trying stricter levels, and go on with the budget search.
        back = s.level + 1
        s = replace(s, level=back, probing_level=False, floor_level=back, adjustments=s.adjustments + 1)
        return _budget_down(s, config)
    s = replace(s, bad=s.budget)
    if s.good is not None and s.good > s.budget:
        if s.good - s.budget <= _settle_gap(s.good, config):
            return _move(s, s.good, s.level, settled=True)
        return _move(s, (s.budget + s.good + 1) // 2, s.level)
    if s.budget < config.max_budget:
        if jump or wilson(s.hits, s.n, config.z_loosen)[1] < config.target - config.drift_drop:
            return _move(s, min(config.max_budget, math.ceil(s.budget * config.loosen)), s.level, good=None)
        # Only a little below: a small step, and the evidence of a sudden fall carries over to
        # it, so that creeping up after harder traffic soon turns into the full step.
        up = min(config.max_budget, s.budget + config.drift_step * _settle_gap(s.budget, config))
        return _move(s, up, s.level, drop=s.drop, good=None)
    if s.level < config.levels - 1:
        # Even the maximum budget misses at this level: a looser level starts a new search.
        return _move(s, s.budget, s.level + 1, good=None, bad=None, floor_level=s.level + 1)
    # Nothing looser exists: stay at the loosest setting, and keep testing it.
    return replace(s, good=None, bad=None, hits=0, n=0, recent=())


_TUPLES = ("recent", "window")


def state_to_dict(state: ControllerState) -> dict[str, Any]:
    """A JSON-compatible dict of the state (tuples become lists)."""
    out = asdict(state)
    for name in _TUPLES:
        out[name] = list(out[name])
    return out


def state_from_dict(data: Mapping[str, Any]) -> ControllerState:
    """Rebuild a state from ``state_to_dict``'s output; unknown keys are refused, missing ones default."""
    known = {f.name for f in fields(ControllerState)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"controller state: unknown keys {sorted(unknown)}")
    if "budget" not in data:
        raise ValueError("controller state: missing key 'budget'")
    values = dict(data)
    for name in _TUPLES:
        if name in values:
            values[name] = tuple(bool(x) for x in values[name])
    return ControllerState(**values)


@dataclass(frozen=True)
class Controlled:
    """The stopping settings a route's controller has in force (what a request runs with)."""

    budget: int
    level: int = 0
    param: str | None = None  # the strictness parameter, if the route names one
    value: Any = None
