"""The controller's state store (issue 5): behaviour shared by both stores, and SQLite persistence.

Persistence is tested with real files and real processes: a restart, a child
killed with SIGKILL while it writes, a newer schema version, and a file that
is not a database.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from gateway.control.memory_store import MemoryStore
from gateway.control.sqlite_store import SCHEMA_VERSION, SQLiteStore
from gateway.control.store import Store, StoreError
from gateway.control.stores import open_store

# The behaviour every store shares, run here against the memory and SQLite stores of `make_store`.
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

REPO = Path(__file__).resolve().parent.parent


def raw_query(path: Path, sql: str) -> list[Any]:
    """Read the database file behind the store's back, as an operator would."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Open stores of one kind; every store opened is closed at teardown."""
    opened: list[Store] = []

    def factory(**kwargs: Any) -> Store:
        store: Store
        if request.param == "memory":
            kwargs.pop("prune_every", None)
            store = MemoryStore(**kwargs)
        else:
            store = SQLiteStore(tmp_path / "state" / "stopgate.db", **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


# Behaviour both stores share.


def test_sample_record_refuses_an_unknown_source() -> None:
    with pytest.raises(ValueError, match="source"):
        sample(source="probe")


# SQLite persistence.


def test_state_and_samples_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "stopgate.db"
    records = [sample("arith", source=s, budget=b) for s, b in [("gold", 120), ("canary", 96), ("shadow", 77)]]
    with SQLiteStore(path) as store:
        for record in records:
            store.save("arith", {"budget": record.budget, "window": [True]}, record)
        store.save("qa", {"budget": 300})
    with SQLiteStore(path) as store:
        assert store.routes() == ["arith", "qa"]
        assert store.load("arith") == {"budget": 77, "window": [True]}
        assert store.load("qa") == {"budget": 300}
        assert store.samples("arith") == records
        assert store.counts("arith") == {"canary": 1, "gold": 1, "shadow": 1}
        store.save("arith", {"budget": 60})
        store.save_reference_set("arith", "extra", "{}\n")
    assert raw_query(path, "SELECT route, revision FROM states ORDER BY route") == [("arith", 4), ("qa", 1)]
    with SQLiteStore(path) as store:
        assert store.reference_sets("arith") == [("extra", "{}\n")]


def test_new_database_is_in_wal_mode_with_the_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "stopgate.db"
    with SQLiteStore(path):
        pass
    assert raw_query(path, "PRAGMA journal_mode") == [("wal",)]
    assert raw_query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_pruning_runs_periodically_not_on_every_write(tmp_path: Path) -> None:
    path = tmp_path / "stopgate.db"
    with SQLiteStore(path, max_samples_per_route=10, prune_every=5) as store:
        for i in range(13):
            store.save("arith", {"budget": i}, sample("arith", budget=i))
        # Pruned after inserts 5 and 10 (nothing over 10 then); 13 rows until the next prune.
        assert raw_query(path, "SELECT count(*) FROM samples") == [(13,)]
        assert len(store.samples("arith", limit=1000)) == 10
        store.save("arith", {"budget": 13}, sample("arith", budget=13))
        store.save("arith", {"budget": 14}, sample("arith", budget=14))
        assert raw_query(path, "SELECT min(budget), count(*) FROM samples") == [(5, 10)]


_WRITER = """
import sys
from gateway.control.sqlite_store import SQLiteStore
from gateway.control.store import SampleRecord

store = SQLiteStore(sys.argv[1])
state = store.load("arith")
i = 0 if state is None else state["revision"]
while True:
    i += 1
    record = SampleRecord(route="arith", source="gold", budget=i, level=0, correct=True, tokens=0, at=float(i))
    store.save("arith", {"revision": i, "pad": "x" * 3000}, record)
    sys.stdout.write(f"{i}\\n")
    sys.stdout.flush()
"""


def kill_writer_mid_stream(path: Path, after: int) -> int:
    """Run a child that saves revisions as fast as it can; SIGKILL it once it reports ``after`` more.

    Returns the last revision the child reported committed.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    first = last = None
    with child, child.stdout, child.stderr:
        for line in child.stdout:
            last = int(line)
            first = last if first is None else first
            if last - first >= after:
                os.kill(child.pid, signal.SIGKILL)
                break
        rest = child.stdout.read()  # lines written before the kill landed
        assert child.wait() == -signal.SIGKILL, child.stderr.read()
    for line in rest.split("\n")[:-1]:  # a line without its newline was not reported
        last = int(line)
    assert last is not None
    return last


def test_kill_9_mid_write_loses_at_most_the_last_update(tmp_path: Path) -> None:
    path = tmp_path / "stopgate.db"
    for after in (150, 237):  # the second child resumes from what the first left, then dies too
        reported = kill_writer_mid_stream(path, after)
        assert (tmp_path / "stopgate.db-wal").exists()  # it died without closing: recovery is exercised
        assert raw_query(path, "PRAGMA integrity_check") == [("ok",)]
        with SQLiteStore(path) as store:
            state = store.load("arith")
            assert state is not None
            revision = state["revision"]
            # Committed but killed before it printed: one ahead of the report, never behind it.
            assert reported <= revision <= reported + 1
            # The state and its sample were committed together.
            assert store.counts("arith")["gold"] == revision
            assert [s.budget for s in store.samples("arith", limit=1)] == [revision]
        assert raw_query(path, "SELECT revision FROM states") == [(revision,)]


def _foreign_database(path: Path, user_version: int, journal_mode: str) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA journal_mode = {journal_mode}")
        conn.execute("CREATE TABLE states (route TEXT, blob BLOB)")
        conn.execute("INSERT INTO states VALUES ('arith', x'00ff')")
        conn.commit()
        conn.execute(f"PRAGMA user_version = {user_version}")


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_schema_version_mismatch_raises_and_leaves_the_file_untouched(tmp_path: Path, journal_mode: str) -> None:
    path = tmp_path / "stopgate.db"
    _foreign_database(path, 999, journal_mode)
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError) as caught:
        SQLiteStore(path)
    message = str(caught.value)
    assert str(path) in message
    assert "version 999" in message and f"version {SCHEMA_VERSION}" in message
    assert "move it away" in message
    assert _snapshot(tmp_path) == before


def test_schema_version_is_checked_through_a_wal_left_by_a_crash(tmp_path: Path) -> None:
    """The file header is stale while a WAL holds the newer version; the store must still refuse."""
    path = tmp_path / "stopgate.db"
    with SQLiteStore(path) as store:
        store.save("arith", {"budget": 1})
    # Keep a connection open so the bumped version stays in the WAL, as after a crash.
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
        assert (tmp_path / "stopgate.db-wal").stat().st_size > 0
        with pytest.raises(StoreError, match="version 2 found"):
            SQLiteStore(path)


def test_sqlite_database_of_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    _foreign_database(path, 0, "delete")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a stopgate state store"):
        SQLiteStore(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("content", [b"budget: 120\n", b"x" * 4096, b"SQLite format 3\x00" + b"\xff" * 200])
def test_file_that_is_not_a_database_raises_store_error_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "stopgate.db"
    path.write_bytes(content)
    with pytest.raises(StoreError) as caught:
        SQLiteStore(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == content


def test_directory_in_place_of_the_file_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a file"):
        SQLiteStore(tmp_path)


def test_empty_file_becomes_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "stopgate.db"
    path.touch()
    with SQLiteStore(path) as store:
        store.save("arith", {"budget": 1})
    with SQLiteStore(path) as store:
        assert store.load("arith") == {"budget": 1}


@pytest.mark.parametrize("path", [":memory:", "none"])
def test_open_store_keeps_state_in_memory_for_memory_paths(path: str, tmp_path: Path) -> None:
    with closing(open_store(path)) as store:
        assert isinstance(store, MemoryStore)
    assert list(tmp_path.iterdir()) == []


def test_open_store_opens_sqlite_for_a_file_path(tmp_path: Path) -> None:
    path = tmp_path / "state" / "stopgate.db"
    with closing(open_store(str(path))) as store:
        assert isinstance(store, SQLiteStore)
        store.save("arith", {"budget": 1})
    assert path.is_file()
