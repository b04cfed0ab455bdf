"""The controller's persistent state: per-route state and the EM samples that produced it.

``Store`` is the interface; ``SQLiteStore`` is the embedded default and
``MemoryStore`` serves tests and ``--state none``. ``RedisStore``
(gateway/control/redis_store.py) is the shared store for several replicas.

Each ``save`` writes the route's new state and, optionally, the sample that
produced it in one transaction, so a crash never leaves a state without its
sample or the reverse. State is a JSON-compatible dict; the store keeps it as
JSON text with a per-route ``revision`` (1, 2, 3, ... per save) and
``updated_at``, which help when debugging a live database by hand.

Durability (``SQLiteStore``): the database runs in WAL mode with
``synchronous=NORMAL``. A commit appends to the WAL with ``write()`` before
``save`` returns, so a restart or a ``kill -9`` of the gateway loses nothing
that was committed; at most the update in flight is lost. Only an operating
system crash or power loss can roll back the most recent commits (never
corrupt the file). ``synchronous="FULL"`` also survives that, at the price of
an ``fsync`` per save on the event loop; controller state is relearned from
traffic within minutes, so ``NORMAL`` is the default.

Calls are synchronous and small (one short transaction, no fsync per commit
under ``NORMAL``), so the gateway calls them from the event loop directly. A
lock serialises them, so they may also be moved to ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self

SCHEMA_VERSION = 1
SOURCES = frozenset({"gold", "canary", "shadow"})
DEFAULT_MAX_SAMPLES_PER_ROUTE = 10_000
DEFAULT_PRUNE_EVERY = 500


class StoreError(Exception):
    """The state store cannot be opened or used; the message names the file and the problem."""


@dataclass(frozen=True)
class SampleRecord:
    """One EM observation, as the controller consumed it."""

    route: str
    source: str  # "gold" | "canary" | "shadow"
    budget: int
    level: int  # strictness level in force
    correct: bool
    tokens: int  # evaluation tokens the sample cost (0 for gold)
    at: float  # unix time
    reference_id: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {sorted(SOURCES)}, got {self.source!r}")


class Store(Protocol):
    """Per-route controller state and its samples. Implementations are thread-safe."""

    def load(self, route: str) -> dict[str, Any] | None:
        """The route's last saved state, or None if it has none."""
        ...

    def routes(self) -> list[str]:
        """Routes with a saved state, sorted."""
        ...

    def save(self, route: str, state: dict[str, Any], sample: SampleRecord | None = None) -> None:
        """Store ``state`` as the route's state and ``sample`` beside it, atomically."""
        ...

    def samples(self, route: str, limit: int = 100) -> list[SampleRecord]:
        """The route's newest ``limit`` retained samples, oldest first."""
        ...

    def counts(self, route: str) -> dict[str, int]:
        """Samples ever saved for the route, by source (pruning does not lower them)."""
        ...

    def save_reference_set(self, route: str, name: str, body: str) -> None:
        """Store an uploaded reference set (JSONL text), replacing one of the same name; durable on return."""
        ...

    def reference_sets(self, route: str) -> list[tuple[str, str]]:
        """The route's uploaded reference sets as ``(name, body)``, in upload order."""
        ...

    def close(self) -> None:
        """Release the store; further calls raise ``StoreError``. Closing twice is harmless."""
        ...


def _encode(route: str, state: dict[str, Any], sample: SampleRecord | None) -> str:
    """Validate before anything is written; a caller's mistake is a ValueError/TypeError, not a StoreError."""
    if sample is not None and sample.route != route:
        raise ValueError(f"sample.route {sample.route!r} does not match route {route!r}")
    return json.dumps(state, allow_nan=False, separators=(",", ":"))


