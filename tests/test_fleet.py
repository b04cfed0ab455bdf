"""Issue 18: three ``stopgate serve`` replicas share one controller through a real ``redis-server``.

One fleet (three child processes on one fake engine, one Redis) is shared by
the tests below, which run in file order and build on each other: gold-sample
traffic round robin, then a Redis restart under traffic, then a leader killed
with SIGKILL, then a leader paused past its lease. After each, the fleet must
agree: every replica's admin API reports the same state and sample counts,
the counts equal the scored requests, and the published state is exactly the
pure controller folded over the shared log in order (one budget trajectory,
each sample applied once).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.control.controller import Sample, initial_state, state_to_dict, step
from gateway.control.plane import controller_config
from gateway.control.redis_keys import Keys
from gateway.control.redis_store import RedisLog, StaleLease, decode_record
from gateway.settings import load_routes
from loadtest.redis_server import RedisServer
from loadtest.replicas import Child, fake_engine, replica, wait_http
from tests.support.fleet import ADMIN, ITEMS, KEY, ROUTE, write_routes

LEASE_MS = 3000
EVAL_SHARE = 0.3


@dataclass
class Fleet:
    redis: RedisServer
    engine: Child
    replicas: list[Child]
    routes: Path
    sent_gold: int = 0
    codes: list[int] = field(default_factory=list)
    turn: int = 0

    def live(self) -> list[Child]:
        return [r for r in self.replicas if r.proc.poll() is None]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("fleet")
    redis = RedisServer(logs / "redis")
    redis.start()
    engine = replicas = None
    try:
        engine = fake_engine(logs, tokens=30)
        routes = write_routes(logs)
        env = {
            "STOPGATE_ADMIN_KEY": KEY,
            "STOPGATE_STATE_LEASE_MS": str(LEASE_MS),
            "STOPGATE_EVAL_SHARE": str(EVAL_SHARE),
            "STOPGATE_EVAL_MAX_IN_FLIGHT": "64",
        }
        replicas = [
            replica(f"replica-{i}", logs, upstream=engine.url, routes=routes, state_url=redis.url, env=env)
            for i in range(3)
        ]
        for r in replicas:
            wait_http(r, "/ready")
        yield Fleet(redis, engine, replicas, routes)
    finally:
        for r in replicas or []:
            if r.proc.poll() is None:
                os.kill(r.pid, signal.SIGCONT)
            r.stop()
        if engine is not None:
            engine.stop()
        redis.stop()


def send(fleet: Fleet, n: int, *, gold: bool = True, to: list[Child] | None = None) -> None:
    """``n`` requests round robin over ``to`` (default: the live replicas); records every status code."""
    targets = to or fleet.live()
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            target = targets[fleet.turn % len(targets)]
            item = fleet.turn % ITEMS
            fleet.turn += 1
            body: dict[str, Any] = {"model": ROUTE, "prompt": f"Q: {item}+0=?\n", "max_tokens": 64}
            if gold:
                body["reference_id"] = f"f{item}"
            else:
                body["prompt"] = f"Q: {item}+{fleet.turn}=?\n"  # no reference item: a shadow candidate
            r = client.post(f"{target.url}/v1/completions", json=body)
            fleet.codes.append(r.status_code)
            if gold and r.status_code == 200:
                fleet.sent_gold += 1


def snapshot(child: Child) -> dict[str, Any]:
    r = httpx.get(f"{child.url}/admin/routes/{ROUTE}", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def metric(child: Child, name: str, **labels: str) -> float:
    text = httpx.get(f"{child.url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def replayed_state(fleet: Fleet) -> tuple[dict[str, Any], dict[str, int], int]:
    """Fold the pure controller over the whole shared log, in order: what the fleet must have published."""
    config = controller_config(next(r for r in load_routes(fleet.routes).routes if r.name == ROUTE))
    state = initial_state(config)
    counts = {"gold": 0, "canary": 0, "shadow": 0}
    client = fleet.redis.client()
    try:
        entries = client.xrange(Keys("stopgate", ROUTE).log)
    finally:
        client.close()
    for _, fields in entries:
        record, controlled = decode_record(fields["r"])
        counts[record.source] += 1
        if controlled:
            state = step(state, Sample(record.correct, record.budget, record.level, record.source), config)
    return state_to_dict(state), counts, len(entries)


def assert_one_controller(fleet: Fleet) -> dict[str, Any]:
    """Every live replica reports the same state and counts, and they are the log folded once, in order."""

    def agreed() -> bool:
        snaps = [snapshot(r) for r in fleet.live()]
        first = snaps[0]
        return first["samples"]["gold"] == fleet.sent_gold and all(
            s["samples"] == first["samples"] and s["controller"]["state"] == first["controller"]["state"] for s in snaps
        )

    wait_until(agreed, f"every replica to report {fleet.sent_gold} gold samples and one state")
    snap = snapshot(fleet.live()[0])
    # Samples may still arrive (canaries, shadows): compare against the log as of a stable revision.
    for _ in range(50):
        replayed, counts, _ = replayed_state(fleet)
        snap = snapshot(fleet.live()[0])
        if snap["samples"] == counts:
            break
        time.sleep(0.2)
    assert snap["samples"] == counts, "each log entry counted exactly once"
    assert snap["controller"]["state"] == replayed, "the published state is the log folded in order, once"
    return snap


def test_three_replicas_agree_on_one_budget_and_count_each_gold_sample_once(fleet: Fleet) -> None:
    send(fleet, 90)
    assert set(fleet.codes) == {200}
    snap = assert_one_controller(fleet)
    assert snap["samples"]["gold"] == 90
    assert snap["controller"]["adjustments"] >= 1, json.dumps(snap)

    def one_leader() -> bool:
        leaders = {snapshot(r)["fleet"]["leader"] for r in fleet.live()}
        return len(leaders) == 1 and None not in leaders

    wait_until(one_leader, "every replica to name the same leader")


def test_canaries_come_from_the_leader_only_and_the_share_holds_fleet_wide(fleet: Fleet) -> None:
    send(fleet, 60, gold=False)  # funds evaluation; early-stopped ones may be rerun as shadows
    wait_until(lambda: snapshot(fleet.live()[0])["samples"]["canary"] >= 3, "canary samples")
    ran_canaries = {r.name for r in fleet.live() if metric(r, "stopgate_tokens_total", kind="canary") > 0}
    led = {r.name for r in fleet.live() if metric(r, "stopgate_fleet_applied_samples_total") > 0}
    # Only replicas that led the route (folded its log) ran canaries; with a stable lease that is one replica.
    assert ran_canaries and ran_canaries <= led, (ran_canaries, led)
    share = snapshot(fleet.live()[0])["eval_share"]
    # Each replica checks the shared counters before a run, so the fleet overshoots by at most the runs in
    # flight at once (a few per replica, each under 100 tokens with this engine), not by a factor of 3.
    assert 0 < share["eval_tokens"] <= EVAL_SHARE * share["live_tokens"] + 3 * 4 * 100, share


def test_redis_restart_serves_every_live_request_and_drains_the_buffer_in_order(fleet: Fleet) -> None:
    fleet.redis.stop()
    wait_until(
        lambda: all(metric(r, "stopgate_fleet_redis_up") == 0 for r in fleet.live()), "replicas to see Redis down"
    )
    budgets_before = [snapshot(r)["budget"] for r in fleet.live()]
    before = len(fleet.codes)
    send(fleet, 45)
    assert set(fleet.codes[before:]) == {200}, "no 5xx while Redis is down"
    assert sum(metric(r, "stopgate_fleet_buffered_samples") for r in fleet.live()) >= 45
    assert [snapshot(r)["budget"] for r in fleet.live()] == budgets_before, "the last known budget serves"
    # An operator's write cannot be made durable now: 503 with Retry-After, and nothing changes.
    r = httpx.put(f"{fleet.live()[0].url}/admin/routes/{ROUTE}/budget", json={"budget": 8}, headers=ADMIN, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "state_store_unavailable", r.text
    assert r.headers["retry-after"] == "1"
    assert snapshot(fleet.live()[0])["budget"] == budgets_before[0]
    fleet.redis.start()
    assert_one_controller(fleet)  # every buffered sample appended once, in order, and folded once
    # Canaries keep sampling, so a buffer may hold a sample for a moment; it must empty.
    wait_until(lambda: all(metric(r, "stopgate_fleet_buffered_samples") == 0 for r in fleet.live()), "empty buffers")
    assert sum(metric(r, "stopgate_fleet_dropped_samples_total") for r in fleet.live()) == 0


def leader_of(fleet: Fleet, via: Child | None = None) -> Child:
    """The replica holding the route's lease, as ``via`` (default: the first live replica) reports it."""
    holder = snapshot(via or fleet.live()[0])["fleet"]["leader"]
    assert holder is not None
    pid = int(holder.split("-")[-2])
    return next(r for r in fleet.replicas if r.pid == pid)


