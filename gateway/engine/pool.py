"""Several engine replicas behind one interface: health-aware balancing, a circuit breaker, safe retries.

``UpstreamPool`` has the interface of one ``Upstream`` (``stream``,
``get_json``, ``aclose``), so the generation code does not know how many
engines there are.

* **Balancing.** Each request goes to the replica with the fewest requests in
  flight among those whose breaker lets traffic through.
* **Circuit breaker** (per replica). ``failures`` consecutive failures
  (unreachable, timed out, 5xx, broken stream) open it: requests fail fast
  with 503 instead of waiting on a dead engine. After ``cooldown_s`` the next
  request first probes the replica with a cheap ``GET /v1/models``; if that
  answers, the breaker closes and the request goes ahead, else it stays open
  for another cooldown. A 4xx is the client's problem, not the engine's, and
  a request the gateway itself closes early (an early stop, a client that
  left) is not a failure.
* **Retries.** Only before the first byte, and only when the request cannot
  have reached an engine (the connection failed): then it is tried on the
  next healthy replica, at most ``retries`` times. A timeout or a 5xx is not
  retried, since the engine may have done the work.
* **Total timeout.** Besides the connect and read (between bytes) timeouts of
  each replica, a stream that runs past ``total_timeout_s`` ends with 504.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from gateway.engine.client import ChunkSource, Upstream
from gateway.errors import UpstreamError, UpstreamRejected, UpstreamUnavailable

log = logging.getLogger("stopgate.upstream")


class CircuitOpen(UpstreamUnavailable):
    code = "circuit_open"
    kind = "circuit_open"
    headers = {"retry-after": "5"}  # noqa: RUF012


@dataclass
class Breaker:
    """One replica's circuit breaker: closed, open (fail fast), or due for a recovery probe."""

    failures: int = 5
    cooldown_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    consecutive: int = 0
    opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def due_for_probe(self) -> bool:
        return self.opened_at is not None and self.clock() - self.opened_at >= self.cooldown_s

    def success(self) -> None:
        self.consecutive = 0
        self.opened_at = None

    def failure(self) -> bool:
        """Count a failure; True if this one opened the breaker."""
        self.consecutive += 1
        if self.opened_at is not None:
            self.opened_at = self.clock()  # a failed probe: another cooldown
            return False
        if self.consecutive >= self.failures:
            self.opened_at = self.clock()
            return True
        return False


@dataclass
class Replica:
    upstream: Upstream
    breaker: Breaker
    in_flight: int = 0
    name: str = field(default="")


