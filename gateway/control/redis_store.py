"""The shared state store: Redis, for several gateway replicas that must agree (issue 18).

Keys, per route ``R`` (the ``{R}`` braces are a Redis Cluster hash tag, so one
route's keys share a slot and its Lua scripts may touch them all):

    stopgate:{R}:state     hash: state (JSON), revision, last_id (the last log entry
                           folded into state), n:gold / n:canary / n:shadow, updated_at
    stopgate:{R}:log       stream: the append-only EM sample log, one entry per sample
    stopgate:{R}:seq       hash: replica id -> last sequence number it appended (dedup)
    stopgate:{R}:lease     string: "<replica>:<token>", SET NX PX (gateway/control/lease.py)
    stopgate:{R}:fence     integer: the newest fencing token handed out
    stopgate:{R}:share     hash: live / canary / shadow tokens, fleet-wide
    stopgate:{R}:refs      hash: uploaded reference sets, name -> JSONL
    stopgate:{R}:refs:order  sorted set: upload order;  stopgate:{R}:refs:version  integer
    stopgate:routes        set: routes with a state
    stopgate:published     pub/sub channel: a route's state changed (the message is the route)

Two clients: ``RedisStore`` is the synchronous ``Store`` (gateway/control/store.py)
the control plane opens at start-up and the admin API writes through; ``RedisLog``
is the asynchronous side the fleet loop (gateway/control/fleet.py) uses on the
event loop: append samples, read the log, commit state under a fencing token,
the evaluation-share counters.

Exactly once: every replica numbers its samples (``seq``) and the append script
drops any it has appended before, so a retried batch after a lost reply adds
nothing twice; the leader folds log entries into the state and stores the last
entry's id *in the same script* that writes the state, so a new leader resumes
after exactly that entry. The commit script also checks the fencing token and
the revision it read: a paused ex-leader (stale token) and a concurrent admin
write (newer revision) both make it fail without writing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from gateway.control.lease import Lease
from gateway.control.redis_keys import Keys
from gateway.control.store import (
    DEFAULT_MAX_SAMPLES_PER_ROUTE,
    SOURCES,
    SampleRecord,
    StoreBase,
    StoreError,
    encode_state,
)

PREFIX = "stopgate"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# Redis calls fail fast, so an outage never holds a request or the fleet loop for long: one try each,
# no retries with backoff (redis-py's default retries three times), since the fleet loop and the admin
# API retry on their own terms.
SOCKET_TIMEOUT_S = 2.0
# An operator's compare-and-set write retries this often when a leader commits between its read and write.
CAS_ATTEMPTS = 8


def is_redis_url(url: str) -> bool:
    return url.startswith(REDIS_SCHEMES)


# KEYS: state, fence, log. ARGV: token ('' = no fence check), expected revision ('' = any),
# state JSON, last_id ('' = unchanged), n:gold, n:canary, n:shadow, now, channel, route.
# Returns the new revision, -1 for a stale token, -2 for a revision conflict.
_COMMIT = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local rev = tonumber(redis.call('HGET', KEYS[1], 'revision') or '0')
if ARGV[2] ~= '' and rev ~= tonumber(ARGV[2]) then return -2 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'revision', rev + 1, 'updated_at', ARGV[8])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'last_id', ARGV[4]) end
local names = {'n:gold', 'n:canary', 'n:shadow'}
for i = 1, 3 do
  if tonumber(ARGV[4 + i]) > 0 then redis.call('HINCRBY', KEYS[1], names[i], ARGV[4 + i]) end
end
redis.call('PUBLISH', ARGV[9], ARGV[10])
return rev + 1
"""

# KEYS: log, seq. ARGV: replica, maxlen, then (seq, record JSON) pairs in order.
# Appends the records with a sequence number above the replica's last one; returns how many.
_APPEND = """
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local added = 0
for i = 3, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'r', ARGV[i + 1])
    last = seq
    added = added + 1
  end
end
redis.call('HSET', KEYS[2], ARGV[1], last)
return added
"""

# KEYS: state, log. ARGV: state JSON, record JSON, source count field, maxlen, now.
# The synchronous store's save with a sample: append it and fold it in, in one step.
_SAVE_WITH_SAMPLE = """
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[2])
local rev = tonumber(redis.call('HGET', KEYS[1], 'revision') or '0')
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'revision', rev + 1, 'last_id', id, 'updated_at', ARGV[5])
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
return id
"""

