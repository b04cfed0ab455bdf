"""The ``Store`` in process memory: tests and ``--state none`` (nothing persists)."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

from gateway.control.store import (
    DEFAULT_MAX_SAMPLES_PER_ROUTE,
    SOURCES,
    SampleRecord,
    StoreBase,
    StoreError,
    decode_state,
    encode_state,
)


class MemoryStore(StoreBase):
    """A ``Store`` in process memory, with the same behaviour as ``SQLiteStore`` but nothing persists."""

    def __init__(self, *, max_samples_per_route: int = DEFAULT_MAX_SAMPLES_PER_ROUTE) -> None:
        if max_samples_per_route < 1:
            raise ValueError(f"max_samples_per_route: must be >= 1, got {max_samples_per_route}")
        super().__init__()
        self._max = max_samples_per_route
        # JSON text, not the dict: callers cannot mutate stored state, and non-JSON values fail as in SQLite.
        self._states: dict[str, tuple[str, int, float]] = {}
        self._samples: dict[str, deque[SampleRecord]] = {}
        self._counts: dict[str, Counter[str]] = {}
        self._references: dict[str, dict[str, str]] = {}

    def _check_open(self) -> None:
        if self.closed:
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
        return None if row is None else decode_state(row[0], "memory store", route)

    def routes(self) -> list[str]:
        with self._lock:
            self._check_open()
            return sorted(self._states)

    def save(self, route: str, state: dict[str, Any], sample: SampleRecord | None = None) -> None:
        text = encode_state(route, state, sample)
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
