"""The pure controller step (issue 5): direction of moves, bounds, freeze, retarget, and the simulator goals.

The goal tests feed the controller Bernoulli outcomes drawn from EM-versus-budget
curves (gateway/control/simulate.py) over 50 fixed seeds; each states its exact
pass criterion. docs/controller.md lists the shares measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import cache

import pytest

from gateway.control import simulate as sim
from gateway.control.controller import (
    ControllerConfig,
    ControllerState,
    Sample,
    initial_state,
    override_budget,
    retarget,
    state_from_dict,
    state_to_dict,
    step,
    wilson,
    window_interval,
)
from loadtest.controller_goals import detector_tradeoff, main, seed_goals

SEEDS = range(50)
CONFIG = ControllerConfig()  # target 0.8, budgets 8..400
B_STAR = sim.smallest_budget(sim.MEASURED, 0.8, 0, CONFIG.min_budget, CONFIG.max_budget)
HARDER = sim.stretched(sim.MEASURED, 1.5)
SHIFT = 1100  # the harder traffic starts here, long after the budget settled
RUN = 1300


@cache
def measured_run(seed: int) -> sim.Trace:
    """The measured curve from a cold start, then 1.5x harder traffic from sample ``SHIFT``."""
    return sim.run(CONFIG, [(0, sim.MEASURED), (SHIFT, HARDER)], RUN, seed)


def feed(state: ControllerState, outcomes: list[bool], config: ControllerConfig) -> ControllerState:
    for correct in outcomes:
        state = step(state, Sample(correct, state.budget, state.level), config)
    return state


# -- single moves ------------------------------------------------------------


def test_budget_tightens_from_a_cold_start_when_em_holds() -> None:
    state = feed(initial_state(CONFIG), [True] * CONFIG.cooldown, CONFIG)
    assert state.budget < CONFIG.max_budget and state.last_direction == -1 and state.good == CONFIG.max_budget


def test_budget_loosens_when_em_falls_below_target() -> None:
    state = ControllerState(budget=40, target=0.8)
    state = feed(state, [False] * CONFIG.min_samples, CONFIG)
    assert state.budget > 40 and state.last_direction == 1 and state.bad == 40


def test_loosening_returns_to_the_midpoint_below_a_known_good_budget() -> None:
    state = ControllerState(budget=50, good=100, target=0.8)
    state = feed(state, [False] * CONFIG.min_samples, CONFIG)
    assert (state.budget, state.bad, state.good) == (75, 50, 100)


def test_a_sudden_fall_while_settled_loosens_by_the_full_factor_at_once() -> None:
    state = ControllerState(budget=80, good=80, bad=76, settled=True, hits=400, n=500, target=0.8)
    state = feed(state, [False] * 10, CONFIG)
    assert (state.budget, state.bad, state.good, state.settled) == (160, 80, None, False)


def test_a_small_lasting_deficit_while_settled_steps_up_a_little() -> None:
    state = ControllerState(budget=80, good=80, bad=76, settled=True, target=0.8)
    fed = 0
    while state.budget == 80 and fed < 2000:
        state = feed(state, [True, True, True, False], CONFIG)  # EM 0.75: never a sudden fall
        fed += 4
    assert (state.budget, state.bad) == (84, 80) and fed > CONFIG.window


def test_the_budget_is_not_cut_while_the_reporting_window_misses_the_target() -> None:
    state = ControllerState(budget=100, target=0.8, window=(False,) * CONFIG.window)
    state = feed(state, [True] * 39, CONFIG)  # the arm is good, but the window holds only 39 hits of 50
    assert state.budget == 100 and state.n == 39
    state = feed(state, [True], CONFIG)
    assert state.budget < 100


def test_em_far_below_target_for_a_while_loosens_before_the_arm_test_would() -> None:
    config = replace(CONFIG, min_samples=60, cooldown=60, max_samples=200)
    state = ControllerState(budget=100, good=120, target=0.8)
    while state.budget == 100:
        state = feed(state, [True, True, False], config)  # EM 0.67, more than 0.1 below target
    assert (state.budget, state.bad) == (110, 100) and state.samples < config.min_samples + CONFIG.window


def test_budget_stays_within_bounds() -> None:
    config = ControllerConfig(min_budget=16, max_budget=64)
    state = feed(initial_state(config), [True] * 500, config)
    assert state.budget == 16 and state.settled
    state = feed(state, [False] * 500, config)
    assert state.budget == 64
    trace = sim.run(config, [(0, sim.MEASURED)], 1000, seed=1)
    assert all(16 <= b <= 64 for b in trace.budgets)


def test_frozen_controller_never_moves() -> None:
    state = ControllerState(budget=200, frozen=True)
    state = feed(state, [True] * 100 + [False] * 100, CONFIG)
    assert state.budget == 200 and state.adjustments == 0 and len(state.window) == CONFIG.window


def test_late_sample_counts_for_the_window_but_not_the_decision() -> None:
    state = ControllerState(budget=100, target=0.8)
    for _ in range(30):
        state = step(state, Sample(False, budget=50), CONFIG)
    assert state.budget == 100 and state.n == 0 and state.window_em == 0.0


def test_override_budget_resets_the_evidence() -> None:
    state = feed(initial_state(CONFIG), [True] * 200, CONFIG)
    state = override_budget(state, 1000, CONFIG)
    assert state.budget == CONFIG.max_budget and state.n == 0 and state.good is None and state.bad is None
    assert not state.settled


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target": 0.0}, "target"),
        ({"target": 1.5}, "target"),
        ({"min_budget": 500, "max_budget": 100}, "budget bounds with min > max"),
        ({"min_budget": 0}, "min_budget"),
        ({"tighten": 1.2}, "tighten"),
        ({"loosen": 0.9}, "loosen"),
        ({"window": 0}, "window"),
        ({"levels": 0}, "levels"),
        ({"cooldown": 2}, "cooldown"),
        ({"max_samples": 5}, "max_samples"),
        ({"z_drift": -1.0}, "z_drift"),
        ({"resolution": 1.0}, "resolution"),
        ({"drift_drop": 0.9}, "drift_drop"),
        ({"drift_threshold": 0.0}, "drift_threshold"),
        ({"deficit": 0.0}, "deficit"),
        ({"deficit_samples": 0}, "deficit_samples"),
    ],
)
def test_bad_controller_config_is_refused_naming_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ControllerConfig(**kwargs)  # type: ignore[arg-type]


def test_state_round_trips_through_json() -> None:
    state = sim.run(CONFIG, [(0, sim.MEASURED)], 300, seed=3).final
    again = state_from_dict(json.loads(json.dumps(state_to_dict(state))))
    assert again == state
    with pytest.raises(ValueError, match="unknown"):
        state_from_dict({**state_to_dict(state), "nonsense": 1})


def test_state_stored_before_the_drift_statistics_existed_still_loads() -> None:
    stored = state_to_dict(settled_state(0))
    del stored["drop"], stored["short"]
    state = state_from_dict(stored)
    assert (state.drop, state.short) == (0.0, 0) and state.budget == stored["budget"]


def test_wilson_interval_contains_the_estimate() -> None:
    low, high = wilson(40, 50, 1.96)
    assert low < 0.8 < high and wilson(0, 0, 1.96) == (0.0, 1.0)
    state = ControllerState(budget=10, window=(True, False, True, True))
    assert state.window_em == 0.75 and window_interval(state)[0] < 0.75 < window_interval(state)[1]
    assert math.isnan(ControllerState(budget=10).window_em)


# -- retarget ------------------------------------------------------------------


def settled_state(seed: int) -> ControllerState:
    return sim.run(CONFIG, [(0, sim.MEASURED)], 600, seed).final


@pytest.mark.parametrize("seed", range(5))
def test_raised_target_moves_the_budget_up(seed: int) -> None:
    state = settled_state(seed)
    config = replace(CONFIG, target=0.95)
    after = sim.run(config, [(0, sim.MEASURED)], 400, seed, state=state)
    b_star = sim.smallest_budget(sim.MEASURED, 0.95, 0, 8, 400)
    assert b_star is not None and b_star > state.budget and after.final.budget > state.budget
    # At b* or a budget whose true EM is within 0.01 of the new target (no test tells those apart).
    assert sim.MEASURED(after.final.budget, 0) >= 0.95 - 0.01
    assert after.final.target == 0.95


@pytest.mark.parametrize("seed", range(5))
def test_lowered_target_moves_the_budget_down(seed: int) -> None:
    state = settled_state(seed)
    config = replace(CONFIG, target=0.5)
    after = sim.run(config, [(0, sim.MEASURED)], 400, seed, state=state)
    assert after.final.budget < state.budget


def test_retarget_forgets_what_was_learned_under_another_target() -> None:
    state = replace(settled_state(0), good=80, bad=76)
    new = retarget(state, replace(CONFIG, target=0.9))
    assert new.good is None and new.bad is None and new.target == 0.9 and not new.settled
    assert new.budget == state.budget and new.n == state.n
    assert retarget(new, replace(CONFIG, target=0.9)) is new


# -- levels ------------------------------------------------------------------


def test_levels_converge_within_bounds() -> None:
    """A 2-D curve (each level up acts like 1.3x the budget); 20 seeds, all must end settled, within bounds,
    at a setting whose true EM meets the target minus 0.05, and at a budget no larger than the loosest
    level's b* would need at level 0."""
    config = replace(CONFIG, levels=3)
    curve = sim.with_levels(sim.MEASURED, 1.3)
    for seed in range(20):
        trace = sim.run(config, [(0, curve)], 1000, seed)
        assert all(config.min_budget <= b <= config.max_budget for b in trace.budgets)
        assert all(0 <= level < 3 for level in trace.levels)
        final = trace.final
        assert final.settled, seed
        assert curve(final.budget, final.level) >= config.target - 0.05, seed


