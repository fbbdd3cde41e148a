"""Prometheus metrics. With several workers, prometheus_client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, set by the CLI) aggregates all processes.

The per-request metrics (requests, latency, time to first token, tokens, spend, in-flight) are
counted in plain dicts by :data:`recorder` and folded into the Prometheus metrics before every
scrape of this process and at least once a second: measured on a pinned core, updating them one
by one (a lock, a validation and, for histograms, a Python loop over the buckets per update) cost
about a fifth of the router's own work per request. With several workers, a scrape sees the other
workers' counts as of their last fold, at most a second old.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

if TYPE_CHECKING:
    from ..core._finished import Finished

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
# One series per router and version (max over its live workers, not one per worker), so a dashboard
# counting routers per version counts routers.
CONFIG_INFO = Gauge(
    "kubellm_config_info",
    "The loaded config version: 1; with several workers, a version served before a reload reads 0.",
    ["version"],
    multiprocess_mode="livemax",
)
IDENTITY_VALIDATIONS = Counter(
    "kubellm_identity_validations_total",
    "Bearer JWTs validated (identity cache misses), by source and result.",
    ["source", "result"],
)
CONFIG_RELOADS = Counter("kubellm_config_reloads_total", "Config reload attempts, by result.", ["result"])


SPEND = Counter("kubellm_spend_usd_total", "Metered spend in USD.", ["model_group", "key"])
RATE_LIMITED = Counter(
    "kubellm_rate_limited_total", "Requests refused or deployments skipped by a limit.", ["scope", "limit"]
)
GUARDRAIL_DECISIONS = Counter(
    "kubellm_guardrail_decisions_total",
    "Guardrail decisions, by guardrail, phase (pre, post) and decision "
    "(allow, deny, redact, fail_open, fail_closed).",
    ["guardrail", "phase", "decision"],
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


#: Interval between two folds of the per-request counts into the metrics.
FOLD_SECONDS = 1.0

_Finished = tuple[str, str, str, str, str | None, float, float | None, int | None, int | None, float]


class Recorder:
    """Per-request observations, folded into the Prometheus metrics in batches."""

    def __init__(self) -> None:
        self._finished: list[_Finished] = []
        self.in_flight: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def started(self, group: str) -> None:
        self.in_flight[group] = self.in_flight.get(group, 0) + 1
        self._schedule()

    def ended(self, group: str) -> None:
        self.in_flight[group] -= 1

    def finished(self, rec: Finished) -> None:
        """A finished request (``dep``: the deployment that answered or last failed, if any)."""
        usage = rec.usage
        self._finished.append(
            (
                rec.call.group.name,
                rec.deployment,
                rec.call.caller_label,
                str(rec.status),
                rec.dep.name if rec.dep is not None else None,
                rec.latency,
                rec.ttft,
                usage.prompt_tokens if usage is not None else None,
                usage.completion_tokens if usage is not None else None,
                rec.spend,
            )
        )
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FOLD_SECONDS, self.fold)

    def fold(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        finished, self._finished = self._finished, []
        requests: dict[tuple[str, str, str, str], int] = {}
        latency: dict[tuple[str, str], list[float]] = {}
        ttft: dict[tuple[str, str], list[float]] = {}
        tokens: dict[tuple[str, str, str, str], int] = {}
        spend: dict[tuple[str, str], float] = {}
        for group, deployment, key, status, served_by, took, first, prompt, completion, usd in finished:
            labels = (group, deployment, key, status)
            requests[labels] = requests.get(labels, 0) + 1
            if usd:
                spend[group, key] = spend.get((group, key), 0.0) + usd
            if served_by is None:
                continue
            latency.setdefault((group, served_by), []).append(took)
            if first is not None:
                ttft.setdefault((group, served_by), []).append(first)
            if prompt is not None and completion is not None:
                for direction, count in (("prompt", prompt), ("completion", completion)):
                    token_labels = (group, served_by, key, direction)
                    tokens[token_labels] = tokens.get(token_labels, 0) + count
        for request_labels, n in requests.items():
            child(REQUESTS, *request_labels).inc(n)
        for pair, values in latency.items():
            observe_many(child(LATENCY, *pair), values)
        for pair, values in ttft.items():
            observe_many(child(TTFT, *pair), values)
        for token_labels, n in tokens.items():
            child(TOKENS, *token_labels).inc(n)
        for pair, usd in spend.items():
            child(SPEND, *pair).inc(usd)
        for group, n in self.in_flight.items():
            child(IN_FLIGHT, group).set(n)


def observe_many(histogram: Any, values: list[float]) -> None:
    """``histogram.observe(v)`` for every value, with one update per bucket touched.

    Uses the child's bucket bounds and values (``_upper_bounds``, ``_buckets``, ``_sum``, stable
    across prometheus_client releases); tests/test_metrics.py checks the result against observe().
    """
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    histogram._sum.inc(sum(values))
    for index, count in enumerate(counts):
        if count:
            histogram._buckets[index].inc(count)


recorder = Recorder()


def render() -> tuple[bytes, str]:
    recorder.fold()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def set_config_version(old: str | None, new: str) -> None:
    if old is not None and old != new:
        # With several workers, remove() leaves the value in this worker's file, still 1: zero it first.
        CONFIG_INFO.labels(old).set(0)
        CONFIG_INFO.remove(old)
    CONFIG_INFO.labels(new).set(1)
