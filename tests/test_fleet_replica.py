"""Issue 18 review fixes: one replica's fleet loop and admin writes, in-process, against a real ``redis-server``.

Each test builds replicas (a ``ControlPlane`` with its ``Fleet``) on a key prefix of its own, on one
module-wide Redis, and drives their rounds by hand, so the order of events is the test's, not a timer's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.control.fleet import Fleet
from gateway.control.plane import ControlPlane
from gateway.control.redis_store import RedisLog, RedisStore
from gateway.control.store import SampleRecord
from gateway.errors import StateUnavailable
from gateway.evaluation.sampler import Live, Sampler
from gateway.metrics import Metrics
from gateway.settings import Settings
from loadtest.redis_server import RedisServer
from tests.support.fleet import write_routes
from tests.support.store_contract import sample

ROUTE = "arith"


@dataclass
class Replica:
    plane: ControlPlane
    sampler: Sampler
    fleet: Fleet
    metrics: Metrics

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


async def _no_engine(*args: Any) -> tuple[Live, str]:
    raise AssertionError("these replicas have no engine: no evaluation run may start")


@asynccontextmanager
async def replica(
    server: RedisServer, prefix: str, tmp_path: Path, name: str, **fleet_args: Any
) -> AsyncIterator[Replica]:
    """A replica as ``create_app`` builds one, on its own key prefix; its loop is not started."""
    (tmp_path / name).mkdir()
    routes = write_routes(tmp_path / name)
    settings = Settings(upstream_url="http://127.0.0.1:9", routes_file=routes, state_url=server.url)
    metrics = Metrics(CollectorRegistry())
    store = RedisStore(server.url, prefix=prefix)
    plane = ControlPlane(settings, settings.load_routes(), store, metrics)
    sampler = Sampler(settings, plane, metrics, run=_no_engine, in_flight=lambda: 0)
    fleet = Fleet(plane, RedisLog.from_url(server.url, prefix=prefix), metrics, replica=name, **fleet_args)
    plane.fleet = fleet
    try:
        yield Replica(plane, sampler, fleet, metrics)
    finally:
        if fleet._task is not None:
            fleet._task.cancel()
            await asyncio.gather(fleet._task, return_exceptions=True)
        await fleet.store.aclose()
        store.close()


def gold(budget: int, correct: bool) -> SampleRecord:
    return sample(ROUTE, budget=budget, correct=correct)


def stored_state(server: RedisServer, prefix: str) -> dict[str, Any] | None:
    with RedisStore(server.url, prefix=prefix) as store:
        return store.load(ROUTE)


def test_an_admin_write_on_a_stale_replica_keeps_the_samples_the_leader_folded_in(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """Regression (issue 18 review, exactly once): B's admin write is applied to the state the leader A
    published, not to B's cached one, so the samples A folded in since B last refreshed stay in the state."""

    async def go() -> None:
        async with replica(redis_server, prefix, tmp_path, "a") as a, replica(redis_server, prefix, tmp_path, "b") as b:
            await a.fleet.round()  # A leads and publishes the initial state; B never refreshes
            for i in range(10):
                a.fleet.submit(gold(16, correct=i % 3 != 0), True)
            await a.fleet.round()
            folded = stored_state(redis_server, prefix)
            assert folded is not None and len(folded["window"]) == 10
            await b.plane.freeze(ROUTE, True)
            assert stored_state(redis_server, prefix) == {**folded, "frozen": True}
            assert b.plane.routes[ROUTE].state is not None and b.plane.routes[ROUTE].state.frozen
            # The leader's next fold starts from the operator's state: all 11 samples, frozen.
            a.fleet.submit(gold(16, correct=True), True)
            await a.fleet.round()
            after = stored_state(redis_server, prefix)
            assert after is not None and after["frozen"] and len(after["window"]) == 11

    asyncio.run(go())