class UpstreamPool:
    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        failures: int = 5,
        cooldown_s: float = 5.0,
        retries: int = 1,
        total_timeout_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not upstreams:
            raise ValueError("an upstream pool needs at least one upstream")
        self.replicas = [Replica(u, Breaker(failures, cooldown_s, clock), name=u.base_url) for u in upstreams]
        self.retries = retries
        self.total_timeout_s = total_timeout_s
        self.clock = clock

    @property
    def base_url(self) -> str:
        return self.replicas[0].upstream.base_url

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.upstream.aclose()

    async def _pick(self, tried: set[int]) -> Replica:
        """The least-loaded replica whose breaker lets traffic through (probing one that is due)."""
        if len(self.replicas) == 1 and not tried and not self.replicas[0].breaker.is_open:
            tried.add(0)
            return self.replicas[0]  # one engine, healthy: nothing to choose
        candidates = sorted(
            (i for i in range(len(self.replicas)) if i not in tried), key=lambda i: self.replicas[i].in_flight
        )
        for i in candidates:
            replica = self.replicas[i]
            if not replica.breaker.is_open:
                tried.add(i)
                return replica
        for i in candidates:
            replica = self.replicas[i]
            if replica.breaker.due_for_probe():
                tried.add(i)
                if await self._probe(replica):
                    return replica
        raise CircuitOpen(
            "No upstream engine is available: "
            + ("every replica's circuit breaker is open" if not tried else "every replica failed")
            + "; retry shortly."
        )

    async def _probe(self, replica: Replica) -> bool:
        try:
            await replica.upstream.get_json("/v1/models", timeout_s=2.0)
        except UpstreamError:
            replica.breaker.failure()
            log.warning("upstream %s still down; breaker stays open", replica.name)
            return False
        replica.breaker.success()
        log.info("upstream %s answers again; breaker closed", replica.name)
        return True

    def _failed(self, replica: Replica, exc: UpstreamError) -> None:
        if isinstance(exc, UpstreamRejected):
            replica.breaker.success()  # the engine answered: it is healthy, the request was not
            return
        if replica.breaker.failure():
            log.warning("upstream %s failed %d times in a row; breaker open", replica.name, replica.breaker.failures)

    def stream(self, path: str, body: dict[str, Any], *, request_id: str) -> _PoolStream:
        """``Upstream.stream`` on a picked replica: retried on another while no engine has seen it."""
        return _PoolStream(self, path, body, request_id)

    async def post_json(self, path: str, body: dict[str, Any], *, request_id: str) -> Any:
        """A small JSON request on the least-loaded healthy replica, retried as ``stream`` retries."""
        tried: set[int] = set()
        attempts = 0
        while True:
            replica = await self._pick(tried)
            attempts += 1
            replica.in_flight += 1
            try:
                result = await replica.upstream.post_json(path, body, request_id=request_id)
            except UpstreamUnavailable as exc:
                self._failed(replica, exc)
                if attempts > self.retries or len(tried) == len(self.replicas):
                    raise
                log.info("request %s: %s unreachable, retrying on another replica", request_id, replica.name)
                continue
            except UpstreamError as exc:
                self._failed(replica, exc)
                raise
            finally:
                replica.in_flight -= 1
            replica.breaker.success()
            return result

    async def get_json(self, path: str, *, timeout_s: float = 5.0) -> Any:
        """From the first replica that answers (readiness: is any engine there?)."""
        error: UpstreamError | None = None
        for replica in self.replicas:
            try:
                return await replica.upstream.get_json(path, timeout_s=timeout_s)
            except UpstreamError as exc:
                error = exc
        assert error is not None
        raise error


class _PoolStream:
    """``UpstreamPool.stream``'s context. A class rather than an ``asynccontextmanager``: it runs for every
    request, and the decorator's async generator costs more than two calls."""

    __slots__ = ("_pool", "_path", "_body", "_request_id", "_replica", "_inner")

    def __init__(self, pool: UpstreamPool, path: str, body: dict[str, Any], request_id: str) -> None:
        self._pool, self._path, self._body, self._request_id = pool, path, body, request_id
        self._replica: Replica | None = None
        self._inner: AbstractAsyncContextManager[ChunkSource] | None = None

    async def __aenter__(self) -> ChunkSource:
        pool = self._pool
        tried: set[int] = set()
        attempts = 0
        while True:
            replica = await pool._pick(tried)
            attempts += 1
            inner = replica.upstream.stream(
                self._path, self._body, request_id=self._request_id, total_timeout_s=pool.total_timeout_s
            )
            replica.in_flight += 1
            try:
                chunks = await inner.__aenter__()
            except UpstreamUnavailable as exc:
                replica.in_flight -= 1
                pool._failed(replica, exc)
                # Not connected: the engine never saw the request, so another replica may take it.
                if attempts > pool.retries or len(tried) == len(pool.replicas):
                    raise
                log.info("request %s: %s unreachable, retrying on another replica", self._request_id, replica.name)
                continue
            except UpstreamError as exc:
                replica.in_flight -= 1
                pool._failed(replica, exc)
                raise
            except BaseException:
                replica.in_flight -= 1
                raise
            self._replica, self._inner = replica, inner
            return chunks

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        replica, inner = self._replica, self._inner
        assert replica is not None and inner is not None, "entered"
        try:
            await inner.__aexit__(exc_type, exc, tb)
        except UpstreamError as raised:  # the stream's own error, as the replica's client names it
            self._pool._failed(replica, raised)
            raise
        finally:
            replica.in_flight -= 1
        if isinstance(exc, UpstreamError):
            self._pool._failed(replica, exc)
        elif exc is None:
            replica.breaker.success()
