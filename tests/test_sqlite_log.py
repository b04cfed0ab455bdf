"""Issue 17 (workers): the fleet over the SQLite state file, in-process, rounds driven by hand.

Two "workers" (a ``ControlPlane`` with its ``Fleet``, as ``create_app`` builds one for
``serve --workers N``) share one state file; the test orders their rounds, so every
interleaving is the test's, not a timer's.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.control.controller import Sample, initial_state, state_to_dict, step
from gateway.control.fleet import Fleet
from gateway.control.plane import ControlPlane, controller_config
from gateway.control.redis_store import StaleLease
from gateway.control.sqlite_log import SQLiteLog, SQLiteShared
from gateway.control.sqlite_store import SQLiteStore
from gateway.control.store import SampleRecord
from gateway.metrics import Metrics
from gateway.settings import Settings
from tests.support.fleet import write_routes
from tests.support.store_contract import sample

ROUTE = "arith"


@dataclass
class Worker:
    plane: ControlPlane
    fleet: Fleet
    store: SQLiteShared


@asynccontextmanager
async def worker(tmp_path: Path, name: str, **fleet_args: Any) -> AsyncIterator[Worker]:
    routes = write_routes(tmp_path)
    db = tmp_path / "state.db"
    settings = Settings(upstream_url="http://127.0.0.1:9", routes_file=routes, state_path=str(db), workers=2)
    metrics = Metrics(CollectorRegistry())
    store = SQLiteShared(db)
    plane = ControlPlane(settings, settings.load_routes(), store, metrics)
    fleet = Fleet(plane, SQLiteLog(db), metrics, replica=name, **fleet_args)
    plane.fleet = fleet
    try:
        yield Worker(plane, fleet, store)
    finally:
        await fleet.store.aclose()
        store.close()


def gold(budget: int, correct: bool) -> SampleRecord:
    return sample(ROUTE, budget=budget, correct=correct)


def rows(db: Path, sql: str) -> list[Any]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


def test_samples_from_two_workers_reach_one_controller_step_in_order_exactly_once(tmp_path: Path) -> None:
    async def go() -> None:
        async with worker(tmp_path, "a") as a, worker(tmp_path, "b") as b:
            await a.fleet.round()  # a leads
            await b.fleet.round()
            assert a.fleet.leases[ROUTE].held() and not b.fleet.leases[ROUTE].held()
            outcomes = [i % 4 != 0 for i in range(30)]
            for i, correct in enumerate(outcomes):
                (a if i % 2 else b).fleet.submit(gold(16, correct), True)
            await b.fleet.flush()  # b's samples first in the log, then a's
            await a.fleet.round()
            await b.fleet.round()
            order = [c for i, c in enumerate(outcomes) if i % 2 == 0] + [c for i, c in enumerate(outcomes) if i % 2]
            config = controller_config(a.plane.routes[ROUTE].route)
            expected = initial_state(config)
            for correct in order:
                expected = step(expected, Sample(correct, 16, 0, "gold"), config)
            with SQLiteStore(tmp_path / "state.db") as store:  # the file reads as a plain state store, too
                assert store.load(ROUTE) == state_to_dict(expected)
                assert store.counts(ROUTE)["gold"] == 30
                assert [s.correct for s in store.samples(ROUTE, 100)] == order
            assert b.plane.routes[ROUTE].state == expected  # the other worker adopted the published state
            assert b.plane.snapshot(ROUTE)["samples"]["gold"] == 30
            assert rows(tmp_path / "state.db", "SELECT count(*) FROM fleet_log") == [(0,)]

    asyncio.run(go())


def test_a_retried_append_adds_nothing_twice(tmp_path: Path) -> None:
    async def go() -> None:
        async with worker(tmp_path, "a") as a:
            batch = [(1, gold(16, True), True), (2, gold(16, False), True)]
            assert await a.fleet.store.append(ROUTE, "a", batch) == 2
            assert await a.fleet.store.append(ROUTE, "a", batch) == 0  # the reply was lost; the worker retries
            assert await a.fleet.store.append(ROUTE, "a", [*batch, (3, gold(16, True), True)]) == 1
            assert await a.fleet.store.append(ROUTE, "other", batch) == 2  # another worker's numbers are its own
            assert rows(tmp_path / "state.db", "SELECT count(*) FROM fleet_log") == [(5,)]

    asyncio.run(go())


def test_a_worker_whose_lease_ran_out_cannot_commit_over_the_next_leader(tmp_path: Path) -> None:
    async def go() -> None:
        async with worker(tmp_path, "a", lease_ms=200) as a, worker(tmp_path, "b", lease_ms=200) as b:
            await a.fleet.round()
            old = a.fleet.leases[ROUTE].token
            assert old is not None
            assert await b.fleet.leases[ROUTE].hold() is None  # held by a
            time.sleep(0.3)  # a is paused past its lease (SIGSTOP, a long GC, a SIGKILL)
            assert not a.fleet.leases[ROUTE].held()
            new = await b.fleet.leases[ROUTE].hold()
            assert new is not None and new > old
            current = await a.fleet.store.read_state(ROUTE)
            with pytest.raises(StaleLease):
                await a.fleet.store.commit(ROUTE, old, current.revision, {"stale": True}, "", {})
            await b.fleet.round()
            assert b.fleet.leases[ROUTE].held()
            b.fleet.submit(gold(16, True), True)
            await b.fleet.round()
            await a.fleet.round()  # a learns it lost the lease and follows
            assert not a.fleet.leases[ROUTE].held()
            assert a.plane.snapshot(ROUTE)["samples"]["gold"] == 1

    asyncio.run(go())


def test_an_admin_write_on_one_worker_keeps_what_the_leader_folded_in(tmp_path: Path) -> None:
    async def go() -> None:
        async with worker(tmp_path, "a") as a, worker(tmp_path, "b") as b:
            await a.fleet.round()
            for i in range(5):
                a.fleet.submit(gold(16, i % 2 == 0), True)
            await a.fleet.round()  # b has not refreshed: its cached state has an empty window
            await b.plane.freeze(ROUTE, True)
            with SQLiteStore(tmp_path / "state.db") as store:
                saved = store.load(ROUTE)
            assert saved is not None and saved["frozen"] and len(saved["window"]) == 5
            a.fleet.submit(gold(16, True), True)
            await a.fleet.round()  # the leader folds into the operator's state, not over it
            with SQLiteStore(tmp_path / "state.db") as store:
                saved = store.load(ROUTE)
            assert saved is not None and saved["frozen"] and len(saved["window"]) == 6

    asyncio.run(go())


def test_an_upload_on_one_worker_reaches_the_others(tmp_path: Path) -> None:
    async def go() -> None:
        async with worker(tmp_path, "a") as a, worker(tmp_path, "b") as b:
            body = '{"id": "u1", "prompt": "Q: 100+0=?\\n", "answers": ["100"], "route": "arith"}\n'
            await a.plane.upload(ROUTE, "uploaded", body)
            await b.fleet.round()
            assert "uploaded" in b.plane.snapshot(ROUTE)["references"]["sets"]

    asyncio.run(go())