def test_level_rises_when_the_maximum_budget_misses() -> None:
    config = replace(CONFIG, levels=3, max_budget=64)
    curve = sim.with_levels(sim.MEASURED, 1.6)  # level 0 tops out at 0.664, level 1 at 0.97
    trace = sim.run(config, [(0, curve)], 1500, seed=0)
    assert trace.final.level >= 1 and curve(trace.final.budget, trace.final.level) >= 0.75


# -- simulator goals ------------------------------------------------------------


def share(passed: list[bool]) -> float:
    return sum(passed) / len(passed)


def test_goal1_budget_settles_near_b_star_within_300_samples() -> None:
    """Goal 1. Criterion: from a cold start at max_budget on the measured curve (b* = 79 at target 0.8),
    the budget stays within +-10% of b* at every sample from 300 through 599, for at least 90% of 50 seeds
    (measured: 45 of 50, and 453 of the 500 seeds 1000-1499; median settle sample 153)."""
    assert B_STAR == 79
    passed = [sim.settled_from(measured_run(seed).budgets[:600], B_STAR) <= 300 for seed in SEEDS]
    assert share(passed) >= 0.90, passed


def test_goal2_window_em_recovers_within_100_samples_of_harder_traffic() -> None:
    """Goal 2. Criterion: after the curve is stretched 1.5x at sample 1100, the 50-sample window EM, once
    below the target, is back at or above it within 100 samples of the shift, for all 50 seeds (measured:
    50 of 50, at most 94 samples, median 53; 489 of the 500 seeds 1000-1499)."""
    passed = [sim.recovery(measured_run(seed).window_em, CONFIG.target, SHIFT) <= 100 for seed in SEEDS]
    assert all(passed), passed


