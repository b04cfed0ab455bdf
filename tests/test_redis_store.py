"""The shared Redis store (issue 18) against a real ``redis-server``: the ``Store`` contract the SQLite and
memory stores pass, and what only a shared store needs: appends that a retry cannot double, a lease with a
fencing token that a paused ex-leader cannot write past, and a commit that yields to an operator's write."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.control.lease import Lease
from gateway.control.redis_store import Conflict, RedisLog, RedisStore, StaleLease
from gateway.control.store import SampleRecord, Store
from gateway.control.stores import open_store
from loadtest.redis_server import RedisServer

# The behaviour every store shares, run here against Redis (the fixture below replaces theirs).
from tests.support.store_contract import (  # noqa: F401  (the contract's tests, collected here)
    StoreFactory,
    sample,
    test_calls_after_close_raise_store_error_and_closing_twice_is_harmless,
    test_concurrent_saves_from_threads_all_land,
    test_counts_are_by_source,
    test_later_save_replaces_the_state,
    test_load_returns_none_for_a_route_never_saved,
    test_pruning_keeps_the_newest_samples_and_counts_stay_totals,
    test_reference_sets_are_kept_by_name_in_upload_order,
    test_routes_lists_every_saved_route_sorted,
    test_sample_fields_round_trip,
    test_sample_of_another_route_is_refused,
    test_samples_come_back_oldest_first_and_limited_to_the_newest,
    test_save_then_load_returns_the_same_state,
    test_state_that_is_not_json_is_refused_and_the_old_state_kept,
    test_stored_state_does_not_change_when_the_caller_mutates_its_dict,
)


@pytest.fixture
def make_store(redis_server: RedisServer, prefix: str) -> Iterator[StoreFactory]:
    opened: list[Store] = []

    def factory(**kwargs: Any) -> Store:
        kwargs.pop("prune_every", None)  # Redis trims the stream itself
        store = RedisStore(redis_server.url, prefix=prefix, **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_open_store_refuses_a_redis_url_and_names_state_url(redis_server: RedisServer) -> None:
    """Regression (issue 18 review): a Redis URL in STOPGATE_STATE_PATH opened a shared store with no
    fleet loop, so each replica stepped its own controller on it and overwrote the others."""
    from gateway.control.store import StoreError

    with pytest.raises(StoreError, match="STOPGATE_STATE_URL") as info:
        open_store(redis_server.url.replace("redis://", "redis://user:s3cret@"))
    assert "s3cret" not in str(info.value)


def test_unreachable_redis_is_a_store_error_naming_the_url_without_its_password() -> None:
    from gateway.control.store import StoreError
    from gateway.engine.embedded import free_port

    with pytest.raises(StoreError, match=r"redis://\*\*\*@127.0.0.1:\d+/0: cannot reach Redis") as info:
        RedisStore(f"redis://user:s3cret@127.0.0.1:{free_port()}/0")
    assert "s3cret" not in str(info.value)


def record(budget: int, correct: bool = True) -> SampleRecord:
    return sample("arith", budget=budget, correct=correct)


def test_a_retried_append_adds_each_sample_once(redis_server: RedisServer, prefix: str) -> None:
    async def go() -> list[int]:
        log = RedisLog.from_url(redis_server.url, prefix=prefix)
        try:
            batch = [(1, record(1), True), (2, record(2), True)]
            assert await log.append("arith", "replica-a", batch) == 2
            # The reply was lost, say: the replica sends the batch again with one more sample.
            assert await log.append("arith", "replica-a", [*batch, (3, record(3), False)]) == 1
            assert await log.append("arith", "replica-b", [(1, record(10), True)]) == 1  # numbered per replica
            entries = await log.entries_after("arith", "", 100)
            assert [e.controlled for e in entries] == [True, True, False, True]
            return [e.record.budget for e in entries]
        finally:
            await log.aclose()

    assert run(go()) == [1, 2, 3, 10]


def test_the_lease_is_renewed_by_its_holder_and_refused_to_others(redis_server: RedisServer, prefix: str) -> None:
    async def go() -> None:
        log = RedisLog.from_url(redis_server.url, prefix=prefix)
        try:
            a = Lease(log.client, log.keys("arith"), "a", ttl_ms=60_000)
            b = Lease(log.client, log.keys("arith"), "b", ttl_ms=60_000)
            token = await a.hold()
            assert token is not None
            assert await b.hold() is None
            assert await a.hold() == token  # renewal keeps the token
            await a.release()
            assert await b.hold() == token + 1  # a new holder, a newer token
        finally:
            await log.aclose()

    run(go())


def test_a_paused_ex_leader_cannot_overwrite_the_new_leaders_state(redis_server: RedisServer, prefix: str) -> None:
    """The fencing token, not the lease, makes writes safe: A's lease runs out while A is 'paused'
    between reading and committing; B takes over and commits; A's commit is refused and changes nothing."""

    async def go() -> None:
        log = RedisLog.from_url(redis_server.url, prefix=prefix)
        try:
            await log.append("arith", "r", [(1, record(1), True), (2, record(2), True)])
            a = Lease(log.client, log.keys("arith"), "a", ttl_ms=200)
            token_a = await a.hold()
            assert token_a is not None
            read_by_a = await log.read_state("arith")
            entries = await log.entries_after("arith", read_by_a.last_id, 10)
            while await log.client.exists(log.keys("arith").lease):  # A is paused past its lease
                await asyncio.sleep(0.05)
            b = Lease(log.client, log.keys("arith"), "b", ttl_ms=60_000)
            token_b = await b.hold()
            assert token_b is not None and token_b > token_a
            await log.commit("arith", token_b, 0, {"budget": 2}, entries[-1].id, {"gold": 2})
            with pytest.raises(StaleLease):  # A wakes up and tries to write what it folded
                await log.commit("arith", token_a, read_by_a.revision, {"budget": 99}, entries[-1].id, {"gold": 2})
            after = await log.read_state("arith")
            assert after.state == {"budget": 2} and after.counts["gold"] == 2 and after.revision == 1
        finally:
            await log.aclose()

    run(go())


