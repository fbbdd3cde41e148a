"""Budgets: periods, exact money, idempotent settles, and the overshoot bound under concurrency,
in memory and on a real Redis."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.router.metering._budget import BudgetStore, MemoryBudgetStore, RedisBudgetStore, period_window
from kubellm.router.redis_store import connect
from tests.support.redis_server import RedisServer

D = Decimal


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


NOW = ts(2025, 3, 12, 15, 30)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as srv:
        yield srv.url


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def stores(kind: str, url: str, n: int = 1, **kw: float) -> AsyncIterator[list[BudgetStore]]:
    if kind == "memory":
        yield [MemoryBudgetStore(**kw)] * n
        return
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    clients = [connect(url) for _ in range(n)]
    try:
        yield [RedisBudgetStore(c, prefix=prefix, **kw) for c in clients]
    finally:
        for c in clients:
            await c.aclose()


def test_period_windows() -> None:
    assert period_window("daily", NOW) == (ts(2025, 3, 12), ts(2025, 3, 13), "d:2025-03-12")
    assert period_window("weekly", NOW) == (ts(2025, 3, 10), ts(2025, 3, 17), "w:2025-W11")
    assert period_window("monthly", NOW) == (ts(2025, 3, 1), ts(2025, 4, 1), "m:2025-03")
    assert period_window("monthly", ts(2024, 12, 31, 23, 59)) == (
        ts(2024, 12, 1),
        ts(2025, 1, 1),
        "m:2024-12",
    )
    # ISO week 1 of 2025 starts on Monday 2024-12-30.
    assert period_window("weekly", ts(2025, 1, 1)) == (ts(2024, 12, 30), ts(2025, 1, 6), "w:2025-W01")
    start, end, key = period_window("30m", NOW)
    assert (start, end) == (NOW, NOW + 1800) and key == f"p30m:{int(NOW)}"
    assert period_window("7d", NOW)[0] % (7 * 86400) == 0
    assert period_window("12h", NOW)[:2] == (ts(2025, 3, 12, 12), ts(2025, 3, 13))
    assert period_window("1d", NOW)[:2] == period_window("daily", NOW)[:2]
    for bad in ("", "hourly", "0m", "5x", "1.5h", "-3d", "30 m", "daily2", "m30"):
        with pytest.raises(ValueError, match="invalid budget period"):
            period_window(bad, NOW)


def test_reserve_admits_until_the_budget_is_crossed(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with stores(kind, redis_url) as (s,):
            lim = D("1.00")
            a, b, c = [await s.reserve("key:a", "daily", lim, D("0.40"), rid, NOW) for rid in "abc"]
            assert a.allowed and b.allowed and c.allowed  # 0, 0.4, 0.8 committed before each: < 1
            assert c.reserved == D("1.2") and c.spent == 0 and c.remaining == 0
            assert c.resets_at == ts(2025, 3, 13) and c.period_key == "d:2025-03-12"
            d = await s.reserve("key:a", "daily", lim, D("0.01"), "d", NOW)
            assert not d.allowed and d.reserved == D("1.2")  # a denial reserves nothing
            assert await s.settle("key:a", "daily", "a", D("0.40"), D("0.05"), now=NOW)
            assert await s.settle("key:a", "daily", "b", D("0.40"), D("0.10"), now=NOW)
            assert await s.spent("key:a", "daily", NOW) == D("0.15")
            e = await s.reserve("key:a", "daily", lim, D("0.01"), "e", NOW)
            assert e.allowed and e.spent == D("0.15") and e.reserved == D("0.41")
            assert e.remaining == D("0.44")
            # Another scope, period or day is another bucket.
            assert (await s.reserve("key:b", "daily", lim, D("5"), "x", NOW)).allowed
            assert (await s.reserve("key:a", "weekly", lim, D("5"), "x", NOW)).allowed
            assert (await s.reserve("key:a", "daily", lim, D("5"), "y", NOW + 86400)).allowed

    asyncio.run(scenario())


def test_settle_and_reserve_are_idempotent(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with stores(kind, redis_url) as (s,):
            lim = D("10")
            first = await s.reserve("key:i", "monthly", lim, D("2"), "r1", NOW)
            again = await s.reserve("key:i", "monthly", lim, D("2"), "r1", NOW)  # a retried call
            assert first.allowed and again.allowed and again.reserved == D("2")
            assert await s.settle("key:i", "monthly", "r1", D("2"), D("1.5"), now=NOW)
            for _ in range(3):
                assert not await s.settle("key:i", "monthly", "r1", D("2"), D("1.5"), now=NOW)
            assert await s.spent("key:i", "monthly", NOW) == D("1.5")
            # settle(actual=0) cancels a reservation.
            await s.reserve("key:i", "monthly", lim, D("3"), "r2", NOW)
            await s.settle("key:i", "monthly", "r2", D("3"), D(0), now=NOW)
            check = await s.reserve("key:i", "monthly", lim, D(0), "probe", NOW)
            assert check.spent == D("1.5") and check.reserved == 0

    asyncio.run(scenario())


def test_dead_reservations_expire_and_late_settles_land(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with stores(kind, redis_url, reservation_ttl=60) as (s,):
            lim = D("1")
            assert (await s.reserve("key:x", "daily", lim, D("5"), "dead", NOW)).allowed
            assert not (await s.reserve("key:x", "daily", lim, D("0.1"), "blocked", NOW + 30)).allowed
            later = await s.reserve("key:x", "daily", lim, D("0.1"), "later", NOW + 61)
            assert later.allowed and later.reserved == D("0.1")
            # A request reserved before midnight settles into the day it was reserved in.
            late = ts(2025, 3, 12, 23, 59, 59)
            dec = await s.reserve("key:x", "daily", lim, D("0.2"), "late", late)
            assert await s.settle(
                "key:x", "daily", "late", D("0.2"), D("0.3"), period_key=dec.period_key, now=late + 5
            )
            assert await s.spent("key:x", "daily", late) == D("0.3")
            assert await s.spent("key:x", "daily", late + 5) == 0

    asyncio.run(scenario())


def test_money_is_exact_beyond_float_precision(kind: str, redis_url: str) -> None:
    """50,000 USD is 5e16 pico-USD, past 2**53: a double could not tell one pico-USD apart."""

    async def scenario() -> None:
        async with stores(kind, redis_url) as (s,):
            lim = D("50000")
            assert (await s.reserve("team:big", "monthly", lim, D("49999.999999999999"), "a", NOW)).allowed
            await s.settle("team:big", "monthly", "a", D(0), D("49999.999999999999"), now=NOW)
            d = await s.reserve("team:big", "monthly", lim, D("0.000000000001"), "b", NOW)
            assert d.allowed and d.remaining == D("0.000000000001") - D("0.000000000001")
            await s.settle("team:big", "monthly", "b", D(0), D("0.000000000001"), now=NOW)
            assert await s.spent("team:big", "monthly", NOW) == lim
            assert not (await s.reserve("team:big", "monthly", lim, D(0), "c", NOW)).allowed

    asyncio.run(scenario())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, 4),
            st.decimals(0, 3, places=12, allow_nan=False, allow_infinity=False),
            st.integers(0, 100),
        ),
        max_size=20,
    ),
    limit=st.decimals(D("0.000000000001"), 5, places=12, allow_nan=False, allow_infinity=False),
)
def test_memory_and_redis_agree(
    redis_url: str, ops: list[tuple[bool, int, Decimal, int]], limit: Decimal
) -> None:
    async def scenario() -> None:
        async with stores("redis", redis_url, reservation_ttl=50) as (red,):
            mem = MemoryBudgetStore(reservation_ttl=50)
            now = NOW
            for is_reserve, rid, amount, step in ops:
                now += step
                if is_reserve:
                    a, b = [
                        await x.reserve("key:p", "30m", limit, amount, f"r{rid}", now) for x in (mem, red)
                    ]
                    assert a == b
                else:
                    a2, b2 = [
                        await x.settle("key:p", "30m", f"r{rid}", amount, amount, now=now) for x in (mem, red)
                    ]
                    assert a2 == b2
                assert await mem.spent("key:p", "30m", now) == await red.spent("key:p", "30m", now)

    asyncio.run(scenario())


@pytest.mark.parametrize("estimates", ["upper-bound", "random"])
def test_overshoot_is_bounded_by_in_flight_cost(kind: str, redis_url: str, estimates: str) -> None:
    """200 concurrent requests over 3 connections against a 1 USD budget.

    ``pending`` holds every request from before its reserve call until its settle returned, a
    superset of what the store had in flight at any instant, so its largest total bounds the
    overshoot. With upper-bound estimates the overshoot is below one request's cost."""

    async def scenario() -> None:
        async with stores(kind, redis_url, n=3) as ss:
            limit = D("1")
            pending: dict[int, Decimal] = {}
            peak = D(0)
            charged: list[Decimal] = []

            async def request(i: int) -> None:
                nonlocal peak
                rng = random.Random(i)
                actual = D(rng.randint(1, 50_000)) / 1_000_000  # up to 0.05 USD
                est = actual if estimates == "upper-bound" else D(rng.randint(0, 50_000)) / 1_000_000
                if estimates == "upper-bound":
                    est += D(rng.randint(0, 10_000)) / 1_000_000
                await asyncio.sleep(rng.uniform(0, 0.1))  # arrivals spread out, overlapping
                pending[i] = actual
                peak = max(peak, sum(pending.values(), D(0)))
                store = ss[i % 3]
                dec = await store.reserve("key:c", "daily", limit, est, f"q{i}")
                if dec.allowed:
                    await asyncio.sleep(rng.uniform(0, 0.01))
                    await store.settle("key:c", "daily", f"q{i}", est, actual, period_key=dec.period_key)
                    charged.append(actual)
                del pending[i]

            await asyncio.gather(*(request(i) for i in range(200)))
            spent = await ss[0].spent("key:c", "daily")
            assert spent == sum(charged, D(0))  # exact: nothing lost, nothing twice
            assert 0 < len(charged) < 200  # 200 requests of ~0.025 USD: the budget ran out
            if estimates == "upper-bound":
                assert spent < limit + max(charged)
            else:
                assert spent < limit + peak

    asyncio.run(scenario())