def test_goal3_window_em_never_long_below_target_minus_0_1() -> None:
    """Goal 3. Criterion: over the whole run (cold start, settle, harder traffic), the window EM is below
    target - 0.1 (a window EM of exactly 0.7 is not below) for at most 50 consecutive samples, for all 50
    seeds (measured: 50 of 50, at most 47 samples; 492 of the 500 seeds 1000-1499)."""
    passed = [
        sim.longest_run_below(measured_run(seed).window_em, round(CONFIG.target - 0.1, 9)) <= 50 for seed in SEEDS
    ]
    assert all(passed), passed


def test_goal4_steady_budget_changes_direction_rarely() -> None:
    """Goal 4. Criterion: between samples 300 and 800 (steady traffic), the budget changes direction at
    most 3 times, for all 50 seeds (measured: at most once; all of the 500 seeds 1000-1499)."""
    for seed in SEEDS:
        assert sim.direction_changes(measured_run(seed).budgets[300:801]) <= 3, seed


@pytest.mark.parametrize("seed", range(10))
def test_logistic_curve_settles_near_its_b_star(seed: int) -> None:
    """A smooth synthetic curve: the budget at sample 600 is within 15% of its b*."""
    curve = sim.logistic(midpoint=150, scale=20)
    b_star = sim.smallest_budget(curve, 0.8, 0, 8, 400)
    assert b_star is not None
    final = sim.run(CONFIG, [(0, curve)], 600, seed).final
    assert abs(final.budget - b_star) <= 0.15 * b_star


