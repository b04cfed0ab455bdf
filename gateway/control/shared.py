"""What the control plane needs from the fleet when several replicas share one controller (issue 18).

``ControlPlane.fleet`` is a ``Shared`` (gateway/control/fleet.py's ``Fleet``)
when ``STOPGATE_STATE_URL`` names a Redis, and None for one process on its own
store. The protocol lives here so that the plane does not import the fleet,
which imports the plane.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from gateway.control.store import SampleRecord, StoreError
from gateway.errors import StateUnavailable


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
