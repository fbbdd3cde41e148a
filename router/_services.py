"""The router's long-lived services, built once from the settings and passed to the Router.

Everything a request uses besides the config snapshot (the upstream client pool, breakers, the
response cache, limits, budgets, the ledger, the dispatcher over them) is built here, in one
place, in memory or on Redis as the settings say. Nothing rewires them afterwards: settings they
read at build time (Redis, cache sizes, cooldown policy, the ledger's location) take effect at the
next restart, while everything else in the config reloads live (see docs/config.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import quote

from . import _metrics as metrics
from ._balancer import Stats
from ._budget import MemoryBudgetStore, RedisBudgetStore
from ._cache import MemoryCache, RedisCache, ResponseCache
from ._config import RedisSettings, RouterSettings
from ._dispatch import Dispatcher
from ._health import HealthTracker, MemoryHealthStore, RedisHealthStore
from ._lease import LeasingLimiter
from ._ledger import RedisLedger
from ._limits import Limiter, MemoryLimiter
from ._limits_cluster import ClusterLimiter
from ._limits_redis import RedisLimiter
from ._metering import Meter, ledger_writer, local_ledger
from ._redis import Client
from ._redis_connect import connect_settings, is_cluster
from ._upstream import UpstreamPool
from .files._store import ObjectStore, object_store
from .guardrails import Guardrails
from .inbound.responses import ResponseStore, responses_store
from .providers import UpstreamClient

__all__ = ["Services", "build_services", "redis_ledger", "redis_url"]


def redis_ledger(client: Client, settings: RedisSettings) -> RedisLedger:
    """The ledger the routers write and the operator reads. On a cluster its keys share one slot
    (``{ledger}``): a batch is one script, off the request path."""
    prefix = settings.key_prefix + ("{ledger}:" if is_cluster(client) else "")
    return RedisLedger(client, f"{prefix}ledger", prefix=prefix, wait_replicas=settings.ledger_wait_replicas)


def redis_url(settings: RedisSettings) -> str | None:
    url = settings.url or (os.environ.get(settings.url_env) if settings.url_env else None)
    if not url:
        return None
    password = os.environ.get(settings.password_env) if settings.password_env else None
    if password:
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://:{quote(password, safe='')}@{rest}"
    return url


@dataclass(frozen=True, kw_only=True, slots=True)
class Services:
    upstream: UpstreamPool
    stats: Stats
    health: HealthTracker
    cache: ResponseCache
    meter: Meter
    dispatcher: Dispatcher
    #: Stored Responses API responses (``previous_response_id``, GET, DELETE).
    responses: ResponseStore
    #: Where each uploaded file and batch lives and whose it is (``/v1/files``, ``/v1/batches``).
    files: ObjectStore
    #: The shared-state client, when Redis is configured (closed at shutdown).
    redis: Client | None
    #: Runs the guardrails; owns the webhook connection pool (closed at shutdown).
    guardrails: Guardrails


def build_services(settings: RouterSettings, *, upstream_client: UpstreamClient | None = None) -> Services:
    """The services for ``settings``: on Redis when ``settings.redis`` names one, else in memory.

    ``upstream_client`` replaces the pooled HTTP client for the dispatcher's upstream calls: the
    in-process test tier passes a fake that speaks a provider's protocol without a socket."""
    client = connect_settings(settings.redis)
    prefix = settings.redis.key_prefix
    if client is not None:
        health = HealthTracker(RedisHealthStore(client, prefix), settings.cooldown)
        cache: ResponseCache = RedisCache(client, settings.cache, prefix)
        cluster = is_cluster(client)
        budgets = RedisBudgetStore(client, prefix, tag_scopes=cluster)
        # One script admits the key's limits, its budget and the deployment's limits together
        # (on a cluster: one per slot they span, see _limits_cluster).
        exact = (ClusterLimiter if cluster else RedisLimiter)(client, prefix, budgets=budgets)
        # Leasing admits from slices of the limits and falls back to the exact limiter. Its lease
        # script spans the scopes of a request, so on a cluster admission stays exact per slot.
        leasing = settings.leasing.enabled and not cluster
        limiter: Limiter = LeasingLimiter(exact, settings.leasing) if leasing else exact
        meter = Meter(
            limiter,
            budgets,
            ledger_writer(redis_ledger(client, settings.redis), settings),
            fail_open=settings.redis.fail_open,
        )
    else:
        health = HealthTracker(MemoryHealthStore(), settings.cooldown)
        cache = MemoryCache(settings.cache)
        meter = Meter(
            MemoryLimiter(), MemoryBudgetStore(), local_ledger(settings), fail_open=settings.redis.fail_open
        )
    health.on_change = lambda name, is_open: metrics.DEPLOYMENT_COOLDOWN.labels(name).set(1 if is_open else 0)
    health.on_store_error = meter.store_failed
    upstream, stats = UpstreamPool(), Stats()
    dispatcher = Dispatcher(upstream_client or upstream, health, stats, cache, meter)
    return Services(
        upstream=upstream,
        stats=stats,
        health=health,
        cache=cache,
        meter=meter,
        dispatcher=dispatcher,
        responses=responses_store(settings, client),
        files=object_store(settings, client),
        redis=client,
        guardrails=Guardrails(),
    )
