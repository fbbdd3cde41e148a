"""Teams: a key's limits and budget nest in its team's, one atomic admission (memory and Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal

import pytest

from kubellm.router.metering._budget import BudgetAsk, MemoryBudgetStore, RedisBudgetStore
from kubellm.router.metering._limits import Limiter, LimitRule, MemoryLimiter
from kubellm.router.metering._limits_redis import RedisLimiter
from kubellm.router.redis_store import connect
from tests.support.redis_server import RedisServer

T0 = 1_700_000_080.0
TEAM = LimitRule("team:ns/payments", rpm=5)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as srv:
        yield srv.url


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def limiters(kind: str, url: str, n: int = 2) -> AsyncIterator[list[Limiter]]:
    """``n`` limiters (replicas) sharing one state, each holding its budget store."""
    if kind == "memory":
        shared = MemoryLimiter(budgets=MemoryBudgetStore())
        yield [shared] * n
        return
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    clients = [connect(url) for _ in range(n)]
    try:
        yield [RedisLimiter(c, prefix=prefix, budgets=RedisBudgetStore(c, prefix)) for c in clients]
    finally:
        for c in clients:
            await c.aclose()


def test_team_rpm_is_shared_by_two_keys_on_two_replicas(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with limiters(kind, redis_url) as reps:
            got = []
            for i in range(12):
                key = LimitRule(f"key:ns/k{i % 2}", rpm=10)
                got.append(await reps[i % 2].acquire([key, TEAM], 0, f"l{i}", now=T0))
            assert sum(a.allowed for a in got) == 5
            assert got[5].denied_scopes == ("team:ns/payments",)

    asyncio.run(scenario())


def test_a_key_limit_tighter_than_the_team_still_applies(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with limiters(kind, redis_url) as reps:
            key = LimitRule("key:ns/tight", rpm=2)
            got = [await reps[i % 2].acquire([key, TEAM], 0, f"t{i}", now=T0) for i in range(4)]
            assert [a.allowed for a in got] == [True, True, False, False]
            assert got[2].denied_scopes == ("key:ns/tight",)
            # The team counted only the two admitted: three more fit in it for another key.
            other = LimitRule("key:ns/other", rpm=10)
            more = [await reps[0].acquire([other, TEAM], 0, f"o{i}", now=T0) for i in range(4)]
            assert [a.allowed for a in more] == [True, True, True, False]

    asyncio.run(scenario())


def test_team_budget_stops_both_keys_and_reserves_all_or_none(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with limiters(kind, redis_url) as reps:
            est = Decimal("0.6")

            def asks(key: str, rid: str) -> list[BudgetAsk]:
                return [
                    BudgetAsk(f"key:{key}", "daily", Decimal(100), est, rid, T0),
                    BudgetAsk("team:ns/payments", "daily", Decimal(1), est, rid, T0),
                ]

            a = await reps[0].acquire([], 0, "r1", now=T0, budget=asks("ns/a", "r1"))
            b = await reps[1].acquire([], 0, "r2", now=T0, budget=asks("ns/b", "r2"))
            c = await reps[0].acquire([], 0, "r3", now=T0, budget=asks("ns/a", "r3"))
            assert a.allowed and b.allowed and not c.allowed
            assert c.budgets["team:ns/payments"].allowed is False
            assert c.budgets["key:ns/a"].allowed is True
            # The key's budget reserved nothing for the refused request.
            again = await reps[0].acquire([], 0, "r4", now=T0, budget=[asks("ns/a", "r4")[0]])
            assert again.budget is not None and again.budget.reserved == Decimal("1.2")

    asyncio.run(scenario())
