"""The router's long-lived services, built once from the settings and passed to the Router.

Everything a request uses besides the config snapshot (the upstream client pool, breakers, the
response cache, limits, budgets, the ledger, the dispatcher over them) is built here, in one
place, in memory or on Redis as the settings say. Nothing rewires them afterwards: settings they
read at build time (Redis, cache sizes, cooldown policy, the ledger's location) take effect at the
next restart, while everything else in the config reloads live (see docs/config.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config._schema import RouterSettings
from ..files._store import ObjectStore, object_store
from ..guardrails import Guardrails
from ..identity import Identities
from ..inbound.responses import ResponseStore, responses_store
from ..metering._budget import MemoryBudgetStore, RedisBudgetStore
from ..metering._lease import LeasingLimiter
from ..metering._ledger import redis_ledger
from ..metering._limits import Limiter, MemoryLimiter
from ..metering._limits_cluster import ClusterLimiter
from ..metering._limits_redis import RedisLimiter
from ..metering._meter import Meter, ledger_writer, local_ledger
from ..observability import _metrics as metrics
from ..providers import UpstreamClient
from ..redis_connect import connect_settings, is_cluster
from ..redis_store import Client
from ..upstream._pool import UpstreamPool
from ._balancer import Stats
from ._cache import MemoryCache, RedisCache, ResponseCache
from ._dispatch import Dispatcher
from ._health import HealthTracker, MemoryHealthStore, RedisHealthStore

__all__ = ["Services", "build_services"]


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
    #: Validates bearer JWTs (TokenReview, OIDC JWKS) and caches the answers (closed at shutdown).
    identities: Identities


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
        identities=Identities(settings.identity),
    )
