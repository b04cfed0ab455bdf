"""Which ``Store`` a state path names (the interface is gateway/control/store.py)."""

from __future__ import annotations

from pathlib import Path

from gateway.control.memory_store import MemoryStore
from gateway.control.sqlite_store import SQLiteStore
from gateway.control.store import DEFAULT_MAX_SAMPLES_PER_ROUTE, Store, StoreError

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
