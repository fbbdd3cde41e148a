"""Load-balancing strategies: the order in which a model group's deployments are tried.

Deployments are tried tier by tier (``priority``, lowest number first); the
group's strategy orders each tier. Statistics live in :class:`Stats`, keyed by
deployment name, so they survive config reloads.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._state import Deployment, ModelGroup

#: Weight of the newest sample in the moving averages.
EWMA_ALPHA = 0.2


@dataclass(slots=True)
class DeploymentStats:
    in_flight: int = 0
    #: Moving averages in seconds; None until the first sample.
    latency: float | None = None
    ttft: float | None = None

    def observe(self, latency: float, ttft: float | None) -> None:
        self.latency = _ewma(self.latency, latency)
        if ttft is not None:
            self.ttft = _ewma(self.ttft, ttft)


def _ewma(average: float | None, sample: float) -> float:
    return sample if average is None else average + EWMA_ALPHA * (sample - average)


class Stats:
    def __init__(self) -> None:
        self._by_name: dict[str, DeploymentStats] = {}

    def __getitem__(self, name: str) -> DeploymentStats:
        stats = self._by_name.get(name)
        if stats is None:
            stats = self._by_name[name] = DeploymentStats()
        return stats


#: Remaining share of a deployment's limits (0..1), for the usage-based strategy.
Headroom = Callable[["Deployment"], float]


def _weighted_shuffle(deps: list[Deployment], rng: random.Random) -> list[Deployment]:
    if len(deps) < 2:
        return list(deps)
    pool = [d for d in deps if d.config.weight > 0]
    zero = [d for d in deps if d.config.weight <= 0]
    order: list[Deployment] = []
    while pool:
        total = sum(d.config.weight for d in pool)
        mark = rng.random() * total
        for i, dep in enumerate(pool):
            mark -= dep.config.weight
            if mark < 0 or i == len(pool) - 1:
                order.append(pool.pop(i))
                break
    return order + zero


def _by_key(
    deps: list[Deployment], key: Callable[[Deployment], float], rng: random.Random
) -> list[Deployment]:
    # Shuffle first so that ties are broken at random rather than by config order.
    shuffled = deps[:]
    rng.shuffle(shuffled)
    return sorted(shuffled, key=key)


def _lowest_latency(
    deps: list[Deployment], stats: Stats, tolerance: float, stream: bool, rng: random.Random
) -> list[Deployment]:
    def score(dep: Deployment) -> float | None:
        s = stats[dep.name]
        return (s.ttft or s.latency) if stream else s.latency

    unknown = [d for d in deps if score(d) is None]
    known = sorted((d for d in deps if score(d) is not None), key=lambda d: score(d) or 0.0)
    if not known:
        return _weighted_shuffle(deps, rng)
    best = score(known[0]) or 0.0
    near = [d for d in known if (score(d) or 0.0) <= best * (1 + tolerance)]
    far = [d for d in known if d not in near]
    # Untried deployments go first so that every one gets measured.
    return _weighted_shuffle(unknown, rng) + _weighted_shuffle(near, rng) + far


def _price(dep: Deployment) -> Decimal:
    from ..metering._pricing import price_for

    price = price_for(dep.config.upstream_model or dep.config.model, dep.config.pricing)
    if price is None:
        return Decimal("Infinity")
    return price.input_per_million + price.output_per_million


def order_tier(
    group: ModelGroup,
    deps: list[Deployment],
    stats: Stats,
    rng: random.Random,
    *,
    stream: bool,
    headroom: Headroom | None = None,
) -> list[Deployment]:
    strategy = group.settings.strategy
    if strategy == "least-busy":
        return _by_key(deps, lambda d: stats[d.name].in_flight, rng)
    if strategy == "lowest-latency":
        return _lowest_latency(deps, stats, group.settings.latency_tolerance, stream, rng)
    if strategy == "usage-based" and headroom is not None:
        return _by_key(deps, lambda d: -headroom(d), rng)
    if strategy == "lowest-cost":
        return _by_key(deps, lambda d: float(_price(d)), rng)
    return _weighted_shuffle(deps, rng)