def test_late_samples_do_not_stop_convergence() -> None:
    """Samples arriving 5 late (in-flight requests at the old budget) still let the budget settle."""
    finals = [sim.run(CONFIG, [(0, sim.MEASURED)], 600, seed, delay=5).final.budget for seed in range(10)]
    assert sum(abs(b - B_STAR) <= 0.15 * B_STAR for b in finals) >= 8, finals


# -- the limit goals 1 and 2 put on each other (loadtest/controller_goals.py) ------------


def test_goal_report_uses_the_test_criteria() -> None:
    for seed in range(8):
        got = seed_goals(seed, CONFIG).goals
        trace = measured_run(seed)
        assert got[0] == (sim.settled_from(trace.budgets[:600], B_STAR) <= 300), seed
        assert got[1] == (sim.recovery(trace.window_em, CONFIG.target, SHIFT) <= 100), seed


def test_no_drift_threshold_keeps_both_false_alarms_and_late_detections_rare() -> None:
    """Why goal 1 is asserted on 90% of seeds, not all: a settled budget leaves the +-10% band when a drift
    check raises a false alarm in samples 300-599, and goal 2 needs harder traffic (EM 0.809 -> 0.540 at b*)
    detected within 71 samples. For the Bernoulli CUSUM on the samples at b* (the optimal detector of such a
    change there) at every assumed drop and threshold tried, false alarms or late detections exceed 1.5% of
    runs (docs/controller.md also gives what a sentinel arm at a larger budget changes)."""
    deadline, rows = detector_tradeoff((0.15, 0.2, 0.25), (4.5, 5.5, 6.5, 7.5), runs=800, seed=1)
    assert deadline == 71
    assert min(max(r.false_alarms, r.late) for r in rows) > 0.015, rows
    for low, high in zip(rows, rows[1:], strict=False):
        if low.drop == high.drop:  # a higher threshold trades false alarms for later detection
            assert high.false_alarms <= low.false_alarms and high.median_delay >= low.median_delay


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "5:2"], "START < STOP"),
        (["--seeds", "x"], "START:STOP"),
        (["--set", "nonsense=1"], "NAME one of"),
        (["--set", "drift_threshold=high"], "not a number"),
        (["--set", "target=1.5"], "target"),
    ],
)
def test_goal_report_refuses_bad_arguments(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(argv)
