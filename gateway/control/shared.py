"""What the control plane needs from the fleet when several replicas share one controller (issue 18).

``ControlPlane.fleet`` is a ``Shared`` (gateway/control/fleet.py's ``Fleet``)
when ``STOPGATE_STATE_URL`` names a Redis, and None for one process on its own
store. The protocol lives here so that the plane does not import the fleet,
which imports the plane.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gateway.control.store import SampleRecord, StoreError
from gateway.errors import StateUnavailable

if TYPE_CHECKING:
    from gateway.control.redis_store import LogEntry, LogRead, RouteView, StateRecord


class Shared(Protocol):
    """Where a replica's samples and tokens go when replicas share one controller per route."""

    def submit(self, record: SampleRecord, controlled: bool) -> None:
        """Queue an EM sample for the route's shared log (never blocks, never raises for Redis)."""
        ...

    def add_tokens(self, route: str, kind: str, tokens: int) -> None:
        """Count live (``live``) or evaluation (``canary``, ``shadow``) tokens toward the fleet's share."""
        ...

    def leads(self, route: str) -> bool:
        """Whether this replica steps the route's controller (and so schedules its canaries)."""
        ...

    def describe(self, route: str) -> dict[str, Any]:
        """The ``fleet`` block of the admin API's route snapshot."""
        ...


@runtime_checkable
class Versioned(Protocol):
    """A store that writes compare-and-set (gateway/control/redis_store.py's ``RedisStore.update``)."""

    def update(self, route: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]) -> dict[str, Any]:
        """Apply ``change`` to the state stored now and write it unless another write came in between."""
        ...


@contextmanager
def unavailable_if_shared(fleet: Shared | None) -> Iterator[None]:
    """An admin write while the replicas' shared Redis is down is a 503 (retry), not a server error."""
    try:
        yield
    except StoreError as exc:
        if fleet is None:
            raise
        raise StateUnavailable(f"The shared state store is unreachable; nothing was changed. ({exc})") from exc


class RouteLease(Protocol):
    """One replica's view of one route's lease with a fencing token (gateway/control/lease.py: Redis;
    gateway/control/sqlite_log.py: the workers' state file)."""

    token: int | None

    async def hold(self) -> int | None:
        """Take or renew the lease; the fencing token while held, else None."""
        ...

    def held(self) -> bool:
        """Whether this replica holds the lease now (renewed within its time to live)."""
        ...

    def lost(self) -> None:
        """Stop acting as the holder."""
        ...

    async def release(self) -> None:
        """Hand the lease back at once."""
        ...


# (route, owner, ttl_ms) -> that route's lease for that owner
LeaseFactory = Callable[[str, str, int], RouteLease]


class SampleLog(Protocol):
    """The shared side the fleet loop uses (gateway/control/fleet.py): ``RedisLog`` for replicas,
    ``SQLiteLog`` for the workers of one host. Raises ``RedisError``/``OSError``/``StoreError`` when
    the store cannot be reached, ``StaleLease``/``Conflict`` when a commit is refused."""

    def lease(self, route: str, owner: str, ttl_ms: int) -> RouteLease:
        """The route's lease for ``owner``, kept in this store."""
        ...

    async def listen(self, wake: asyncio.Event) -> None:
        """Set ``wake`` when another replica publishes a state (may return at once: the loop polls)."""
        ...

    async def append(self, route: str, replica: str, batch: Sequence[tuple[int, SampleRecord, bool]]) -> int:
        """Append ``(seq, record, controlled)`` in order, skipping what ``replica`` appended before."""
        ...

    async def read_state(self, route: str) -> StateRecord: ...

    async def read_after(self, route: str, last_id: str, count: int) -> LogRead: ...

    async def entries_after(self, route: str, last_id: str, count: int) -> list[LogEntry]: ...

    async def commit(
        self, route: str, token: int, revision: int, state: dict[str, Any], last_id: str, counts: dict[str, int]
    ) -> int: ...

    async def add_tokens(self, deltas: dict[str, dict[str, int]]) -> None: ...

    async def views(self, routes: Iterable[str]) -> dict[str, RouteView]: ...

    async def reference_sets(self, route: str) -> list[tuple[str, str]]: ...

    async def aclose(self) -> None: ...
