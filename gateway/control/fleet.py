"""Several gateway replicas, one controller per route: the fleet loop over the shared Redis store (issue 18).

The same loop serves the workers of one ``stopgate serve --workers N`` (issue 17) over the SQLite state
file instead of Redis (gateway/control/sqlite_log.py): the log and the lease are a ``SampleLog`` and its
``RouteLease`` (gateway/control/shared.py), whichever store holds them.

Each replica runs one ``Fleet`` task beside its request handlers. Nothing on
the request path waits for Redis: a live request reads the budget cached in
its replica, and hands its EM sample to an in-memory buffer. The loop, every
``refresh_s`` (and at once on a pub/sub message that a route's state changed):

1. **appends** the buffered samples to each route's log, in order, oldest first
   (a batch that fails stays buffered; one retried after a lost reply is not
   appended twice, gateway/control/redis_store.py);
2. **adds** this replica's live and evaluation tokens to the route's shared
   counters, so the evaluation share holds for the fleet;
3. **leads** the routes whose lease it holds or can take (gateway/control/lease.py):
   reads the published state and the log entries after its ``last_id``, folds
   them in with the pure ``step`` and commits state and the new ``last_id`` in
   one script under its fencing token;
4. **refreshes** every route's published state, sample counts and counters,
   so any replica's admin API reports the fleet.

While Redis cannot be reached the replica serves with the last budget it read,
keeps samples in a bounded buffer (``stopgate_fleet_buffered_samples``; beyond
``buffer_max`` new samples are dropped and counted in
``stopgate_fleet_dropped_samples_total``), acts as leader of nothing (so runs
no canaries), and drains the buffer in order once Redis is back; a leader
whose lease has not run out by then goes on leading.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from collections import Counter, deque
from typing import Any

from redis.exceptions import RedisError

from gateway.control.controller import Sample, initial_state, state_from_dict, state_to_dict, step
from gateway.control.plane import ControlPlane, RouteControl, controller_config
from gateway.control.redis_store import Conflict, LogEntry, RedisLog, RouteView, StaleLease, StateRecord
from gateway.control.shared import LeaseFactory, RouteLease, SampleLog
from gateway.control.store import SampleRecord, StoreError
from gateway.metrics import Metrics
from gateway.settings import ConfigError, Settings

log = logging.getLogger("stopgate.fleet")

BATCH = 500  # log entries folded per commit
MAX_BATCHES = 20  # per route per round, so one backlog does not starve the other routes
TOKEN_KINDS = ("live", "canary", "shadow")
ERROR_LOG_INTERVAL_S = 60.0  # an unexpected error that repeats every round is logged once a minute
# The shared store cannot be reached (Redis) or used just now (the SQLite state file of several workers).
UNREACHABLE = (RedisError, OSError, StoreError)


def replica_id() -> str:
    """Unique per process: host name (the pod name under Kubernetes), pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Fleet:
    """This replica's part in the fleet; the control plane calls ``submit``, ``add_tokens``, ``leads``."""

    def __init__(
        self,
        plane: ControlPlane,
        store: SampleLog,
        metrics: Metrics,
        *,
        lease: LeaseFactory | None = None,
        replica: str | None = None,
        lease_ms: int = 3000,
        buffer_max: int = 10_000,
        refresh_s: float = 0.25,
    ) -> None:
        self.plane, self.store, self.metrics = plane, store, metrics
        self.replica = replica or replica_id()
        self.buffer_max, self.refresh_s, self.lease_ms = buffer_max, refresh_s, lease_ms
        lease = lease or store.lease  # a test may put another lease beside the log
        self.leases: dict[str, RouteLease] = {r: lease(r, self.replica, lease_ms) for r in plane.routes}
        self.buffer: dict[str, deque[tuple[int, SampleRecord, bool]]] = {r: deque() for r in plane.routes}
        self.buffered = 0
        self.seq = 0
        self.pending: dict[str, Counter[str]] = {r: Counter() for r in plane.routes}
        self.views: dict[str, RouteView] = {}
        self.refs_versions: dict[str, int] = {}
        self.up: bool | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error_logged_at = -ERROR_LOG_INTERVAL_S

    # -- called by the control plane on the request path (no I/O) -------------

    def submit(self, record: SampleRecord, controlled: bool) -> None:
        """Queue one EM sample for the route's log; counted as dropped when the buffer is full."""
        if self.buffered >= self.buffer_max:
            self.metrics.fleet_dropped.labels(record.route).inc()
            return
        self.seq += 1
        self.buffer[record.route].append((self.seq, record, controlled))
        self.buffered += 1
        self.metrics.fleet_buffered.set(self.buffered)

    def add_tokens(self, route: str, kind: str, tokens: int) -> None:
        """Live (``live``) or evaluation (``canary``, ``shadow``) tokens for the shared counters."""
        self.pending[route][kind] += tokens

    def leads(self, route: str) -> bool:
        """Whether this replica reaches Redis and holds the route's lease, renewed within its time to live
        (only the leader schedules canaries: a replica whose loop stalled or failed is no longer one)."""
        return self.up is True and self.leases[route].held()

    def describe(self, route: str) -> dict[str, Any]:
        view = self.views.get(route)
        return {
            "replica": self.replica,
            "redis": "up" if self.up else "down",
            "leader": view.leader if view is not None else None,
            "leading": self.leads(route),
            "revision": view.state.revision if view is not None else None,
            "last_applied": view.state.last_id if view is not None else None,
            "buffered": len(self.buffer[route]),
        }

    # -- the loop ---------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        listener = asyncio.ensure_future(self._listen())
        try:
            while True:
                try:
                    # A round that outlasts the lease would commit under a lease already run out: stop it
                    # (a slow or hung Redis) and count Redis as down; the fencing token keeps writes safe.
                    async with asyncio.timeout(self.lease_ms / 1000):
                        await self.round()
                    self._set_up(True)
                except UNREACHABLE as exc:  # TimeoutError is an OSError
                    self._set_up(False, exc)
                except Exception as exc:  # a bug or bad data must not end the loop while leads() says yes
                    await self._failed(exc)
                try:
                    await asyncio.wait_for(self._wake.wait(), self.refresh_s)
                except TimeoutError:
                    pass
                self._wake.clear()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _failed(self, exc: Exception) -> None:
        """A round failed for another reason than Redis: count it, log it (once a minute), stop leading."""
        self.metrics.fleet_loop_errors.inc()
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_INTERVAL_S:
            self._error_logged_at = now
            log.error("fleet round failed; leading no route until a round succeeds", exc_info=exc)
        self.up = False  # leads() is false from now on (Redis may be fine: fleet_redis_up is left as it is)
        for route, lease in self.leases.items():
            self.metrics.fleet_leader.labels(route).set(0)
            try:  # hand the lease over, so a replica without this fault leads; it runs out anyway if this fails
                async with asyncio.timeout(self.refresh_s):
                    await lease.release()
            except (*UNREACHABLE, TimeoutError):
                lease.lost()

    async def round(self) -> None:
        """One pass: append, add tokens, lead, refresh (see the module docstring)."""
        await self.flush()
        for route in self.leases:
            await self.lead(route)
        await self.refresh()

    async def flush(self) -> None:
        for route, queue in self.buffer.items():
            while queue:
                batch = list(itertools.islice(queue, BATCH))  # not list(queue): O(BATCH), not O(buffer)
                await self.store.append(route, self.replica, batch)
                for _ in batch:
                    queue.popleft()
                self.buffered -= len(batch)
                self.metrics.fleet_buffered.set(self.buffered)
        deltas = {route: dict(counter) for route, counter in self.pending.items() if counter}
        if deltas:
            await self.store.add_tokens(deltas)
            for route, kinds in deltas.items():
                self.pending[route].subtract(kinds)

    async def lead(self, route: str) -> None:
        """Take or renew the route's lease; while held, fold the log's new entries into the state."""
        lease = self.leases[route]
        # On a Redis error the token is kept: if the lease has not run out meanwhile, the next hold renews it
        # and this replica goes on leading; if it has, hold returns None. Writes are safe either way (fencing).
        token = await lease.hold()
        self.metrics.fleet_leader.labels(route).set(1 if token is not None else 0)
        if token is None:
            return
        for _ in range(MAX_BATCHES):
            current = await self.store.read_state(route)
            read = await self.store.read_after(route, current.last_id, BATCH)
            if not read.read and current.state is not None:
                return
            entries = read.entries
            rc = self.plane.routes[route]
            state, counts = self.fold(rc, current, entries)
            last_id = read.last_id  # past any entry that could not be decoded, so it is skipped once
            try:
                await self.store.commit(route, token, current.revision, state, last_id, counts)
            except StaleLease:
                lease.lost()
                self.metrics.fleet_leader.labels(route).set(0)
                self.metrics.fleet_refused.labels(route, "stale").inc()
                log.warning("route %s: another replica took the lease; this one's write was refused", route)
                return
            except Conflict:
                self.metrics.fleet_refused.labels(route, "conflict").inc()
                continue  # an operator wrote the state meanwhile: fold into theirs
            self.metrics.fleet_applied.labels(route).inc(len(entries))
            if read.skipped:
                self.metrics.fleet_undecodable.labels(route).inc(read.skipped)
                log.error("route %s: %d undecodable log entries skipped (up to %s)", route, read.skipped, last_id)
            self._adopt(rc, state, count=True)
            if read.read < BATCH:
                return

    def fold(
        self, rc: RouteControl, current: StateRecord, entries: list[LogEntry]
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The state after ``entries`` and the samples they add by source; pure apart from ``rc.config``."""
        counts: Counter[str] = Counter(entry.record.source for entry in entries)
        if rc.config is None:
            return {}, dict(counts)  # a route without a controller: the log only counts
        if current.state:
            state = state_from_dict(current.state)
            self._follow_target(rc, state.target)
        else:  # nothing published yet, or Redis lost its data: start from what this replica knows
            state = rc.state if rc.state is not None else initial_state(rc.config)
        config = rc.config
        for entry in entries:
            r = entry.record
            if entry.controlled:
                state = step(state, Sample(r.correct, r.budget, r.level, r.source), config)
        return state_to_dict(state), dict(counts)

    async def refresh(self) -> None:
        views = await self.store.views(self.leases)
        for route, view in views.items():
            self.views[route] = view
            rc = self.plane.routes[route]
            if view.state.state:
                self._adopt(rc, view.state.state)
            rc.counts = Counter(view.state.counts)
            pending = self.pending[route]
            rc.live_tokens = view.share.get("live", 0) + pending["live"]
            rc.eval_tokens = Counter({k: view.share.get(k, 0) + pending[k] for k in ("canary", "shadow")})
            self.plane._publish_share(rc)
            if view.refs_version and view.refs_version != self.refs_versions.get(route):
                try:
                    self.plane.load_stored_references(route, await self.store.reference_sets(route))
                except ConfigError as exc:  # validated on upload; only a hand-edited key gets here
                    log.error("route %s: stored reference sets not loaded: %s", route, exc)
                self.refs_versions[route] = view.refs_version

    def _adopt(self, rc: RouteControl, data: dict[str, Any], *, count: bool = False) -> None:
        """Make a published state this replica's own (the budget its requests run at); the leader
        ``count``s the adjustment, so the fleet's metrics count each one once."""
        if rc.config is None or not data:
            return
        state = state_from_dict(data)
        self._follow_target(rc, state.target)
        before = rc.state
        rc.state = state
        if count and before is not None and (state.budget, state.level) != (before.budget, before.level):
            looser = (state.budget, state.level) > (before.budget, before.level)
            self.plane.metrics.adjustments.labels(rc.route.name, "up" if looser else "down").inc()
        self.plane._publish(rc)

    def _follow_target(self, rc: RouteControl, target: float | None) -> None:
        """A target set through any replica's admin API holds for the fleet."""
        if rc.config is not None and target is not None and target != rc.config.target:
            rc.config = controller_config(rc.route, target)

    async def _listen(self) -> None:
        """Wake the loop when a leader publishes (Redis pub/sub; the SQLite log only polls)."""
        await self.store.listen(self._wake)

    def _set_up(self, up: bool, exc: BaseException | None = None) -> None:
        if up != self.up:
            if up:
                log.info("shared store reachable; %d buffered samples appended", self.buffered)
            else:
                log.warning("shared store unreachable (%s); serving with the last budget, buffering samples", exc)
        if not up:
            for route in self.leases:
                self.metrics.fleet_leader.labels(route).set(0)
        self.up = up
        self.metrics.fleet_redis_up.set(1 if up else 0)

    async def aclose(self) -> None:
        """Stop the loop; append what is buffered and hand the leases back, if Redis answers quickly."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            async with asyncio.timeout(3.0):
                await self.flush()
                for lease in self.leases.values():
                    await lease.release()
        except (*UNREACHABLE, TimeoutError) as exc:
            log.warning("shutdown: %d samples not appended, leases left to expire (%s)", self.buffered, exc)
        await self.store.aclose()


def join_fleet(plane: ControlPlane, settings: Settings, metrics: Metrics) -> Fleet:
    """The fleet loop for a plane whose store is shared: the Redis at ``settings.state_url``, or else the
    state file that ``settings.workers`` processes share (gateway/control/sqlite_log.py)."""
    store: SampleLog
    if settings.state_url is not None:
        store = RedisLog.from_url(settings.state_url)
    else:
        from gateway.control.sqlite_log import SQLiteLog

        store = SQLiteLog(settings.state_path)
    fleet = Fleet(
        plane,
        store,
        metrics,
        lease_ms=settings.state_lease_ms,
        buffer_max=settings.state_buffer_max,
        refresh_s=settings.state_refresh_s,
    )
    plane.fleet = fleet
    return fleet
