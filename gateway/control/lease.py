"""A per-route lease in Redis with a fencing token: which replica steps a route's controller.

``hold`` takes the lease when it is free (``SET key value NX PX ttl``) or
renews it when this replica holds it, in one script. Each new holder gets the
next fencing token (``INCR`` on the route's fence key); the commit script
(gateway/control/redis_store.py) writes state only with the newest token. So a
holder that was paused (GC, SIGSTOP, a slow disk) past its lease and then
wakes up cannot overwrite what the next holder wrote: its token is old.

The lease only decides who *tries* to write; the fencing token is what makes a
write safe. A leader that stops renewing (killed, partitioned) loses the lease
after ``ttl_ms``, and the next replica to call ``hold`` takes it.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from gateway.control.redis_keys import Keys

# KEYS: lease, fence. ARGV: owner, ttl_ms, token this owner holds ('' if none).
# Returns the token held after the call, or 0 when another owner holds the lease.
_HOLD = """
local mine = ARGV[1] .. ':' .. ARGV[3]
local current = redis.call('GET', KEYS[1])
if current and ARGV[3] ~= '' and current == mine then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(ARGV[3])
end
if current then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'NX', 'PX', ARGV[2])
return token
"""

# KEYS: lease. ARGV: owner:token. Deletes the lease only if this owner still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """One replica's view of one route's lease: ``token`` is set while it believes it holds it."""

    def __init__(self, client: aioredis.Redis, keys: Keys, owner: str, ttl_ms: int) -> None:
        if ttl_ms < 1:
            raise ValueError(f"ttl_ms: must be >= 1, got {ttl_ms}")
        self.keys, self.owner, self.ttl_ms = keys, owner, ttl_ms
        self.token: int | None = None
        self.held_until = 0.0  # time.monotonic() by which the lease runs out unless renewed
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)

    async def hold(self) -> int | None:
        """Take or renew the lease; the fencing token while held, else None.

        Renew at least every ``ttl_ms / 3``. On a Redis error the caller must
        call ``lost`` (the lease may run out while Redis cannot be reached)."""
        mine = "" if self.token is None else str(self.token)
        asked = time.monotonic()  # Redis set the expiry after this moment, so the lease lasts at least this long
        token = int(await self._hold(keys=[self.keys.lease, self.keys.fence], args=[self.owner, self.ttl_ms, mine]))
        self.token = token or None
        if self.token is not None:
            self.held_until = asked + self.ttl_ms / 1000
        return self.token

    def held(self) -> bool:
        """Whether this replica holds the lease now: it has a token and renewed it within ``ttl_ms``."""
        return self.token is not None and time.monotonic() < self.held_until

    def lost(self) -> None:
        """Stop acting as the holder (a write was refused, or Redis cannot be reached)."""
        self.token = None

    async def release(self) -> None:
        """Hand the lease back at once (a graceful shutdown), so the next holder need not wait ``ttl_ms``."""
        if self.token is not None:
            token, self.token = self.token, None
            await self._release(keys=[self.keys.lease], args=[f"{self.owner}:{token}"])