# KEYS: refs, refs:order, refs:version. ARGV: name, body. A replaced set moves to the end.
_SAVE_REFS = """
local v = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], v, ARGV[1])
return v
"""


def encode_record(record: SampleRecord, controlled: bool) -> str:
    return json.dumps({**asdict(record), "ctl": controlled}, separators=(",", ":"))


_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "route": str,
    "source": str,
    "budget": int,
    "level": int,
    "correct": bool,
    "tokens": int,
    "at": (int, float),
}


def decode_record(text: str | bytes) -> tuple[SampleRecord, bool]:
    """A log entry's sample and whether it was taken at the controller's settings; ValueError if malformed."""
    try:
        data = json.loads(text)
    except (TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"log entry: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("log entry: not a JSON object")
    controlled = bool(data.pop("ctl", False))
    for name, kind in _RECORD_TYPES.items():
        value = data.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"log entry: {name!r} is missing or of the wrong type")
    try:
        return SampleRecord(**data), controlled
    except TypeError as exc:  # unknown fields
        raise ValueError(f"log entry: {exc}") from exc


def _counts(fields: dict[str, str]) -> dict[str, int]:
    return {source: int(fields.get(f"n:{source}", 0)) for source in sorted(SOURCES)}


@dataclass(frozen=True)
class StateRecord:
    """One route's published state as stored: ``state`` is None when nothing was saved yet."""

    state: dict[str, Any] | None
    revision: int
    last_id: str
    counts: dict[str, int]

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> StateRecord:
        text = fields.get("state")
        return cls(
            json.loads(text) if text else None,
            int(fields.get("revision", 0)),
            fields.get("last_id", ""),
            _counts(fields),
        )


