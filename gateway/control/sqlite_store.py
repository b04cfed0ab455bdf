"""The ``Store`` in one SQLite file (WAL mode): the embedded default.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. A
commit appends to the WAL with ``write()`` before ``save`` returns, so a
restart or a ``kill -9`` of the gateway loses nothing that was committed; at
most the update in flight is lost. Only an operating system crash or power
loss can roll back the most recent commits (never corrupt the file).
``synchronous="FULL"`` also survives that, at the price of an ``fsync`` per
save on the event loop; controller state is relearned from traffic within
minutes, so ``NORMAL`` is the default.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from gateway.control.store import (
    DEFAULT_MAX_SAMPLES_PER_ROUTE,
    SOURCES,
    SampleRecord,
    StoreBase,
    StoreError,
    decode_state,
    encode_state,
)

SCHEMA_VERSION = 1
DEFAULT_PRUNE_EVERY = 500

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


class SQLiteStore(StoreBase):
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
        super().__init__()
        self.path = Path(path)
        self._max = max_samples_per_route
        self._prune_every = prune_every
        self._since_prune = 0
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

    def _rows(self, what: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Every row of one read; a SQLite error is a StoreError that says what could not be read."""
        with self._lock:
            try:
                return self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot {what}: {exc}") from exc

    def _transaction(self, what: str, write: Callable[[sqlite3.Connection], None]) -> None:
        """Run ``write`` in one immediate transaction, committed before this returns or rolled back."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    write(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot {what}: {exc}") from exc

    def load(self, route: str) -> dict[str, Any] | None:
        rows = self._rows(f"load route {route!r}", "SELECT state FROM states WHERE route = ?", (route,))
        return None if not rows else decode_state(rows[0][0], str(self.path), route)

    def routes(self) -> list[str]:
        return [row[0] for row in self._rows("list routes", "SELECT route FROM states ORDER BY route")]

    def save(self, route: str, state: dict[str, Any], sample: SampleRecord | None = None) -> None:
        text = encode_state(route, state, sample)
        self._transaction(f"save route {route!r}", lambda conn: self._write(conn, route, text, sample))

    def save_reference_set(self, route: str, name: str, body: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM reference_sets WHERE route = ? AND name = ?", (route, name))
            conn.execute(
                "INSERT INTO reference_sets (route, name, body, updated_at) VALUES (?, ?, ?, ?)",
                (route, name, body, time.time()),
            )

        self._transaction(f"save reference set {name!r} of route {route!r}", write)

    def reference_sets(self, route: str) -> list[tuple[str, str]]:
        rows = self._rows(
            f"read reference sets of route {route!r}",
            "SELECT name, body FROM reference_sets WHERE route = ? ORDER BY rowid",
            (route,),
        )
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
        rows = self._rows(
            f"read samples of route {route!r}",
            f"SELECT {_SAMPLE_COLUMNS} FROM samples WHERE route = ? ORDER BY id DESC LIMIT ?",
            (route, limit),
        )
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
        rows = self._rows(
            f"count samples of route {route!r}", "SELECT source, n FROM sample_counts WHERE route = ?", (route,)
        )
        found = dict(rows)
        return {source: int(found.get(source, 0)) for source in sorted(SOURCES)}

    def _release(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
