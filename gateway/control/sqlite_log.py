"""The fleet's shared log and lease in the SQLite state file: several workers on one host (issue 17).

``stopgate serve --workers N`` without ``STOPGATE_STATE_URL`` runs N processes
that share one controller per route through ``state_path``, exactly as
replicas do through Redis (gateway/control/fleet.py): every worker appends its
samples to the route's log, the holder of the route's lease folds the log into
the state with the pure ``step`` and commits under its fencing token, and every
worker reads the published state each ``refresh_s``.

The tables live beside the ``SQLiteStore``'s own (gateway/control/sqlite_store.py), in
the same file and schema version; they are created when a worker opens it:

    fleet_routes  route -> last_id (the last log entry folded in), fence (the newest
                  fencing token), lease owner / token / expiry (unix time), refs_version
    fleet_log     the append-only sample log (id, route, record JSON); folded entries
                  move to ``samples`` in the commit that folds them
    fleet_seq     (route, replica) -> last sequence number appended (dedup of a retried batch)
    fleet_share   (route, kind) -> live / canary / shadow tokens of all workers

Every write is one ``BEGIN IMMEDIATE`` transaction, so SQLite's write lock
serialises the workers: an append is all or nothing and skips the sequence
numbers it has seen, and a commit checks the token and the revision it read,
writes the state, ``last_id``, the samples and their counts, or nothing. A
worker killed with SIGKILL loses its buffered samples and its requests in
flight; its lease runs out after the TTL and another worker takes it. Lease
expiry is wall-clock time, which the processes of one host share; should the
clock step, the fencing token still refuses a stale leader's commit.

``SQLiteLog`` is the asynchronous side (it runs each call in a worker thread,
so a busy wait on the write lock never blocks the event loop); ``SQLiteShared``
is the synchronous ``Store`` the plane opens, with the compare-and-set
``update`` admin writes use; ``SQLiteLease`` is a route's lease.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway.control.redis_store import (
    Conflict,
    LogEntry,
    LogRead,
    RouteView,
    StaleLease,
    StateRecord,
    decode_record,
    encode_record,
)
from gateway.control.sqlite_store import SQLiteStore
from gateway.control.store import DEFAULT_MAX_SAMPLES_PER_ROUTE, SOURCES, SampleRecord, StoreError, encode_state

T = TypeVar("T")
PRUNE_EVERY = 500  # samples moved into ``samples`` between two prunes of that table
BUSY_TIMEOUT_S = 5.0

_FLEET_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_routes (
    route TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL DEFAULT 0,
    fence INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    token INTEGER,
    expires REAL NOT NULL DEFAULT 0,
    refs_version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS fleet_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    route TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fleet_log_route_id ON fleet_log (route, id);
CREATE TABLE IF NOT EXISTS fleet_seq (
    route TEXT NOT NULL,
    replica TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (route, replica)
);
CREATE TABLE IF NOT EXISTS fleet_share (
    route TEXT NOT NULL,
    kind TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (route, kind)
);
"""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """``work`` under SQLite's write lock (``BEGIN IMMEDIATE``): committed if it returns, else rolled back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
        return result
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _ensure_routes(conn: sqlite3.Connection, routes: Iterable[str]) -> None:
    conn.executemany("INSERT OR IGNORE INTO fleet_routes (route) VALUES (?)", [(r,) for r in routes])


def _counts(conn: sqlite3.Connection, route: str) -> dict[str, int]:
    found = dict(conn.execute("SELECT source, n FROM sample_counts WHERE route = ?", (route,)).fetchall())
    return {source: int(found.get(source, 0)) for source in sorted(SOURCES)}


def _state_record(conn: sqlite3.Connection, route: str) -> StateRecord:
    row = conn.execute("SELECT state, revision FROM states WHERE route = ?", (route,)).fetchone()
    last = conn.execute("SELECT last_id FROM fleet_routes WHERE route = ?", (route,)).fetchone()
    state = json.loads(row[0]) if row is not None and row[0] else None
    return StateRecord(
        state if isinstance(state, dict) else None,
        int(row[1]) if row is not None else 0,
        str(last[0]) if last is not None and last[0] else "",
        _counts(conn, route),
    )


class SQLiteShared(SQLiteStore):
    """The state file as the workers' shared ``Store``: a ``SQLiteStore`` with the fleet's tables,
    compare-and-set admin writes (``update``), and uploads that tell the other workers to reload."""

    def __init__(self, path: str | Path, *, max_samples_per_route: int = DEFAULT_MAX_SAMPLES_PER_ROUTE) -> None:
        super().__init__(path, max_samples_per_route=max_samples_per_route)
        try:
            self._conn_locked(lambda conn: conn.executescript(_FLEET_SCHEMA))
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"{self.path}: cannot create the workers' tables: {exc}") from exc

    def _conn_locked(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            return work(self._connection())

    def update(self, route: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]) -> dict[str, Any]:
        """An operator's write, applied to the state stored now under the write lock (so a leader's
        commit cannot come in between); the revision it bumps makes a leader's fold of older state fail."""

        def write(conn: sqlite3.Connection) -> dict[str, Any]:
            row = conn.execute("SELECT state FROM states WHERE route = ?", (route,)).fetchone()
            current = json.loads(row[0]) if row is not None and row[0] else None
            state = change(current if isinstance(current, dict) else None)
            conn.execute(
                "INSERT INTO states (route, state, revision, updated_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (route) DO UPDATE SET "
                "state = excluded.state, revision = states.revision + 1, updated_at = excluded.updated_at",
                (route, encode_state(route, state, None), time.time()),
            )
            return state

        try:
            return self._conn_locked(lambda conn: _transaction(conn, write))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot save route {route!r}: {exc}") from exc

    def save_reference_set(self, route: str, name: str, body: str) -> None:
        super().save_reference_set(route, name, body)

        def bump(conn: sqlite3.Connection) -> None:
            _ensure_routes(conn, [route])
            conn.execute("UPDATE fleet_routes SET refs_version = refs_version + 1 WHERE route = ?", (route,))

        try:
            self._conn_locked(lambda conn: _transaction(conn, bump))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot save reference set {name!r} of route {route!r}: {exc}") from exc


