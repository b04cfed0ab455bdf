"""The controller's simulator goals over many seeds, and the limit that goals 1 and 2 put on each other.

    .venv/bin/python -m loadtest.controller_goals [--seeds 1000:1500] [--set drift_threshold=5.5 ...]
    .venv/bin/python -m loadtest.controller_goals --detector [--runs 2000]
    .venv/bin/python -m loadtest.controller_goals --set mode=floor [--set z_floor=1.0]

The first form runs tests/test_controller.py's scenario (the bundled model's
measured curve from a cold start, 1.5x harder traffic from sample 1,100) for
each seed and prints how many seeds meet each goal, with goal 1's misses split
into *search* misses (the budget is outside +-10% of b* at sample 300) and
*drift* misses (inside at sample 300, out later: mostly a false alarm of
the sudden-fall check). ``--set`` overrides ``ControllerConfig`` fields, to try a
variant; ``--set mode=floor`` reports the floor setting (EM as a floor). Both
modes also report the floor goal: EM of samples 500-599 at or above the
target, at a budget (sample 600) within 15% of b*.

The second form measures the detector trade-off behind goal 1's drift misses.
Goal 1 needs no drift alarm in samples 300-599 while EM sits at b* (0.809);
goal 2 needs the fall to 0.540 at b* that harder traffic brings detected
soon enough that the 50-sample window can refill by sample 100. For a
Bernoulli CUSUM on the samples at b* (the optimal detector of such a change
there) it prints, per assumed drop and threshold, the share of runs with a
false alarm within 300 samples and the share detected too late. No row has
both small.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields, replace

from gateway.control import simulate as sim
from gateway.control.controller import ControllerConfig

SHIFT, RUN, STEADY = 1100, 1300, (300, 600)
HARDER = sim.stretched(sim.MEASURED, 1.5)


@dataclass(frozen=True)
class SeedGoals:
    seed: int
    goals: tuple[bool, bool, bool, bool]
    in_band_at_300: bool
    budget_range: tuple[int, int]  # lowest and highest budget in samples 300-599
    floor: tuple[bool, bool] = (False, False)  # EM of samples 500-599 >= target; budget (sample 600) <= 1.15 b*


def seed_goals(seed: int, config: ControllerConfig) -> SeedGoals:
    """Goals 1-4 of one seed, with the criteria of tests/test_controller.py."""
    b_star = sim.smallest_budget(sim.MEASURED, config.target, 0, config.min_budget, config.max_budget)
    if b_star is None:
        raise ValueError(f"target {config.target}: the measured curve never reaches it")
    trace = sim.run(config, [(0, sim.MEASURED), (SHIFT, HARDER)], RUN, seed)
    budgets, ems = trace.budgets, trace.window_em
    goals = (
        sim.settled_from(budgets[: STEADY[1]], b_star) <= STEADY[0],
        sim.recovery(ems, config.target, SHIFT) <= 100,
        sim.longest_run_below(ems, round(config.target - 0.1, 9)) <= 50,
        sim.direction_changes(budgets[300:801]) <= 3,
    )
    steady = budgets[STEADY[0] : STEADY[1]]
    in_band = b_star * 0.9 <= budgets[STEADY[0]] <= b_star * 1.1
    last = trace.outcomes[STEADY[1] - 100 : STEADY[1]]
    floor = (sum(last) >= config.target * len(last), budgets[STEADY[1] - 1] <= 1.15 * b_star)
    return SeedGoals(seed, goals, in_band, (min(steady), max(steady)), floor)


def _seed_goals(args: tuple[int, ControllerConfig]) -> SeedGoals:
    return seed_goals(*args)


def cusum_alarm(p: float, p0: float, p1: float, threshold: float, samples: int, rng: random.Random) -> int | None:
    """Samples until a Bernoulli CUSUM of ``p1`` against ``p0`` reaches ``threshold`` at EM ``p``; None if never."""
    hit, miss = math.log(p1 / p0), math.log((1 - p1) / (1 - p0))
    total = 0.0
    for i in range(samples):
        total = max(0.0, total + (hit if rng.random() < p else miss))
        if total >= threshold:
            return i + 1
    return None


@dataclass(frozen=True)
class DetectorRow:
    drop: float
    threshold: float
    false_alarms: float  # share of runs at the steady EM with an alarm within ``steady`` samples
    late: float  # share of runs after the fall with no alarm within ``deadline`` samples
    median_delay: int


def detector_tradeoff(
    drops: Sequence[float],
    thresholds: Sequence[float],
    runs: int,
    seed: int = 0,
    config: ControllerConfig | None = None,
    recover_within: int = 100,
) -> tuple[int, list[DetectorRow]]:
    """The CUSUM trade-off at b* on the measured curve; returns the detection deadline and one row per setting.

    The deadline leaves the window enough samples to refill: after a jump to a
    budget where EM is about 1, it takes ``window * (target - p_after) /
    (1 - p_after)`` samples to bring the window back to the target.
    """
    config = config or ControllerConfig()
    b_star = sim.smallest_budget(sim.MEASURED, config.target, 0, config.min_budget, config.max_budget)
    assert b_star is not None
    before, after = sim.MEASURED(b_star, 0), HARDER(b_star, 0)
    deadline = recover_within - math.ceil(config.window * (config.target - after) / (1 - after))
    steady = STEADY[1] - STEADY[0]
    rng = random.Random(seed)
    rows = []
    for drop in drops:
        p0 = min(config.target, before)
        p1 = max(p0 - drop, p0 / 2)
        for threshold in thresholds:
            alarms = sum(cusum_alarm(before, p0, p1, threshold, steady, rng) is not None for _ in range(runs))
            delays = sorted(cusum_alarm(after, p0, p1, threshold, 4 * deadline, rng) or 10**9 for _ in range(runs))
            late = sum(d > deadline for d in delays)
            rows.append(DetectorRow(drop, threshold, alarms / runs, late / runs, delays[runs // 2]))
    return deadline, rows


def _parse_set(items: Sequence[str]) -> dict[str, float | int | str]:
    known = {f.name: f.type for f in fields(ControllerConfig)}
    out: dict[str, float | int | str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME one of {sorted(known)}")
        if known[name] in (str, "str"):
            out[name] = value
            continue
        try:
            out[name] = int(value) if known[name] in (int, "int") else float(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {value!r} is not a number") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.controller_goals", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1000:1500", help="START:STOP, a range of seeds (default 1000:1500)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a ControllerConfig field")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    parser.add_argument("--detector", action="store_true", help="print the CUSUM trade-off instead")
    parser.add_argument("--runs", type=int, default=2000, help="runs per detector setting (default 2000)")
    args = parser.parse_args(argv)
    try:
        config = replace(ControllerConfig(), **_parse_set(args.set))
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--set: {exc}") from None
    if args.detector:
        deadline, rows = detector_tradeoff((0.15, 0.2, 0.25), (4.5, 5.5, 6.5, 7.5, 8.5), args.runs, config=config)
        print(f"false alarm: within {STEADY[1] - STEADY[0]} samples at b*; late: not detected within {deadline}")
        print("drop  threshold  false_alarm  late   median_delay")
        for r in rows:
            print(f"{r.drop:<5} {r.threshold:<10} {r.false_alarms:<12.3f} {r.late:<6.3f} {r.median_delay}")
        return 0
    start, sep, stop = args.seeds.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit() or int(stop) <= int(start):
        raise SystemExit(f"--seeds {args.seeds!r}: expected START:STOP with START < STOP")
    seeds = range(int(start), int(stop))
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(_seed_goals, [(seed, config) for seed in seeds], chunksize=8))
    counts = [sum(r.goals[i] for r in results) for i in range(4)]
    search = [r for r in results if not r.goals[0] and not r.in_band_at_300]
    drift = [r for r in results if not r.goals[0] and r.in_band_at_300]
    print(f"seeds {args.seeds}: goals 1-4 met on {counts[0]}, {counts[1]}, {counts[2]}, {counts[3]} of {len(seeds)}")
    em_ok, budget_ok = (sum(r.floor[i] for r in results) for i in range(2))
    both = sum(all(r.floor) for r in results)
    print(
        f"mode {config.mode}: EM of samples 500-599 >= the target on {em_ok}, budget at sample 600 within 15% "
        f"of b* on {budget_ok}, both (the floor goal) on {both} of {len(seeds)}"
    )
    print(f"goal 1 misses: {len(search)} search (outside +-10% at sample 300), {len(drift)} drift (left it later)")
    for r in results:
        if not all(r.goals):
            marks = "".join("." if ok else "x" for ok in r.goals)
            print(f"  seed {r.seed} {marks} budgets in 300-599: {r.budget_range[0]}-{r.budget_range[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
