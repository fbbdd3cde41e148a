"""Prometheus metrics. With several workers, prometheus_client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, set by the CLI) aggregates all processes."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "kubellm_requests_total",
    "Finished requests.",
    ["model_group", "deployment", "key", "status"],
)
LATENCY = Histogram(
    "kubellm_request_duration_seconds",
    "Request duration from arrival to the last byte.",
    ["model_group", "deployment"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "kubellm_time_to_first_token_seconds",
    "Streamed requests: arrival to first chunk sent.",
    ["model_group", "deployment"],
    buckets=_LATENCY_BUCKETS,
)
TOKENS = Counter(
    "kubellm_tokens_total",
    "Tokens metered, by direction (prompt, completion).",
    ["model_group", "deployment", "key", "direction"],
)
ERRORS = Counter("kubellm_errors_total", "Errors returned to clients, by type.", ["model_group", "type"])
RETRIES = Counter("kubellm_retries_total", "Upstream attempts after the first.", ["model_group"])
FALLBACKS = Counter(
    "kubellm_fallbacks_total", "Requests passed to a fallback model group.", ["model_group", "to"]
)
COOLDOWNS = Counter("kubellm_cooldowns_total", "Times a deployment's circuit breaker opened.", ["deployment"])
DEPLOYMENT_COOLDOWN = Gauge(
    "kubellm_deployment_cooldown",
    "1 while a deployment's circuit breaker is open, as this replica sees it.",
    ["deployment"],
    multiprocess_mode="max",
)
CACHE_HITS = Counter(
    "kubellm_cache_hits_total", "Requests answered from the response cache.", ["model_group"]
)
IN_FLIGHT = Gauge(
    "kubellm_in_flight_requests", "Requests being served.", ["model_group"], multiprocess_mode="livesum"
)
CONFIG_INFO = Gauge(
    "kubellm_config_info",
    "The loaded config version (value is always 1).",
    ["version"],
    multiprocess_mode="liveall",
)
CONFIG_RELOADS = Counter("kubellm_config_reloads_total", "Config reload attempts, by result.", ["result"])


SPEND = Counter("kubellm_spend_usd_total", "Metered spend in USD.", ["model_group", "key"])
RATE_LIMITED = Counter(
    "kubellm_rate_limited_total", "Requests refused or deployments skipped by a limit.", ["scope", "limit"]
)
STORE_ERRORS = Counter("kubellm_redis_errors_total", "Failed calls to the shared state store.", ["operation"])

_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached: ``labels()`` takes a lock and validates on every call."""
    key = (id(metric), labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def set_config_version(old: str | None, new: str) -> None:
    if old is not None and old != new:
        CONFIG_INFO.remove(old)
    CONFIG_INFO.labels(new).set(1)
