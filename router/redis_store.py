"""The shared Redis backend: a fail-fast client and cached Lua scripts.

Limits, budgets and the ledger are each a handful of Lua scripts, so every
operation is one atomic round trip. Redis is on the request path: a slow or
dead Redis must surface as an error within about a second, never as a hang or
a hidden retry loop, so the client has short timeouts and no retries. Callers
decide what a failure means (the ledger spills to disk; admission fails).

Redis Cluster (``settings.redis.mode: cluster``): every script declares the
keys it touches in ``KEYS``, and they must share a hash slot. Keys carry a hash
tag per key or per deployment (``kubellm:lim:{key:team-a}:w``), so load
spreads over the shards; an admission whose scopes live in different slots is
reserved slot by slot (see ``_limits_cluster``). Connecting from the settings,
Sentinel included: ``_redis_connect``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

#: What script arguments may be: Redis encodes each as a bulk string.
Arg = str | bytes | int | float
#: A client of one Redis (standalone or Sentinel's master) or of a Redis Cluster.
Client = Redis | RedisCluster


def connect(
    url: str,
    *,
    timeout: float = 0.75,
    health_check_interval: int = 10,
    max_connections: int = 32,
    pool_timeout: float = 2.0,
) -> Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``) that fails fast.

    Connect and socket timeouts are ``timeout`` seconds, idle connections are
    pinged before reuse after ``health_check_interval`` seconds, and nothing
    is retried: an error reaches the caller within about ``timeout``. At most
    ``max_connections`` are open; a burst of requests waits up to
    ``pool_timeout`` for one instead of opening hundreds of connections at once.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        socket_keepalive=True,
        health_check_interval=health_check_interval,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        decode_responses=False,
        client_name="kubellm",
    )
    return Redis.from_pool(pool)


class Script:
    """A Lua script run with EVALSHA, falling back to EVAL after NOSCRIPT.

    The fallback (one extra round trip) only happens after a Redis restart or
    ``SCRIPT FLUSH``; EVAL caches the script again for everyone.
    """

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def load(self, client: Client) -> None:
        """Cache the script on the server ahead of the first call (optional)."""
        await client.script_load(self.source)

    async def __call__(self, client: Client, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)
