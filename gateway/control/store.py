"""The controller's persistent state: the ``Store`` interface, its records and its error.

Each store keeps per-route state and the EM samples that produced it:
``MemoryStore`` (gateway/control/memory_store.py) serves tests and ``--state
none``, ``SQLiteStore`` (gateway/control/sqlite_store.py) is the embedded
default, ``RedisStore`` (gateway/control/redis_store.py) is the shared store
for several replicas; ``open_store`` (gateway/control/stores.py) picks one
for a state path.

Each ``save`` writes the route's new state and, optionally, the sample that
produced it in one transaction, so a crash never leaves a state without its
sample or the reverse. State is a JSON-compatible dict; the store keeps it as
JSON text with a per-route ``revision`` (1, 2, 3, ... per save) and
``updated_at``, which help when debugging a live database by hand.

Calls are synchronous and small, so the gateway calls them from the event
loop directly. A lock serialises them, so they may also be moved to
``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

SOURCES = frozenset({"gold", "canary", "shadow"})
DEFAULT_MAX_SAMPLES_PER_ROUTE = 10_000


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


class StoreBase:
    """What every store shares: the lock its calls take, closing once, use as a context manager.

    A subclass frees its connection in ``_release`` and raises ``StoreError`` once ``closed``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.closed = False

    def _release(self) -> None:
        """Free the store's connection; called once, under the lock."""

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def encode_state(route: str, state: dict[str, Any], sample: SampleRecord | None) -> str:
    """Validate before anything is written; a caller's mistake is a ValueError/TypeError, not a StoreError."""
    if sample is not None and sample.route != route:
        raise ValueError(f"sample.route {sample.route!r} does not match route {route!r}")
    return json.dumps(state, allow_nan=False, separators=(",", ":"))


def decode_state(text: str, where: str, route: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreError(f"{where}: state of route {route!r} is not a JSON object")
    return value