class SQLiteLog:
    """The asynchronous side of the shared state file, for the fleet loop (the same calls as ``RedisLog``)."""

    def __init__(self, path: str | Path, *, max_samples_per_route: int = DEFAULT_MAX_SAMPLES_PER_ROUTE) -> None:
        self.path = Path(path)
        self._max = max_samples_per_route
        self._since_prune = 0
        self._lock = threading.Lock()
        try:
            self._conn: sqlite3.Connection | None = _connect(self.path)
            self._conn.executescript(_FLEET_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the workers' log: {exc}") from exc

    async def _run(self, what: str, work: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        def call() -> T:
            with self._lock:
                if self._conn is None:
                    raise StoreError(f"{self.path}: the workers' log is closed")
                try:
                    return _transaction(self._conn, work) if write else work(self._conn)
                except sqlite3.Error as exc:
                    raise StoreError(f"{self.path}: cannot {what}: {exc}") from exc

        return await asyncio.to_thread(call)

    def lease(self, route: str, owner: str, ttl_ms: int) -> SQLiteLease:
        return SQLiteLease(self, route, owner, ttl_ms)

    async def listen(self, wake: asyncio.Event) -> None:
        """No notifications in SQLite: the fleet loop polls every ``refresh_s``."""

    async def append(self, route: str, replica: str, batch: Sequence[tuple[int, SampleRecord, bool]]) -> int:
        """Append ``(seq, record, controlled)`` in order; entries this replica appended before are skipped."""

        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT seq FROM fleet_seq WHERE route = ? AND replica = ?", (route, replica)).fetchone()
            last = int(row[0]) if row is not None else 0
            rows = [(route, encode_record(record, controlled)) for seq, record, controlled in batch if seq > last]
            conn.executemany("INSERT INTO fleet_log (route, record) VALUES (?, ?)", rows)
            last = max([last, *(seq for seq, _, _ in batch)])
            conn.execute(
                "INSERT INTO fleet_seq (route, replica, seq) VALUES (?, ?, ?) "
                "ON CONFLICT (route, replica) DO UPDATE SET seq = excluded.seq",
                (route, replica, last),
            )
            return len(rows)

        return await self._run(f"append to the log of {route!r}", work)

    async def read_state(self, route: str) -> StateRecord:
        return await self._run(f"read route {route!r}", lambda conn: _state_record(conn, route), write=False)

    async def entries_after(self, route: str, last_id: str, count: int) -> list[LogEntry]:
        return (await self.read_after(route, last_id, count)).entries

    async def read_after(self, route: str, last_id: str, count: int) -> LogRead:
        """Up to ``count`` log entries after ``last_id``; one that cannot be decoded is skipped and counted."""

        def work(conn: sqlite3.Connection) -> list[tuple[int, str]]:
            return conn.execute(
                "SELECT id, record FROM fleet_log WHERE route = ? AND id > ? ORDER BY id LIMIT ?",
                (route, int(last_id or 0), count),
            ).fetchall()

        rows = await self._run(f"read the log of {route!r}", work, write=False)
        entries: list[LogEntry] = []
        for entry_id, text in rows:
            try:
                entries.append(LogEntry(str(entry_id), *decode_record(text)))
            except ValueError:
                continue
        return LogRead(entries, str(rows[-1][0]) if rows else "", len(rows), len(rows) - len(entries))

    async def commit(
        self, route: str, token: int, revision: int, state: dict[str, Any], last_id: str, counts: dict[str, int]
    ) -> int:
        """Write the folded state, ``last_id`` and the folded samples if ``token`` is the newest and the
        state's revision is still ``revision``; else raise ``StaleLease`` or ``Conflict`` and write nothing."""
        text = json.dumps(state, allow_nan=False, separators=(",", ":"))

        def work(conn: sqlite3.Connection) -> int:
            _ensure_routes(conn, [route])
            fence, before = conn.execute("SELECT fence, last_id FROM fleet_routes WHERE route = ?", (route,)).fetchone()
            if fence != token:
                raise StaleLease(route)
            row = conn.execute("SELECT revision FROM states WHERE route = ?", (route,)).fetchone()
            current = int(row[0]) if row is not None else 0
            if current != revision:
                raise Conflict(route)
            conn.execute(
                "INSERT INTO states (route, state, revision, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (route) DO UPDATE SET "
                "state = excluded.state, revision = excluded.revision, updated_at = excluded.updated_at",
                (route, text, current + 1, time.time()),
            )
            if last_id:
                self._move_folded(conn, route, int(before), int(last_id))
            for source in sorted(SOURCES):
                if counts.get(source, 0) > 0:
                    conn.execute(
                        "INSERT INTO sample_counts (route, source, n) VALUES (?, ?, ?) "
                        "ON CONFLICT (route, source) DO UPDATE SET n = n + excluded.n",
                        (route, source, counts[source]),
                    )
            return current + 1

        return await self._run(f"commit route {route!r}", work)

    def _move_folded(self, conn: sqlite3.Connection, route: str, before: int, last_id: int) -> None:
        """Folded log entries become the route's retained samples (what the admin API lists); the log keeps
        only what no commit has folded yet."""
        rows = conn.execute(
            "SELECT record FROM fleet_log WHERE route = ? AND id > ? AND id <= ? ORDER BY id", (route, before, last_id)
        ).fetchall()
        samples = []
        for (text,) in rows:
            try:
                r, _ = decode_record(text)
            except ValueError:
                continue
            samples.append((r.route, r.source, r.budget, r.level, int(r.correct), r.tokens, r.at, r.reference_id))
        conn.executemany(
            "INSERT INTO samples (route, source, budget, level, correct, tokens, at, reference_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            samples,
        )
        conn.execute("DELETE FROM fleet_log WHERE route = ? AND id <= ?", (route, last_id))
        conn.execute("UPDATE fleet_routes SET last_id = ? WHERE route = ?", (last_id, route))
        self._since_prune += len(samples)
        if self._since_prune >= PRUNE_EVERY:
            self._since_prune = 0
            conn.execute(
                "DELETE FROM samples WHERE route = ? AND id <= "
                "(SELECT id FROM samples WHERE route = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (route, route, self._max),
            )

    async def add_tokens(self, deltas: dict[str, dict[str, int]]) -> None:
        """Add to the shared evaluation-share counters, ``{route: {kind: n}}``, all or nothing."""

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO fleet_share (route, kind, n) VALUES (?, ?, ?) "
                "ON CONFLICT (route, kind) DO UPDATE SET n = n + excluded.n",
                [(route, kind, n) for route, kinds in deltas.items() for kind, n in kinds.items() if n],
            )

        await self._run("add tokens", work)

    async def views(self, routes: Iterable[str]) -> dict[str, RouteView]:
        """Every route's published state, counters and leader, in one read transaction."""
        names = list(routes)

        def work(conn: sqlite3.Connection) -> dict[str, RouteView]:
            conn.execute("BEGIN")  # one snapshot for all routes
            try:
                now = time.time()
                out: dict[str, RouteView] = {}
                for route in names:
                    share = dict(conn.execute("SELECT kind, n FROM fleet_share WHERE route = ?", (route,)).fetchall())
                    row = conn.execute(
                        "SELECT refs_version, owner, expires FROM fleet_routes WHERE route = ?", (route,)
                    ).fetchone()
                    version, owner, expires = row if row is not None else (0, None, 0.0)
                    leader = owner if owner is not None and expires > now else None
                    out[route] = RouteView(_state_record(conn, route), share, int(version), leader)
                return out
            finally:
                conn.execute("COMMIT")

        return await self._run("read the routes", work, write=False)

    async def reference_sets(self, route: str) -> list[tuple[str, str]]:
        def work(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT name, body FROM reference_sets WHERE route = ? ORDER BY rowid", (route,)
            ).fetchall()
            return [(str(name), str(body)) for name, body in rows]

        return await self._run(f"read the reference sets of {route!r}", work, write=False)

    async def aclose(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class SQLiteLease:
    """A route's lease in the state file with a fencing token (the same contract as
    gateway/control/lease.py's Redis ``Lease``): ``hold`` takes it when free or run out, or renews it."""

    def __init__(self, log: SQLiteLog, route: str, owner: str, ttl_ms: int) -> None:
        if ttl_ms < 1:
            raise ValueError(f"ttl_ms: must be >= 1, got {ttl_ms}")
        self.log, self.route, self.owner, self.ttl_ms = log, route, owner, ttl_ms
        self.token: int | None = None
        self.held_until = 0.0  # time.monotonic() by which the lease runs out unless renewed

    async def hold(self) -> int | None:
        """Take or renew the lease; the fencing token while held, else None."""
        mine, route, owner, ttl_s = self.token, self.route, self.owner, self.ttl_ms / 1000
        asked = time.monotonic()

        def work(conn: sqlite3.Connection) -> int | None:
            _ensure_routes(conn, [route])
            now = time.time()
            held_by, token, expires, fence = conn.execute(
                "SELECT owner, token, expires, fence FROM fleet_routes WHERE route = ?", (route,)
            ).fetchone()
            if mine is not None and held_by == owner and token == mine and expires > now:
                conn.execute("UPDATE fleet_routes SET expires = ? WHERE route = ?", (now + ttl_s, route))
                return mine
            if held_by is not None and expires > now:
                return None
            conn.execute(
                "UPDATE fleet_routes SET fence = ?, owner = ?, token = ?, expires = ? WHERE route = ?",
                (fence + 1, owner, fence + 1, now + ttl_s, route),
            )
            return int(fence + 1)

        self.token = await self.log._run(f"hold the lease of {route!r}", work)
        if self.token is not None:
            self.held_until = asked + ttl_s
        return self.token

    def held(self) -> bool:
        return self.token is not None and time.monotonic() < self.held_until

    def lost(self) -> None:
        self.token = None

    async def release(self) -> None:
        """Hand the lease back at once (a graceful shutdown), so the next holder need not wait ``ttl_ms``."""
        if self.token is None:
            return
        token, self.token = self.token, None
        route, owner = self.route, self.owner

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE fleet_routes SET owner = NULL, token = NULL, expires = 0 "
                "WHERE route = ? AND owner = ? AND token = ?",
                (route, owner, token),
            )

        await self.log._run(f"release the lease of {route!r}", work)
