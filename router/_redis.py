"""The shared Redis backend: a fail-fast client and cached Lua scripts.

Limits, budgets and the ledger are each a handful of Lua scripts, so every
operation is one atomic round trip. Redis is on the request path: a slow or
dead Redis must surface as an error within about a second, never as a hang or
a hidden retry loop, so the client has short timeouts and no retries. Callers
decide what a failure means (the ledger spills to disk; admission fails).

Redis Cluster: every script touches several keys, which must share a hash
slot. Give all kubellm keys one hash tag by choosing a prefix like
``"{kubellm}:"``; the scripts declare every key they touch in ``KEYS``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

#: What script arguments may be: Redis encodes each as a bulk string.
Arg = str | bytes | int | float


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

    async def load(self, client: Redis) -> None:
        """Cache the script on the server ahead of the first call (optional)."""
        await client.script_load(self.source)

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)
