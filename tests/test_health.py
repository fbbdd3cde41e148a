"""Circuit breakers with a controllable clock, in memory and in a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from kubellm.router.config._schema import CooldownSettings
from kubellm.router.core._health import HealthTracker, MemoryHealthStore, RedisHealthStore
from kubellm.router.redis_store import connect
from tests.support.redis_server import RedisServer

POLICY = CooldownSettings(
    failure_threshold=3, window_seconds=10, cooldown_seconds=30, probe_timeout_seconds=5
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def make_tracker(request: Any, redis_server: RedisServer) -> Iterator[Any]:
    redis_server.flush()
    clients: list[Any] = []
    shared_memory = MemoryHealthStore()

    def make(clock: Clock) -> HealthTracker:
        if request.param == "memory":
            return HealthTracker(shared_memory, POLICY, clock)
        client = connect(redis_server.url)
        clients.append(client)
        return HealthTracker(RedisHealthStore(client), POLICY, clock)

    async def close() -> None:
        for client in clients:
            await client.aclose()

    make.close = close  # type: ignore[attr-defined]
    yield make


def test_threshold_window_cooldown_and_probe(make_tracker: Any) -> None:
    async def scenario() -> None:
        clock = Clock()
        tracker = make_tracker(clock)
        assert not await tracker.failure("d")
        clock.now += 11  # the first failure leaves the window
        assert not await tracker.failure("d")
        assert not await tracker.failure("d")
        assert await tracker.failure("d")  # third within 10 s opens the breaker
        assert tracker.is_open("d") and not await tracker.admit("d")
        clock.now += 29.9
        assert not await tracker.admit("d")
        clock.now += 0.2
        assert await tracker.admit("d")  # half-open: one probe
        assert not await tracker.admit("d")  # and only one
        await tracker.success("d")
        assert await tracker.admit("d") and await tracker.admit("d")
        await make_tracker.close()

    asyncio.run(scenario())


def test_failed_probe_reopens(make_tracker: Any) -> None:
    async def scenario() -> None:
        clock = Clock()
        tracker = make_tracker(clock)
        assert await tracker.failure("d", retry_after=5)  # a 429 with Retry-After opens at once
        clock.now += 5.1
        assert await tracker.admit("d")
        assert await tracker.failure("d")  # the probe failed: open again, for the full cooldown
        clock.now += 29
        assert not await tracker.admit("d")
        clock.now += 2
        assert await tracker.admit("d")
        await make_tracker.close()

    asyncio.run(scenario())


def test_one_probe_across_replicas_and_stuck_probe_expires(make_tracker: Any) -> None:
    async def scenario() -> None:
        clock = Clock()
        one, two = make_tracker(clock), make_tracker(clock)
        assert await one.failure("d", retry_after=1)
        await two.refresh(["d"])
        assert two.is_open("d")
        clock.now += 1.5
        claims = [await one.admit("d"), await two.admit("d")]
        assert sorted(claims) == [False, True]
        clock.now += POLICY.probe_timeout_seconds + 0.1  # the prober died: another may probe
        loser = two if claims[0] else one
        await loser.refresh(["d"])
        assert await loser.admit("d")
        await loser.success("d")
        winner = one if claims[0] else two
        await winner.refresh(["d"])
        assert not winner.is_open("d") and await winner.admit("d")
        await make_tracker.close()

    asyncio.run(scenario())


def test_credential_rejection_is_remembered_shared_and_cleared(make_tracker: Any) -> None:
    async def scenario() -> None:
        clock = Clock()
        one, two = make_tracker(clock), make_tracker(clock)
        await one.reject("d", 401)  # opens at once: no failure threshold for a rejected credential
        assert one.is_open("d") and one.rejected("d") == 401
        await two.refresh(["d"])
        assert two.rejected("d") == 401
        reason = "the upstream rejected the credentials (401)"
        assert two.describe("d") == {"healthy": False, "reason": reason}
        clock.now += POLICY.cooldown_seconds + 0.1
        assert await one.admit("d")  # a probe, which still knows what the last answer was
        assert one.rejected("d") == 401 and not one.is_open("d")
        await one.reject("d", 403)  # the probe was refused again
        assert one.rejected("d") == 403
        clock.now += POLICY.cooldown_seconds + 0.1
        assert await one.admit("d")
        await one.success("d")  # the credential works again
        await two.refresh(["d"])
        assert (one.rejected("d"), two.rejected("d")) == (0, 0)
        assert two.describe("d") == {"healthy": True}
        await make_tracker.close()

    asyncio.run(scenario())


def test_other_failures_replace_a_rejection_and_reload_forgets_it(make_tracker: Any) -> None:
    async def scenario() -> None:
        clock = Clock()
        tracker = make_tracker(clock)
        await tracker.reject("d", 401)
        clock.now += POLICY.cooldown_seconds + 0.1
        assert await tracker.admit("d")
        assert await tracker.failure("d")  # the probe timed out: the last answer was no rejection
        assert tracker.rejected("d") == 0 and tracker.is_open("d")
        await tracker.reject("e", 401)
        await tracker.forget_rejections(["d", "e"])  # their credentials changed (a reload)
        await tracker.refresh(["d", "e"])
        assert tracker.rejected("e") == 0 and not tracker.is_open("e")
        assert tracker.is_open("d")  # a transient breaker is not a credential's business
        await make_tracker.close()

    asyncio.run(scenario())