class MemoryStore:
    """A ``Store`` in process memory, with the same behaviour as ``SQLiteStore`` but nothing persists."""

    def __init__(self, *, max_samples_per_route: int = DEFAULT_MAX_SAMPLES_PER_ROUTE) -> None:
        if max_samples_per_route < 1:
            raise ValueError(f"max_samples_per_route: must be >= 1, got {max_samples_per_route}")
        self._max = max_samples_per_route
        self._lock = threading.Lock()
        self._closed = False
        # JSON text, not the dict: callers cannot mutate stored state, and non-JSON values fail as in SQLite.
        self._states: dict[str, tuple[str, int, float]] = {}
        self._samples: dict[str, deque[SampleRecord]] = {}
        self._counts: dict[str, Counter[str]] = {}
        self._references: dict[str, dict[str, str]] = {}

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("memory store: closed")

    def save_reference_set(self, route: str, name: str, body: str) -> None:
        with self._lock:
            self._check_open()
            sets = self._references.setdefault(route, {})
            sets.pop(name, None)
            sets[name] = body

    def reference_sets(self, route: str) -> list[tuple[str, str]]:
        with self._lock:
            self._check_open()
            return list(self._references.get(route, {}).items())

    def load(self, route: str) -> dict[str, Any] | None:
        with self._lock:
            self._check_open()
            row = self._states.get(route)
        return None if row is None else _decode_state(row[0], "memory store", route)

    def routes(self) -> list[str]:
        with self._lock:
            self._check_open()
            return sorted(self._states)

    def save(self, route: str, state: dict[str, Any], sample: SampleRecord | None = None) -> None:
        text = _encode(route, state, sample)
        with self._lock:
            self._check_open()
            revision = self._states[route][1] + 1 if route in self._states else 1
            self._states[route] = (text, revision, time.time())
            if sample is not None:
                self._samples.setdefault(route, deque(maxlen=self._max)).append(sample)
                self._counts.setdefault(route, Counter())[sample.source] += 1

    def samples(self, route: str, limit: int = 100) -> list[SampleRecord]:
        with self._lock:
            self._check_open()
            kept = list(self._samples.get(route, ()))
        return kept[-limit:] if limit > 0 else []

    def counts(self, route: str) -> dict[str, int]:
        with self._lock:
            self._check_open()
            counts = self._counts.get(route, Counter())
            return {source: counts[source] for source in sorted(SOURCES)}

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _decode_state(text: str, where: str, route: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreError(f"{where}: state of route {route!r} is not a JSON object")
    return value


_SCHEMA = """
CREATE TABLE states (
    route TEXT PRIMARY KEY,
    state TEXT NOT NULL,        -- JSON object
    revision INTEGER NOT NULL,  -- 1, 2, 3, ... per save of this route
    updated_at REAL NOT NULL    -- unix time
);
CREATE TABLE samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    route TEXT NOT NULL,
    source TEXT NOT NULL,
    budget INTEGER NOT NULL,
    level INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    at REAL NOT NULL,
    reference_id TEXT
);
CREATE INDEX samples_route_id ON samples (route, id);
CREATE TABLE reference_sets (  -- uploaded through the admin API (the routes file's own sets are not copied here)
    route TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,         -- the JSONL as uploaded (validated before it was stored)
    updated_at REAL NOT NULL,
    PRIMARY KEY (route, name)
);
CREATE TABLE sample_counts (
    route TEXT NOT NULL,
    source TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (route, source)
);
"""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_SAMPLE_COLUMNS = "route, source, budget, level, correct, tokens, at, reference_id"


class SQLiteStore:
    """A ``Store`` in one SQLite file (WAL mode): the embedded default.

    Opening checks the schema version (``PRAGMA user_version``) read-only
    first, so a file written by another stopgate version, or not a SQLite
    database at all, raises ``StoreError`` and is left exactly as it was.

    Samples are bounded: every ``prune_every`` inserts the store deletes all but
    each route's newest ``max_samples_per_route``; ``samples()`` never returns
    more than that, so pruning is invisible to readers.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_samples_per_route: int = DEFAULT_MAX_SAMPLES_PER_ROUTE,
        prune_every: int = DEFAULT_PRUNE_EVERY,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout_s: float = 5.0,
    ) -> None:
        if max_samples_per_route < 1 or prune_every < 1:
            raise ValueError("max_samples_per_route and prune_every must be >= 1")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous: must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self.path = Path(path)
        self._max = max_samples_per_route
        self._prune_every = prune_every
        self._since_prune = 0
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create its directory: {exc}") from exc
        self._check_existing()
        try:
            conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode (journal_mode is {mode!r})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            self._initialise(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"{self.path}: cannot open: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    def _check_existing(self) -> None:
        """Check the schema version without writing: a foreign or newer file must stay untouched.

        The version is read from the file header (``user_version`` at byte 60),
        so SQLite does not even create ``-wal``/``-shm`` files beside a file it
        refuses. SQLite is asked (read-only) only when the header may be stale
        (a WAL left by a crash) or says 0 (a new store, or someone else's file).
        """
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise StoreError(f"{self.path}: not a file")
        try:
            with self.path.open("rb") as file:
                header = file.read(100)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read: {exc}") from exc
        if not header:
            return  # an empty file is an empty database
        # The magic string, then the fixed payload fractions (64, 32, 32) every SQLite 3 file has.
        if len(header) < 100 or not header.startswith(_SQLITE_MAGIC) or header[21:24] != b"\x40\x20\x20":
            raise StoreError(f"{self.path}: not a stopgate state store (not a SQLite database)")
        version = int.from_bytes(header[60:64], "big", signed=True)
        wal = self.path.with_name(self.path.name + "-wal")
        if version != 0 and not (wal.exists() and wal.stat().st_size > 0):
            self._check_version(version, tables=1)
            return
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            probe = sqlite3.connect(uri, uri=True)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open: {exc}") from exc
        try:
            version = probe.execute("PRAGMA user_version").fetchone()[0]
            tables = probe.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read: {exc}") from exc
        finally:
            probe.close()
        self._check_version(version, tables)

    def _check_version(self, version: int, tables: int) -> None:
        if version == SCHEMA_VERSION or (version == 0 and tables == 0):
            return
        if version == 0:
            raise StoreError(
                f"{self.path}: not a stopgate state store (a SQLite database without a schema version); "
                "pass a different state path"
            )
        raise StoreError(
            f"{self.path}: state schema version {version} found, this stopgate reads version {SCHEMA_VERSION}; "
            "the file was left unchanged: move it away or pass a different state path (the controller relearns)"
        )

    def _initialise(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a fresh file; re-check the version under the write lock (another process may race)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            self._check_version(version, tables)
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: store is closed")
        return self._conn

    def load(self, route: str) -> dict[str, Any] | None:
        with self._lock:
            try:
                row = self._connection().execute("SELECT state FROM states WHERE route = ?", (route,)).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot load route {route!r}: {exc}") from exc
        return None if row is None else _decode_state(row[0], str(self.path), route)

    def routes(self) -> list[str]:
        with self._lock:
            try:
                rows = self._connection().execute("SELECT route FROM states ORDER BY route").fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot list routes: {exc}") from exc
        return [row[0] for row in rows]

    def save(self, route: str, state: dict[str, Any], sample: SampleRecord | None = None) -> None:
        text = _encode(route, state, sample)
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._write(conn, route, text, sample)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot save route {route!r}: {exc}") from exc

    def save_reference_set(self, route: str, name: str, body: str) -> None:
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")  # one transaction, committed before we return
                try:
                    conn.execute("DELETE FROM reference_sets WHERE route = ? AND name = ?", (route, name))
                    conn.execute(
                        "INSERT INTO reference_sets (route, name, body, updated_at) VALUES (?, ?, ?, ?)",
                        (route, name, body, time.time()),
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot save reference set {name!r} of route {route!r}: {exc}") from exc

    def reference_sets(self, route: str) -> list[tuple[str, str]]:
        with self._lock:
            try:
                rows = (
                    self._connection()
                    .execute("SELECT name, body FROM reference_sets WHERE route = ? ORDER BY rowid", (route,))
                    .fetchall()
                )
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot read reference sets of route {route!r}: {exc}") from exc
        return [(row[0], row[1]) for row in rows]

    def _write(self, conn: sqlite3.Connection, route: str, text: str, sample: SampleRecord | None) -> None:
        conn.execute(
            "INSERT INTO states (route, state, revision, updated_at) VALUES (?, ?, 1, ?) "
            "ON CONFLICT (route) DO UPDATE SET "
            "state = excluded.state, revision = states.revision + 1, updated_at = excluded.updated_at",
            (route, text, time.time()),
        )
        if sample is None:
            return
        conn.execute(
            f"INSERT INTO samples ({_SAMPLE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sample.route,
                sample.source,
                sample.budget,
                sample.level,
                int(sample.correct),
                sample.tokens,
                sample.at,
                sample.reference_id,
            ),
        )
        conn.execute(
            "INSERT INTO sample_counts (route, source, n) VALUES (?, ?, 1) "
            "ON CONFLICT (route, source) DO UPDATE SET n = n + 1",
            (route, sample.source),
        )
        self._since_prune += 1
        if self._since_prune >= self._prune_every:
            self._prune(conn)
            self._since_prune = 0

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Delete all but each route's newest ``max_samples_per_route`` samples (uses the (route, id) index)."""
        for (route,) in conn.execute("SELECT DISTINCT route FROM samples").fetchall():
            conn.execute(
                "DELETE FROM samples WHERE route = ? AND id <= "
                "(SELECT id FROM samples WHERE route = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (route, route, self._max),
            )

    def samples(self, route: str, limit: int = 100) -> list[SampleRecord]:
        limit = min(limit, self._max)
        if limit <= 0:
            return []
        with self._lock:
            try:
                rows = (
                    self._connection()
                    .execute(
                        f"SELECT {_SAMPLE_COLUMNS} FROM samples WHERE route = ? ORDER BY id DESC LIMIT ?",
                        (route, limit),
                    )
                    .fetchall()
                )
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot read samples of route {route!r}: {exc}") from exc
        return [
            SampleRecord(
                route=r[0],
                source=r[1],
                budget=r[2],
                level=r[3],
                correct=bool(r[4]),
                tokens=r[5],
                at=r[6],
                reference_id=r[7],
            )
            for r in reversed(rows)
        ]

    def counts(self, route: str) -> dict[str, int]:
        with self._lock:
            try:
                rows = (
                    self._connection()
                    .execute("SELECT source, n FROM sample_counts WHERE route = ?", (route,))
                    .fetchall()
                )
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot count samples of route {route!r}: {exc}") from exc
        found = dict(rows)
        return {source: int(found.get(source, 0)) for source in sorted(SOURCES)}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


MEMORY_PATHS = frozenset({":memory:", "none"})


def open_store(path: str | Path, *, max_samples_per_route: int = DEFAULT_MAX_SAMPLES_PER_ROUTE) -> Store:
    """The store a state path names: ``":memory:"`` or ``"none"`` keep state in this process only
    (``MemoryStore``); any other path is a SQLite file, created if missing (``SQLiteStore``).

    A Redis URL is refused: a shared store needs the fleet loop beside it, which ``STOPGATE_STATE_URL``
    starts (gateway/control/fleet.py); without it each replica would step its own controller on it."""
    if isinstance(path, str) and path.startswith(("redis://", "rediss://", "unix://")):
        scheme = path.split("://", 1)[0]
        raise StoreError(
            f"STOPGATE_STATE_PATH: a {scheme}:// URL is not a state file; "
            "set STOPGATE_STATE_URL for a Redis shared by replicas"
        )
    if isinstance(path, str) and path in MEMORY_PATHS:
        return MemoryStore(max_samples_per_route=max_samples_per_route)
    return SQLiteStore(path, max_samples_per_route=max_samples_per_route)
