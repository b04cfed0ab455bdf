"""The Redis keys of one route's shared state (gateway/control/redis_store.py draws them), in one place.

The ``{route}`` braces are a Redis Cluster hash tag, so one route's keys share a slot and its scripts may
touch them together.
"""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str, route: str) -> None:
        base = f"{prefix}:{{{route}}}"
        self.state, self.log, self.seq = f"{base}:state", f"{base}:log", f"{base}:seq"
        self.lease, self.fence, self.share = f"{base}:lease", f"{base}:fence", f"{base}:share"
        self.refs, self.refs_order, self.refs_version = f"{base}:refs", f"{base}:refs:order", f"{base}:refs:version"