def test_a_target_change_that_cannot_be_written_leaves_the_target_as_it_was(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """Regression (issue 18 review): a 503 says nothing changed, so the replica keeps its old target."""

    async def go() -> None:
        async with replica(redis_server, prefix, tmp_path, "a") as a:
            rc = a.plane.routes[ROUTE]
            assert rc.config is not None
            target, state = rc.config.target, rc.state
            a.plane.store.close()  # every write now fails as an unreachable Redis does
            with pytest.raises(StateUnavailable):
                await a.plane.set_target(ROUTE, 0.95)
            assert rc.config.target == target and rc.state == state

    asyncio.run(go())


async def eventually(check: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


def test_undecodable_log_entries_are_skipped_counted_and_the_fold_goes_past_them(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """Regression (issue 18 review): one bad entry used to raise out of every round, for good."""

    async def go() -> None:
        async with replica(redis_server, prefix, tmp_path, "a") as a:
            await a.fleet.round()
            log = a.fleet.store.client
            key = a.fleet.store.keys(ROUTE).log
            a.fleet.submit(gold(16, correct=True), True)
            await a.fleet.round()
            for fields in ({"r": "not json"}, {"r": '{"route": "arith"}'}, {"x": "1"}, {"r": "[1]"}):
                await log.xadd(key, fields)  # type: ignore[arg-type]
            bad_budget = '{"route":"arith","source":"gold","budget":"16","level":0,"correct":true,"tokens":0,"at":1}'
            await log.xadd(key, {"r": bad_budget})
            a.fleet.submit(gold(16, correct=False), True)
            await a.fleet.round()
            state = stored_state(redis_server, prefix)
            assert state is not None and state["window"] == [True, False]
            assert a.value("stopgate_fleet_undecodable_entries_total", route=ROUTE) == 5
            last = await log.xrevrange(key, "+", "-", 1)
            assert (await a.fleet.store.read_state(ROUTE)).last_id == last[0][0]
            await a.fleet.round()  # nothing new: the bad entries are not read, or counted, again
            assert a.value("stopgate_fleet_undecodable_entries_total", route=ROUTE) == 5

    asyncio.run(go())


def test_a_fleet_loop_that_hits_an_unexpected_error_keeps_running_and_stops_leading(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """Regression (issue 18 review): a ValueError from a bad stored state ended the task silently while
    ``leads()`` stayed true, so a dead ex-leader kept scheduling canaries."""

    async def go() -> None:
        async with replica(redis_server, prefix, tmp_path, "a", refresh_s=0.05) as a:
            a.fleet.start()
            await eventually(lambda: a.fleet.leads(ROUTE), "the replica to lead")
            client = a.fleet.store.client
            key = a.fleet.store.keys(ROUTE).state
            good = await client.hget(key, "state")  # type: ignore[misc]
            await client.hset(key, "state", '{"bogus": 1}')  # type: ignore[misc]
            await eventually(lambda: a.value("stopgate_fleet_loop_errors_total") >= 2, "failed rounds")
            assert a.fleet._task is not None and not a.fleet._task.done(), "the loop goes on"
            assert not a.fleet.leads(ROUTE)
            assert a.value("stopgate_fleet_leader", route=ROUTE) == 0
            await client.hset(key, "state", good)  # type: ignore[misc]
            await eventually(lambda: a.fleet.leads(ROUTE), "the replica to lead again once rounds succeed")

    asyncio.run(go())


def test_a_replica_whose_lease_ran_out_does_not_lead_even_before_its_next_round(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """Regression (issue 18 review): ``leads()`` checked only the token, not that the lease was renewed
    within its time to live, so a stalled loop left a replica scheduling canaries as a leader."""

    async def go() -> None:
        async with replica(redis_server, prefix, tmp_path, "a", lease_ms=300) as a:
            await a.fleet.round()
            a.fleet._set_up(True)
            assert a.fleet.leads(ROUTE)
            lease_key = a.fleet.store.keys(ROUTE).lease
            while await a.fleet.store.client.exists(lease_key):  # no round runs: the lease runs out
                await asyncio.sleep(0.05)
            await eventually(lambda: not a.fleet.leads(ROUTE), "leads() to turn false", timeout_s=10)

    asyncio.run(go())


def test_an_admin_write_while_redis_hangs_does_not_block_the_event_loop(tmp_path: Path) -> None:
    """Regression (issue 18 review): the admin write called Redis synchronously on the event loop, so a
    Redis that stopped answering stalled every request on the replica until the socket timed out."""
    import signal

    server = RedisServer(tmp_path / "redis-own")
    server.start()

    async def go() -> None:
        async with replica(server, "hang", tmp_path, "a") as a:
            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)  # Redis takes the connection and answers nothing
            try:
                write = asyncio.ensure_future(a.plane.set_budget(ROUTE, 32))
                for _ in range(20):  # the loop keeps turning while the write waits on Redis
                    await asyncio.sleep(0)
                assert not write.done(), "the write ran on the event loop and blocked it"
            finally:
                server.proc.send_signal(signal.SIGCONT)
            await write  # Redis answers again: the write lands
            state = stored_state(server, "hang")
            assert state is not None and state["budget"] == 32

    try:
        asyncio.run(go())
    finally:
        server.stop()


def test_a_buffer_of_several_batches_is_appended_whole_and_in_order(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """The drain takes one batch at a time off the front (issue 18 review: without copying the buffer)."""
    from gateway.control.fleet import BATCH

    async def go() -> None:
        async with replica(redis_server, prefix, tmp_path, "a") as a:
            n = 2 * BATCH + 7
            for i in range(n):
                a.fleet.submit(gold(i + 1, correct=True), False)
            await a.fleet.flush()
            entries = await a.fleet.store.entries_after(ROUTE, "", n + 1)
            assert [e.record.budget for e in entries] == list(range(1, n + 1))
            assert a.fleet.buffered == 0

    asyncio.run(go())


def test_shared_token_counters_are_added_all_or_nothing(redis_server: RedisServer, prefix: str) -> None:
    """Regression (issue 18 review): the HINCRBY pipeline was not a transaction, so a batch refused part
    way applied its first counters and the retry (the replica keeps the batch) counted them twice.
    Here Redis refuses route b's key to this client (an ACL), so the batch fails half way."""
    import redis as sync_redis

    user = f"u-{prefix}"
    admin = sync_redis.Redis.from_url(redis_server.url)
    try:
        admin.execute_command("ACL", "SETUSER", user, "on", ">pw", f"~{prefix}:{{a}}:*", "+@all")
    finally:
        admin.close()

    async def go() -> None:
        log = RedisLog.from_url(redis_server.url.replace("redis://", f"redis://{user}:pw@"), prefix=prefix)
        try:
            with pytest.raises(Exception):  # noqa: B017 - redis-py's abort error for the refused batch
                await log.add_tokens({"a": {"live": 5}, "b": {"live": 7}})
            assert await log.client.hget(log.keys("a").share, "live") is None  # type: ignore[misc]
            await log.add_tokens({"a": {"live": 5}})
            assert await log.client.hget(log.keys("a").share, "live") == "5"  # type: ignore[misc]
        finally:
            await log.aclose()

    asyncio.run(go())


def test_shutdown_appends_the_samples_of_evaluation_runs_that_finish_while_it_drains(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """Regression (issue 18 review): the fleet's last flush ran before the plane's tasks were drained,
    so a shadow run that finished during shutdown handed in a sample nobody appended."""
    from gateway.http.app import close_control

    async def go() -> None:
        async with replica(redis_server, prefix, tmp_path, "a") as a:
            await a.fleet.round()
            release = asyncio.Event()

            async def shadow_run() -> None:
                await release.wait()
                a.fleet.submit(sample(ROUTE, source="shadow", budget=64, tokens=30), True)

            a.sampler._spawn(shadow_run())
            asyncio.get_running_loop().call_soon(release.set)  # the run ends once shutdown has begun
            await close_control(a.sampler, a.plane, a.fleet)
            a.fleet._task = None

    asyncio.run(go())
    with RedisStore(redis_server.url, prefix=prefix) as store:
        assert [s.source for s in store.samples(ROUTE)] == ["shadow"]
