"""Strategy ordering, tested on the pure functions the dispatcher calls."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from kubellm.router import parse_config
from kubellm.router.core._balancer import Stats, order_tier
from kubellm.router.core._state import build_state


def _group(strategy: str, deployments: list[dict[str, Any]], **extra: Any) -> Any:
    config = parse_config(
        {
            "deployments": [{"model": "m", "provider": "mock", **d} for d in deployments],
            "modelGroups": [{"name": "m", "strategy": strategy, **extra}],
        }
    )
    return build_state(config).groups["m"]


def _first(group: Any, stats: Stats, rng: random.Random, n: int = 2000, stream: bool = False) -> Counter[str]:
    return Counter(order_tier(group, group.deployments, stats, rng, stream=stream)[0].name for _ in range(n))


def test_least_busy_picks_fewest_in_flight() -> None:
    group = _group("least-busy", [{"name": "a"}, {"name": "b"}, {"name": "c"}])
    stats = Stats()
    stats["a"].in_flight, stats["b"].in_flight, stats["c"].in_flight = 5, 1, 3
    order = order_tier(group, group.deployments, stats, random.Random(1), stream=False)
    assert [d.name for d in order] == ["b", "c", "a"]
    stats["a"].in_flight = stats["b"].in_flight = stats["c"].in_flight = 0
    assert set(_first(group, stats, random.Random(2))) == {"a", "b", "c"}  # ties shared at random


def test_lowest_latency_with_tolerance_band() -> None:
    group = _group(
        "lowest-latency", [{"name": "fast"}, {"name": "near"}, {"name": "slow"}], latencyTolerance=0.2
    )
    stats = Stats()
    for _ in range(50):
        stats["fast"].observe(0.100, 0.020)
        stats["near"].observe(0.110, 0.060)
        stats["slow"].observe(0.500, 0.021)
    counts = _first(group, stats, random.Random(3))
    assert counts["slow"] == 0
    assert counts["fast"] > 700 and counts["near"] > 700  # near-ties share the load
    streamed = _first(group, stats, random.Random(4), stream=True)  # streams rank by time to first token
    assert streamed["near"] == 0 and streamed["fast"] > 700 and streamed["slow"] > 700


def test_lowest_latency_measures_untried_deployments_first() -> None:
    group = _group("lowest-latency", [{"name": "known"}, {"name": "new"}])
    stats = Stats()
    stats["known"].observe(0.01, None)
    assert order_tier(group, group.deployments, stats, random.Random(5), stream=False)[0].name == "new"


def test_lowest_cost_uses_deployment_prices() -> None:
    group = _group(
        "lowest-cost",
        [
            {"name": "dear", "pricing": {"inputPerMillion": 5, "outputPerMillion": 15}},
            {"name": "cheap", "pricing": {"inputPerMillion": 0.1, "outputPerMillion": 0.4}},
            {"name": "unpriced", "upstreamModel": "no-such-model-anywhere"},
        ],
    )
    order = order_tier(group, group.deployments, Stats(), random.Random(6), stream=False)
    assert [d.name for d in order] == ["cheap", "dear", "unpriced"]


def test_usage_based_prefers_headroom() -> None:
    group = _group("usage-based", [{"name": "full"}, {"name": "empty"}])
    room = {"full": 0.05, "empty": 0.9}
    order = order_tier(
        group, group.deployments, Stats(), random.Random(7), stream=False, headroom=lambda d: room[d.name]
    )
    assert [d.name for d in order] == ["empty", "full"]


def test_zero_weight_is_last_resort_and_tiers_sort() -> None:
    group = _group(
        "weighted-random",
        [{"name": "z", "weight": 0}, {"name": "w", "weight": 1}, {"name": "low", "priority": 1}],
    )
    assert [[d.name for d in t] for t in group.tiers] == [["z", "w"], ["low"]]
    top = group.tiers[0]
    rng = random.Random(8)
    firsts = Counter(order_tier(group, top, Stats(), rng, stream=False)[0].name for _ in range(200))
    assert firsts == Counter({"w": 200})