class RedisStore(StoreBase):
    """A ``Store`` in Redis, shared by every replica (synchronous; start-up and admin writes).

    ``save`` without a sample is an operator's write: it bumps the revision, so
    a leader that read the state before fails its commit and folds its samples
    into the operator's state instead of overwriting it.
    """

    def __init__(
        self, url: str, *, prefix: str = PREFIX, max_samples_per_route: int = DEFAULT_MAX_SAMPLES_PER_ROUTE
    ) -> None:
        if max_samples_per_route < 1:
            raise ValueError(f"max_samples_per_route: must be >= 1, got {max_samples_per_route}")
        super().__init__()
        self.url, self.prefix, self._max = url, prefix, max_samples_per_route
        try:
            client = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
            )
            client.ping()
        except (RedisError, ValueError) as exc:
            raise StoreError(f"{_safe(url)}: cannot reach Redis: {exc}") from exc
        self._client: redis.Redis | None = client
        self._commit = client.register_script(_SAVE_WITH_SAMPLE)
        self._save_state = client.register_script(_COMMIT)
        self._refs = client.register_script(_SAVE_REFS)

    def keys(self, route: str) -> Keys:
        return Keys(self.prefix, route)

    def _redis(self) -> redis.Redis:
        if self._client is None:
            raise StoreError(f"{_safe(self.url)}: store is closed")
        return self._client

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        with self._lock:
            self._redis()
            try:
                return fn(*args)
            except RedisError as exc:
                raise StoreError(f"{_safe(self.url)}: cannot {what}: {exc}") from exc

    def load(self, route: str) -> dict[str, Any] | None:
        fields = self._call(f"load route {route!r}", self._redis().hgetall, self.keys(route).state)
        return StateRecord.from_hash(fields).state

    def routes(self) -> list[str]:
        return sorted(self._call("list routes", self._redis().smembers, f"{self.prefix}:routes"))

    def update(self, route: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]) -> dict[str, Any]:
        """An operator's write as compare-and-set: ``change`` maps the state stored now (None if none)
        to the new one, which is written only if no commit came in between; else it reads and retries.

        So an admin write on one replica never overwrites samples the leader folded in after that
        replica last refreshed: it is applied to the leader's state, and ``last_id`` is left as is."""
        k = self.keys(route)
        for _ in range(CAS_ATTEMPTS):
            current = StateRecord.from_hash(self._call(f"load route {route!r}", self._redis().hgetall, k.state))
            state = change(current.state)
            text = encode_state(route, state, None)
            args = ["", current.revision, text, "", 0, 0, 0, str(time.time()), f"{self.prefix}:published", route]
            written = int(self._call(f"save route {route!r}", self._save_state, [k.state, k.fence, k.log], args))
            if written >= 0:
                self._call("list routes", self._redis().sadd, f"{self.prefix}:routes", route)
                return state
        raise StoreError(f"route {route!r}: the state changed under each of {CAS_ATTEMPTS} attempts to write it")

    def save(self, route: str, state: dict[str, Any], sample: SampleRecord | None = None) -> None:
        text = encode_state(route, state, sample)
        k = self.keys(route)
        now = str(time.time())
        if sample is None:
            args = ["", "", text, "", 0, 0, 0, now, f"{self.prefix}:published", route]
            self._call(f"save route {route!r}", self._save_state, [k.state, k.fence, k.log], args)
        else:
            args = [text, encode_record(sample, False), f"n:{sample.source}", self._max, now]
            self._call(f"save route {route!r}", self._commit, [k.state, k.log], args)
        self._call("list routes", self._redis().sadd, f"{self.prefix}:routes", route)

    def samples(self, route: str, limit: int = 100) -> list[SampleRecord]:
        limit = min(limit, self._max)
        if limit <= 0:
            return []
        entries = self._call(
            f"read samples of {route!r}", self._redis().xrevrange, self.keys(route).log, "+", "-", limit
        )
        return [decode_record(fields["r"])[0] for _, fields in reversed(entries)]

    def counts(self, route: str) -> dict[str, int]:
        return _counts(self._call(f"count samples of {route!r}", self._redis().hgetall, self.keys(route).state))

    def save_reference_set(self, route: str, name: str, body: str) -> None:
        k = self.keys(route)
        self._call(f"save reference set {name!r}", self._refs, [k.refs, k.refs_order, k.refs_version], [name, body])

    def reference_sets(self, route: str) -> list[tuple[str, str]]:
        k = self.keys(route)
        names: list[str] = self._call("read reference sets", self._redis().zrange, k.refs_order, 0, -1)
        bodies = self._call("read reference sets", self._redis().hmget, k.refs, names) if names else []
        return [(n, b) for n, b in zip(names, bodies, strict=True) if b is not None]

    def _release(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


@dataclass(frozen=True)
class LogEntry:
    id: str
    record: SampleRecord
    controlled: bool  # taken at the controller's own settings: it may move the budget


@dataclass(frozen=True)
class LogRead:
    """One read of the log: the decoded entries, the id of the last entry read, how many were read and skipped."""

    entries: list[LogEntry]
    last_id: str
    read: int
    skipped: int


@dataclass(frozen=True)
class RouteView:
    """What every replica reads each refresh: the published state, the shared counters, the lease holder."""

    state: StateRecord
    share: dict[str, int]
    refs_version: int
    leader: str | None


class StaleLease(Exception):
    """A commit carried a fencing token older than the newest: another replica leads the route now."""


class Conflict(Exception):
    """The state changed since it was read (an admin write); read it again and redo the fold."""


class RedisLog:
    """The asynchronous side of the shared store, for the fleet loop on the event loop."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = PREFIX, maxlen: int = 100_000) -> None:
        self.client, self.prefix, self.maxlen = client, prefix, maxlen
        self.channel = f"{prefix}:published"
        self._commit = client.register_script(_COMMIT)
        self._append = client.register_script(_APPEND)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = PREFIX) -> RedisLog:
        client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            retry=AsyncRetry(NoBackoff(), 0),
        )
        return cls(client, prefix=prefix)

    def keys(self, route: str) -> Keys:
        return Keys(self.prefix, route)

    def lease(self, route: str, owner: str, ttl_ms: int) -> Lease:
        """The route's lease for ``owner`` (gateway/control/lease.py)."""
        return Lease(self.client, self.keys(route), owner, ttl_ms)

    async def listen(self, wake: asyncio.Event) -> None:
        """Set ``wake`` whenever a leader publishes a route's state; reconnects after Redis comes back."""
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            wake.set()
            except (RedisError, OSError):
                await asyncio.sleep(1.0)

    async def append(self, route: str, replica: str, batch: Sequence[tuple[int, SampleRecord, bool]]) -> int:
        """Append ``(seq, record, controlled)`` in order; entries this replica appended before are skipped."""
        k = self.keys(route)
        args: list[Any] = [replica, self.maxlen]
        for seq, record, controlled in batch:
            args += [seq, encode_record(record, controlled)]
        return int(await self._append(keys=[k.log, k.seq], args=args))

    async def read_state(self, route: str) -> StateRecord:
        fields: dict[str, str] = await self.client.hgetall(self.keys(route).state)  # type: ignore[assignment]
        return StateRecord.from_hash(fields)

    async def entries_after(self, route: str, last_id: str, count: int) -> list[LogEntry]:
        return (await self.read_after(route, last_id, count)).entries

    async def read_after(self, route: str, last_id: str, count: int) -> LogRead:
        """Up to ``count`` log entries after ``last_id``; one that cannot be decoded is skipped (and
        counted), never an error that would stop the leader at that entry for good."""
        start = f"({last_id}" if last_id else "-"
        rows: list[tuple[str, dict[str, str]]] = await self.client.xrange(self.keys(route).log, start, "+", count)  # type: ignore[assignment]
        entries: list[LogEntry] = []
        for entry_id, fields in rows:
            try:
                entries.append(LogEntry(entry_id, *decode_record(fields["r"])))
            except (KeyError, ValueError):
                continue
        return LogRead(entries, rows[-1][0] if rows else "", len(rows), len(rows) - len(entries))

    async def commit(
        self, route: str, token: int, revision: int, state: dict[str, Any], last_id: str, counts: dict[str, int]
    ) -> int:
        """Write the folded state and the last entry folded in, if ``token`` is the newest and nothing
        changed since ``revision`` was read. Raises ``StaleLease`` or ``Conflict`` without writing."""
        k = self.keys(route)
        text = json.dumps(state, allow_nan=False, separators=(",", ":"))
        args: list[str | int | float] = [token, revision, text, last_id, counts.get("gold", 0), counts.get("canary", 0)]
        args += [counts.get("shadow", 0), time.time(), self.channel, route]
        result = int(await self._commit(keys=[k.state, k.fence, k.log], args=args))
        if result == -1:
            raise StaleLease(route)
        if result == -2:
            raise Conflict(route)
        await self.client.sadd(f"{self.prefix}:routes", route)
        return result

    async def add_tokens(self, deltas: dict[str, dict[str, int]]) -> None:
        """Add token counts to the shared evaluation-share counters: ``{route: {kind: n}}``.

        All or nothing (MULTI/EXEC): the caller keeps the counts for the next round when this raises,
        so a partly applied batch would be counted twice."""
        async with self.client.pipeline(transaction=True) as pipe:
            for route, kinds in deltas.items():
                for kind, n in kinds.items():
                    if n:
                        pipe.hincrby(self.keys(route).share, kind, n)
            await pipe.execute()

    async def views(self, routes: Iterable[str]) -> dict[str, RouteView]:
        """Every route's published state, counters and leader, in one round trip."""
        names = list(routes)
        async with self.client.pipeline(transaction=False) as pipe:
            for route in names:
                k = self.keys(route)
                pipe.hgetall(k.state)
                pipe.hgetall(k.share)
                pipe.get(k.refs_version)
                pipe.get(k.lease)
            replies = await pipe.execute()
        out: dict[str, RouteView] = {}
        for i, route in enumerate(names):
            state, share, version, lease = replies[4 * i : 4 * i + 4]
            out[route] = RouteView(
                StateRecord.from_hash(state),
                {kind: int(n) for kind, n in share.items()},
                int(version or 0),
                lease.rsplit(":", 1)[0] if lease else None,
            )
        return out

    async def reference_sets(self, route: str) -> list[tuple[str, str]]:
        k = self.keys(route)
        names: list[str] = await self.client.zrange(k.refs_order, 0, -1)  # type: ignore[assignment]
        bodies: list[str | None] = await self.client.hmget(k.refs, names) if names else []  # type: ignore[assignment]
        return [(n, b) for n, b in zip(names, bodies, strict=True) if b is not None]

    async def aclose(self) -> None:
        await self.client.aclose()


def _safe(url: str) -> str:
    """The URL without a password, for messages."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