def test_a_leaders_commit_yields_to_an_operators_write(redis_server: RedisServer, prefix: str) -> None:
    async def go(store: RedisStore) -> None:
        log = RedisLog.from_url(redis_server.url, prefix=prefix)
        try:
            lease = Lease(log.client, log.keys("arith"), "a", ttl_ms=60_000)
            token = await lease.hold()
            assert token is not None
            await log.commit("arith", token, 0, {"budget": 64}, "", {})
            read = await log.read_state("arith")
            store.save("arith", {"budget": 200, "frozen": True})  # the admin API on another replica
            with pytest.raises(Conflict):
                await log.commit("arith", token, read.revision, {"budget": 32}, "", {})
            assert (await log.read_state("arith")).state == {"budget": 200, "frozen": True}
        finally:
            await log.aclose()

    store = RedisStore(redis_server.url, prefix=prefix)
    try:
        run(go(store))
    finally:
        store.close()


def test_samples_of_a_route_keep_their_keys_in_one_cluster_slot(redis_server: RedisServer, prefix: str) -> None:
    keys = RedisLog.from_url(redis_server.url, prefix=prefix).keys("arith")
    names = [keys.state, keys.log, keys.seq, keys.lease, keys.fence, keys.share, keys.refs, keys.refs_order]
    assert all("{arith}" in name for name in names)  # the hash tag: one slot, so the scripts may touch them all


def test_the_store_state_survives_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        with RedisStore(server.url) as store:
            store.save("arith", {"budget": 96}, record(96))
        server.stop()
        server.start()
        with RedisStore(server.url) as store:
            assert store.load("arith") == {"budget": 96}
            assert store.counts("arith")["gold"] == 1
    finally:
        server.stop()


def test_samples_buffered_while_redis_is_down_are_appended_in_order_and_overflow_is_counted(tmp_path: Path) -> None:
    """The fleet loop in-process: the request path only fills a bounded buffer; a round appends it in order."""
    from prometheus_client import CollectorRegistry

    from gateway.control.fleet import Fleet
    from gateway.control.plane import ControlPlane
    from gateway.metrics import Metrics
    from gateway.settings import Settings
    from tests.support.fleet import write_routes

    server = RedisServer(tmp_path / "redis")
    server.start()
    settings = Settings(upstream_url="http://127.0.0.1:9", routes_file=write_routes(tmp_path), state_url=server.url)
    metrics = Metrics(CollectorRegistry())
    plane = ControlPlane(settings, settings.load_routes(), RedisStore(server.url), metrics)
    fleet = Fleet(plane, RedisLog.from_url(server.url), metrics, buffer_max=3)
    plane.fleet = fleet
    registry = metrics.registry

    async def go() -> None:
        await fleet.round()  # Redis up: this replica takes the lease and publishes the initial state
        fleet._set_up(True)
        assert fleet.leads("arith")
        server.stop()
        for budget in (1, 2, 3, 4, 5):
            fleet.submit(record(budget), True)
        with pytest.raises(Exception):  # noqa: B017 - whichever connection error redis-py raises
            await fleet.round()
        fleet._set_up(False)
        assert not fleet.leads("arith"), "no Redis, no lease: this replica schedules no canaries"
        server.start()
        await fleet.round()  # within the lease time: the same replica renews its lease and folds the samples in
        await fleet.store.aclose()

    try:
        run(go())
        assert registry.get_sample_value("stopgate_fleet_dropped_samples_total", {"route": "arith"}) == 2
        assert registry.get_sample_value("stopgate_fleet_buffered_samples") == 0
        with RedisStore(server.url) as store:
            assert [s.budget for s in store.samples("arith")] == [1, 2, 3]
            assert store.counts("arith")["gold"] == 3
    finally:
        plane.store.close()
        server.stop()


def test_serve_with_an_unreachable_redis_exits_with_one_line_naming_it() -> None:
    import subprocess
    import sys

    from gateway.engine.embedded import free_port

    env = {**os.environ, "STOPGATE_STATE_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--upstream", "http://127.0.0.1:9", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot reach Redis" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("url", ["http://redis:6379", "redis-host:6379", "postgres://x"])
def test_a_state_url_that_is_not_redis_fails_at_start_up_naming_the_key(url: str) -> None:
    from gateway.settings import ConfigError, build_settings

    with pytest.raises(ConfigError, match="STOPGATE_STATE_URL"):
        build_settings(state_url=url)


def test_the_published_budget_is_refreshed_at_least_once_a_second() -> None:
    from gateway.settings import ConfigError, build_settings

    with pytest.raises(ConfigError, match="STOPGATE_STATE_REFRESH_S"):
        build_settings(state_refresh_s=2.0)