def test_a_leader_killed_with_sigkill_hands_the_lease_over_and_loses_no_sample(fleet: Fleet) -> None:
    old = leader_of(fleet)
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait()
    killed_at = time.monotonic()
    others = fleet.live()

    def taken() -> bool:
        holder = snapshot(others[0])["fleet"]["leader"]
        return holder is not None and leader_of(fleet) is not old

    wait_until(taken, "another replica to take the lease", timeout_s=LEASE_MS / 1000 * 10)
    print(f"lease handed over {time.monotonic() - killed_at:.1f} s after SIGKILL (lease {LEASE_MS} ms)")
    send(fleet, 30)
    assert set(fleet.codes) == {200}
    assert_one_controller(fleet)


def test_a_leader_paused_past_its_lease_cannot_overwrite_the_next_leaders_state(fleet: Fleet) -> None:
    paused = leader_of(fleet)
    other = next(r for r in fleet.live() if r is not paused)
    keys = Keys("stopgate", ROUTE)
    client = fleet.redis.client()
    try:
        old_token = int(client.get(keys.lease).rsplit(":", 1)[1])
    finally:
        client.close()
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        # (Asked through `other`: the paused replica answers nothing.)
        wait_until(lambda: leader_of(fleet, via=other) is other, "the other replica to take the lease", timeout_s=60)
        send(fleet, 20, to=[other])
        # What the paused leader would send if it woke mid-commit: its old token. Redis refuses it.
        assert asyncio.run(stale_commit(fleet, old_token)) == "refused"
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    send(fleet, 10)
    assert set(fleet.codes) == {200}
    assert_one_controller(fleet)
    assert leader_of(fleet) is other


async def stale_commit(fleet: Fleet, token: int) -> str:
    log = RedisLog.from_url(fleet.redis.url)
    try:
        current = await log.read_state(ROUTE)
        try:
            await log.commit(ROUTE, token, current.revision, {"budget": 1}, "", {"gold": 1000})
        except StaleLease:
            return "refused"
        return "written"
    finally:
        await log.aclose()


def test_a_leader_stopped_with_sigterm_appends_its_buffer_and_hands_the_lease_over(fleet: Fleet) -> None:
    leader = leader_of(fleet)
    last = next(r for r in fleet.live() if r is not leader)
    send(fleet, 12, to=[leader])  # some of these samples may still be in its buffer when it stops
    stopped_at = time.monotonic()
    leader.stop()
    assert leader.proc.returncode == 0, leader.tail()
    wait_until(lambda: leader_of(fleet, via=last) is last, "the last replica to take the lease", timeout_s=60)
    print(f"lease taken {time.monotonic() - stopped_at:.1f} s after SIGTERM (the stopping leader released it)")
    assert_one_controller(fleet)  # nothing the stopped replica served was lost
