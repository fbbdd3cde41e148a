"""Connecting to Redis as ``settings.redis.mode`` says: one server, a Redis Cluster, or the master
a set of Sentinels names.

Every mode fails fast like :func:`~kubellm.router.redis_store.connect`: short timeouts and no retries,
so a dead node surfaces as an error within about a second. After a Sentinel failover the next
connection asks the sentinels for the new master; after a cluster failover, the client follows
``MOVED`` and refreshes its slot map.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.crc import key_slot

from .redis_store import Client, connect

if TYPE_CHECKING:
    from .config._schema import RedisSettings

__all__ = ["connect_settings", "is_cluster", "redis_url", "slot", "tagged"]


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def slot(key: str) -> int:
    """The cluster hash slot of ``key`` (its ``{tag}`` when it has one)."""
    return int(key_slot(key.encode()))


def tagged(scope: str) -> str:
    """``scope`` as a hash tag: every key of one API key (or deployment) shares a slot."""
    return "{" + scope + "}"


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master discovery with the standalone pool's bounded wait for a connection."""


def _password(env: str | None) -> str | None:
    return os.environ.get(env) if env else None


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def connect_settings(settings: RedisSettings, *, timeout: float = 0.75) -> Client | None:
    """The client ``settings`` describe, or None when no Redis is configured (state in memory)."""

    password = _password(settings.password_env)
    if settings.mode == "sentinel":
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
            [_addr(a) for a in settings.sentinels],
            sentinel_kwargs={
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                "password": _password(settings.sentinel_password_env),
            },
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            health_check_interval=10,
            retry=Retry(NoBackoff(), 0),
            password=password,
            db=settings.db,
            client_name="kubellm",
        )
        master: Redis = sentinel.master_for(
            settings.master_name or "",
            connection_pool_class=_BlockingSentinelPool,
            max_connections=32,
            timeout=2.0,
        )
        return master
    url = redis_url(settings)
    if settings.mode == "cluster":
        seeds = [_addr(a) for a in settings.nodes]
        tls = False
        if url:
            parts = urlsplit(url)
            seeds.insert(0, (parts.hostname or "127.0.0.1", parts.port or 6379))
            password = password or parts.password
            tls = parts.scheme == "rediss"
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in seeds],
            password=password,
            ssl=tls,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            health_check_interval=10,
            retry=Retry(NoBackoff(), 0),
            # Per node; the async cluster client refuses (does not wait) past it.
            max_connections=256,
            client_name="kubellm",
        )
    return connect(url) if url else None


def redis_url(settings: RedisSettings) -> str | None:
    url = settings.url or (os.environ.get(settings.url_env) if settings.url_env else None)
    if not url:
        return None
    password = os.environ.get(settings.password_env) if settings.password_env else None
    if password:
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://:{quote(password, safe='')}@{rest}"
    return url
