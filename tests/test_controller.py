"""The pure controller step: direction of moves, bounds, freeze (simulator goals come with issue 5)."""

from __future__ import annotations

import math
import random

import pytest

from gateway.control.controller import ControllerConfig, ControllerState, initial_state, step


def em_curve(budget: int) -> float:
    return 0.02 + 0.95 / (1 + math.exp(-(budget - 90) / 15))


def simulate(seed: int, samples: int, config: ControllerConfig) -> list[ControllerState]:
    rng = random.Random(seed)
    state = initial_state(config)
    history = []
    for _ in range(samples):
        state = step(state, rng.random() < em_curve(state.budget), config)
        history.append(state)
    return history


def test_budget_tightens_from_a_cold_start_when_em_holds() -> None:
    config = ControllerConfig()
    history = simulate(0, 300, config)
    assert history[0].budget == config.max_budget
    assert history[-1].budget < config.max_budget / 2
    assert all(config.min_budget <= s.budget <= config.max_budget for s in history)


def test_budget_loosens_when_em_falls_below_target() -> None:
    config = ControllerConfig(target=0.8)
    state = ControllerState(budget=40)
    for _ in range(30):
        state = step(state, False, config)
    assert state.budget > 40 and state.last_direction == 1 and state.bad is not None and state.bad >= 40


def test_frozen_controller_never_moves() -> None:
    config = ControllerConfig()
    state = ControllerState(budget=200, frozen=True)
    for correct in [True] * 100 + [False] * 100:
        state = step(state, correct, config)
    assert state.budget == 200 and state.adjustments == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"target": 0.0}, {"target": 1.5}, {"min_budget": 500, "max_budget": 100}, {"tighten": 1.2}, {"window": 0}],
)
def test_bad_controller_config_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ControllerConfig(**kwargs)  # type: ignore[arg-type]
