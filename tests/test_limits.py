"""Admission control: the same semantics in memory and on a real Redis, and exact bounds under
concurrency (many tasks, several connections, several OS processes)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.router.metering._limits import (
    Admission,
    Limiter,
    LimitRule,
    MemoryLimiter,
    Settlement,
    format_reset,
)
from kubellm.router.metering._limits_redis import RedisLimiter
from kubellm.router.redis_store import connect
from tests.support.redis_server import RedisServer

T0 = 1_700_000_080.0  # 40 s into an epoch minute
MINUTE = 1_700_000_100.0  # an epoch minute boundary


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as srv:
        yield srv.url


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def limiters(kind: str, url: str, n: int = 1, lease_ttl: float = 30.0) -> AsyncIterator[list[Limiter]]:
    """``n`` limiters sharing one state: one memory limiter, or ``n`` Redis connections."""
    if kind == "memory":
        shared = MemoryLimiter(lease_ttl=lease_ttl)
        yield [shared] * n
        return
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    clients = [connect(url) for _ in range(n)]
    try:
        yield [RedisLimiter(c, prefix=prefix, lease_ttl=lease_ttl) for c in clients]
    finally:
        for c in clients:
            await c.aclose()


def test_format_reset_matches_openai() -> None:
    assert format_reset(0.02) == "20ms"
    assert format_reset(1) == "1s"
    assert format_reset(360) == "6m0s"
    assert format_reset(19.5) == "19.5s"
    assert format_reset(3723.25) == "1h2m3.25s"


def test_rpm_is_exact_per_window(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with limiters(kind, redis_url) as (lim,):
            rules = [LimitRule("key:a", rpm=5)]
            got = [await lim.acquire(rules, 0, f"l{i}", now=T0) for i in range(8)]
            assert [a.allowed for a in got] == [True] * 5 + [False] * 3
            # A sliding window: T0's admissions count until the end of bucket T0 + 60 s.
            assert got[0].headers == {
                "x-ratelimit-limit-requests": "5",
                "x-ratelimit-remaining-requests": "4",
                "x-ratelimit-reset-requests": "1m1s",
            }
            assert got[4].headers["x-ratelimit-remaining-requests"] == "0"
            assert got[5].denied_by == "key:a rpm"
            assert got[5].retry_after == pytest.approx(61.0)
            assert got[0].window_start == T0
            later = await lim.acquire(rules, 0, "later", now=T0 + 20)  # the next clock minute
            assert not later.allowed and later.retry_after == pytest.approx(41.0)
            assert not (await lim.acquire(rules, 0, "nearly", now=T0 + 60.999)).allowed
            nxt = await lim.acquire(rules, 0, "next", now=T0 + 61)
            assert nxt.allowed and nxt.window_start == T0 + 61
            assert nxt.headers["x-ratelimit-remaining-requests"] == "4"

    asyncio.run(scenario())


def test_tpm_reserves_then_settles(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with limiters(kind, redis_url) as (lim,):
            rules = [LimitRule("key:t", tpm=100)]
            a = await lim.acquire(rules, 40, "a", now=T0)
            b = await lim.acquire(rules, 40, "b", now=T0)
            c = await lim.acquire(rules, 40, "c", now=T0)
            assert (a.allowed, b.allowed, c.allowed) == (True, True, False)
            assert c.denied_by == "key:t tpm"
            assert b.headers["x-ratelimit-remaining-tokens"] == "20"
            await lim.settle(rules, "a", 40, 10, a.window_start)  # used 10 of 40: 50 counted
            await lim.settle(rules, "a", 40, 10, a.window_start)  # repeated: changes nothing
            assert (await lim.headroom(rules, now=T0))["key:t"].tpm_left == 50
            assert (await lim.acquire(rules, 40, "c", now=T0)).allowed
            await lim.settle(rules, "b", 40, 95, b.window_start)  # under-estimated: 145 counted
            assert (await lim.headroom(rules, now=T0))["key:t"].tpm_left == 0
            # Still counted 60.5 s later (sliding), gone once T0's bucket leaves the window.
            assert not (await lim.acquire(rules, 1, "early", now=T0 + 60.5)).allowed
            # A window with nothing counted admits one request even above tpm (no starvation).
            big = await lim.acquire(rules, 500, "big", now=T0 + 61)
            assert big.allowed
            small = await lim.acquire(rules, 1, "small", now=T0 + 62)
            assert not small.allowed and small.retry_after == pytest.approx(60.0)
            # A settle after its bucket left the window leaves the window alone.
            await lim.settle(rules, "c", 40, 0, a.window_start)
            assert (await lim.headroom(rules, now=T0 + 62))["key:t"].tpm_left == 0

    asyncio.run(scenario())


def test_no_60s_interval_exceeds_rpm_across_a_minute_boundary(kind: str, redis_url: str) -> None:
    """The straddle: a burst just before a clock minute and one just after reach the limit once."""

    async def scenario() -> None:
        async with limiters(kind, redis_url, n=3) as lims:
            rules = [LimitRule("key:straddle", rpm=60)]
            before = [await lims[i % 3].acquire(rules, 0, f"b{i}", now=MINUTE - 0.2) for i in range(60)]
            after = [await lims[i % 3].acquire(rules, 0, f"a{i}", now=MINUTE + 0.2) for i in range(60)]
            assert all(a.allowed for a in before)
            assert not any(a.allowed for a in after)  # a fixed minute window would admit all 60
            # The next slot opens when the bucket of MINUTE - 0.2 leaves: at MINUTE - 1 + 61.
            assert after[0].retry_after == pytest.approx(59.8)
            assert after[0].headers["x-ratelimit-reset-requests"] == "59.8s"
            assert not (await lims[1].acquire(rules, 0, "x", now=MINUTE + 59.99)).allowed
            reopened = [await lims[i % 3].acquire(rules, 0, f"c{i}", now=MINUTE + 60) for i in range(61)]
            assert [a.allowed for a in reopened] == [True] * 60 + [False]

            # Spread admissions: every 60 s interval holds at most rpm, checked against each admission.
            spread = [LimitRule("key:spread", rpm=10)]
            times: list[float] = []
            t = MINUTE - 30.0
            while t < MINUTE + 150:
                if (await lims[int(t) % 3].acquire(spread, 0, f"s{t}", now=t)).allowed:
                    times.append(t)
                t += 0.7
            assert all(sum(1 for u in times if s <= u < s + 60) <= 10 for s in times)
            assert len(times) >= 30  # not starved: about rpm per 61 s

    asyncio.run(scenario())


def test_tpm_slides_and_retry_after_names_the_freeing_bucket(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with limiters(kind, redis_url, n=2) as (one, two):
            rules = [LimitRule("key:tslide", tpm=100)]
            assert (await one.acquire(rules, 30, "a", now=MINUTE - 10.5)).allowed
            assert (await two.acquire(rules, 30, "b", now=MINUTE - 5.5)).allowed
            assert (await one.acquire(rules, 30, "c", now=MINUTE + 0.5)).allowed
            # 90 counted; 30 more needs 20 freed: a's bucket (MINUTE - 11) leaves at MINUTE + 50.
            denied = await two.acquire(rules, 30, "d", now=MINUTE + 1)
            assert not denied.allowed and denied.denied_by == "key:tslide tpm"
            assert denied.retry_after == pytest.approx(49.0)
            # 70 more needs 60 freed: a's and b's buckets, the latter leaves at MINUTE + 55.
            assert (await one.acquire(rules, 70, "e", now=MINUTE + 1)).retry_after == pytest.approx(54.0)
            assert not (await two.acquire(rules, 30, "d", now=MINUTE + 49.9)).allowed
            assert (await two.acquire(rules, 30, "d", now=MINUTE + 50)).allowed
            room = (await one.headroom(rules, now=MINUTE + 50))["key:tslide"]
            assert room.tpm_left == 100 - 30 - 30 - 30 and room.reset_in == pytest.approx(5.0)

    asyncio.run(scenario())


def test_a_denial_records_nothing(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with limiters(kind, redis_url) as (lim,):
            rules = [
                LimitRule("key:k", rpm=10, tpm=1000, max_parallel=10),
                LimitRule("deployment:d", max_parallel=1),
            ]
            first = await lim.acquire(rules, 100, "one", now=T0)
            assert first.allowed
            for i in range(5):
                denied = await lim.acquire(rules, 100, f"x{i}", now=T0)
                assert not denied.allowed and denied.denied_by == "deployment:d parallel"
            room = await lim.headroom(rules, now=T0)
            assert room["key:k"].rpm_left == 9 and room["key:k"].tpm_left == 900
            assert room["key:k"].parallel_left == 9 and room["deployment:d"].parallel_left == 0
            assert room["deployment:d"].rpm_left is None
            await lim.release(rules, "one")
            assert (await lim.acquire(rules, 100, "two", now=T0)).allowed

    asyncio.run(scenario())


def test_leases_expire_and_renew(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with limiters(kind, redis_url, lease_ttl=1.0) as (lim,):
            rules = [LimitRule("deployment:p", max_parallel=2)]
            assert (await lim.acquire(rules, 0, "a", now=T0)).allowed
            assert (await lim.acquire(rules, 0, "b", now=T0 + 0.5)).allowed
            assert not (await lim.acquire(rules, 0, "c", now=T0 + 0.9)).allowed
            assert await lim.renew(rules, "b", now=T0 + 1.2)  # b now lives until T0 + 2.2
            # "a" was never released (its holder died): it frees itself after the ttl.
            assert (await lim.acquire(rules, 0, "c", now=T0 + 1.01)).allowed
            assert not (await lim.acquire(rules, 0, "d", now=T0 + 1.9)).allowed
            assert not await lim.renew(rules, "a", now=T0 + 1.9)  # lost, and not re-added
            assert (await lim.acquire(rules, 0, "d", now=T0 + 2.05)).allowed  # c expired
            assert (await lim.headroom(rules, now=T0 + 2.1))["deployment:p"].parallel_left == 0

    asyncio.run(scenario())


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "settle", "renew", "release", "headroom"]),
        st.integers(0, 5),  # lease
        st.integers(0, 60),  # estimate / actual
        st.one_of(st.floats(0, 3), st.floats(20, 70)),  # time step: leases expire, buckets leave
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, rpm=st.integers(1, 6), tpm=st.integers(1, 120), par=st.integers(1, 3))
def test_memory_and_redis_agree(
    redis_url: str, ops: list[tuple[str, int, int, float]], rpm: int, tpm: int, par: int
) -> None:
    rules = [LimitRule("key:h", rpm=rpm, tpm=tpm), LimitRule("deployment:h", tpm=tpm * 2, max_parallel=par)]

    async def scenario() -> None:
        async with limiters("redis", redis_url, lease_ttl=2.0) as (red,):
            mem = MemoryLimiter(lease_ttl=2.0)
            now = T0 + 15
            windows: dict[int, float] = {}
            for op, lease, tokens, step in ops:
                now += step
                lid = f"l{lease}"
                if op == "acquire":
                    a, b = [await x.acquire(rules, tokens, lid, now=now) for x in (mem, red)]
                    assert a == b
                    if a.allowed:
                        windows[lease] = a.window_start
                elif op == "settle":
                    for x in (mem, red):
                        await x.settle(rules, lid, 20, tokens, windows.get(lease, 0.0))
                elif op == "renew":
                    assert await mem.renew(rules, lid, now=now) == await red.renew(rules, lid, now=now)
                elif op == "release":
                    for x in (mem, red):
                        await x.release(rules, lid)
                assert await mem.headroom(rules, now=now) == await red.headroom(rules, now=now)

    asyncio.run(scenario())


def test_200_tasks_on_3_connections_never_exceed_limits(kind: str, redis_url: str) -> None:
    async def scenario() -> None:
        async with limiters(kind, redis_url, n=3) as lims:
            rpm_rules = [LimitRule("key:burst", rpm=50)]
            results = await asyncio.gather(*(lims[i % 3].acquire(rpm_rules, 0, f"r{i}") for i in range(200)))
            per_window: dict[float, int] = {}
            for a in results:
                if a.allowed:
                    per_window[a.window_start] = per_window.get(a.window_start, 0) + 1
            assert all(n <= 50 for n in per_window.values()), per_window
            assert sum(per_window.values()) >= 50  # exact: nothing admitted is lost either

            rules = [LimitRule("key:burst2", tpm=10**9), LimitRule("deployment:par", max_parallel=7)]
            state = {"in_flight": 0, "max": 0, "done": 0}

            async def worker(i: int) -> None:
                lim, rng = lims[i % 3], random.Random(i)
                for j in range(2):
                    while True:
                        adm = await lim.acquire(rules, 10, f"p{i}-{j}")
                        if adm.allowed:
                            break
                        assert adm.denied_by == "deployment:par parallel"
                        await asyncio.sleep(rng.uniform(0.01, 0.04))
                    state["in_flight"] += 1
                    state["max"] = max(state["max"], state["in_flight"])
                    await asyncio.sleep(rng.uniform(0.001, 0.006))
                    state["in_flight"] -= 1
                    state["done"] += 1
                    await lim.settle(rules, f"p{i}-{j}", 10, 5, adm.window_start)

            await asyncio.gather(*(worker(i) for i in range(200)))
            assert state["done"] == 400
            assert state["max"] == 7  # reached, never exceeded
            assert (await lims[0].headroom(rules))["deployment:par"].parallel_left == 7

    asyncio.run(scenario())


# ---------------------------------------------------------------- several OS processes

MP_RULES = [LimitRule("key:mp", rpm=60), LimitRule("deployment:mp", max_parallel=5)]


def _process_worker(
    url: str, prefix: str, n_tasks: int, lock: Any, in_flight: Any, peak: Any, out: Any
) -> None:
    async def main() -> list[float]:
        client = connect(url)
        lim = RedisLimiter(client, prefix=prefix)
        admitted: list[float] = []

        async def task(i: int) -> None:
            lease = f"{os.getpid()}-{i}"
            while True:
                adm: Admission = await lim.acquire(MP_RULES, 0, lease)
                if adm.allowed:
                    break
                if adm.denied_by == "key:mp rpm":
                    return
                await asyncio.sleep(0.002)
            admitted.append(adm.window_start)
            with lock:
                in_flight.value += 1
                peak.value = max(peak.value, in_flight.value)
            await asyncio.sleep(0.005)
            with lock:
                in_flight.value -= 1
            await lim.release(MP_RULES, lease)

        await asyncio.gather(*(task(i) for i in range(n_tasks)))
        await client.aclose()
        return admitted

    out.put(asyncio.run(main()))


def _hold_lease_forever(url: str, prefix: str, ready: Any) -> None:
    async def main() -> None:
        client = connect(url)
        lim = RedisLimiter(client, prefix=prefix, lease_ttl=0.5)
        adm = await lim.acquire([LimitRule("deployment:dead", max_parallel=1)], 0, "doomed")
        ready.put(adm.allowed)
        await asyncio.sleep(3600)

    asyncio.run(main())


def test_three_processes_never_exceed_limits(redis_url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    lock, in_flight, peak = ctx.Lock(), ctx.Value("i", 0, lock=False), ctx.Value("i", 0, lock=False)
    out = ctx.Queue()
    prefix = f"mp{uuid.uuid4().hex[:8]}:"
    procs = [
        ctx.Process(target=_process_worker, args=(redis_url, prefix, 40, lock, in_flight, peak, out))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    admitted = [w for _ in procs for w in out.get(timeout=30)]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    # Sliding windows: the run lasts far less than 60 s, so exactly rpm were admitted, whatever
    # clock minute boundary it crossed.
    assert len(admitted) == 60
    assert 1 <= peak.value <= 5


def _straddle_worker(url: str, prefix: str, go: Any, out: Any) -> None:
    async def main() -> list[bool]:
        client = connect(url)
        lim = RedisLimiter(client, prefix=prefix)
        rules = [LimitRule("key:3r", rpm=60)]
        go.wait()
        got = []
        for i, t in enumerate([MINUTE - 0.3] * 30 + [MINUTE + 0.3] * 30):
            got.append((await lim.acquire(rules, 0, f"{os.getpid()}-{i}", now=t)).allowed)
        await client.aclose()
        return got

    out.put(asyncio.run(main()))


def test_three_processes_straddling_a_minute_admit_rpm_once(redis_url: str) -> None:
    """Three routers' limiters on one Redis, 180 requests around a minute boundary, rpm 60."""
    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    prefix = f"st{uuid.uuid4().hex[:8]}:"
    procs = [ctx.Process(target=_straddle_worker, args=(redis_url, prefix, go, out)) for _ in range(3)]
    for p in procs:
        p.start()
    go.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert sum(a for r in results for a in r) == 60


def test_a_killed_holder_frees_its_slot(redis_url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Queue()
    prefix = f"dead{uuid.uuid4().hex[:8]}:"
    holder = ctx.Process(target=_hold_lease_forever, args=(redis_url, prefix, ready))
    holder.start()
    try:
        assert ready.get(timeout=30) is True
    finally:
        holder.kill()
        holder.join(5)

    async def scenario() -> None:
        client = connect(redis_url)
        lim = RedisLimiter(client, prefix=prefix, lease_ttl=0.5)
        rules = [LimitRule("deployment:dead", max_parallel=1)]
        assert not (await lim.acquire(rules, 0, "mine")).allowed
        await asyncio.sleep(0.6)
        assert (await lim.acquire(rules, 0, "mine")).allowed
        await client.aclose()

    asyncio.run(scenario())


def test_scripts_survive_a_script_cache_flush(redis_url: str) -> None:
    async def scenario() -> None:
        client = connect(redis_url)
        lim = RedisLimiter(client, prefix=f"nos{uuid.uuid4().hex[:8]}:")
        rules = [LimitRule("key:n", rpm=2)]
        assert (await lim.acquire(rules, 0, "a", now=T0)).allowed
        await client.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
        assert (await lim.acquire(rules, 0, "b", now=T0)).allowed
        assert not (await lim.acquire(rules, 0, "c", now=T0)).allowed
        await client.aclose()

    asyncio.run(scenario())


# ---------------------------------------------------------------- limits and budget in one step

_FUSED_OPS = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "acquire", "settle"]),
        st.integers(0, 5),  # request
        st.integers(0, 40),  # estimate / actual (tokens, and cents of cost)
        st.one_of(st.floats(0, 3), st.floats(20, 70)),  # time step
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_FUSED_OPS, rpm=st.integers(1, 6), tpm=st.integers(1, 120), budget=st.integers(1, 100))
def test_fused_admission_and_batched_settlement_agree(
    redis_url: str, ops: list[tuple[str, int, int, float]], rpm: int, tpm: int, budget: int
) -> None:
    """A request's limits and its budget reservation are one atomic step (a denial by either
    records nothing), and a batch of settlements applies each lease and charge once."""
    from decimal import Decimal

    from kubellm.router.metering._budget import BudgetAsk, BudgetCharge, MemoryBudgetStore, RedisBudgetStore

    rules = [LimitRule("key:f", rpm=rpm, tpm=tpm), LimitRule("deployment:f", max_parallel=2)]
    limit = Decimal(budget) / 100

    async def scenario() -> None:
        client = connect(redis_url)
        prefix = f"f{uuid.uuid4().hex[:8]}:"
        rbud = RedisBudgetStore(client, prefix=prefix)
        mbud = MemoryBudgetStore()
        pair = [MemoryLimiter(lease_ttl=2.0, budgets=mbud), RedisLimiter(client, prefix, 2.0, budgets=rbud)]
        now = T0 + 15
        held: dict[int, tuple[float, str]] = {}
        try:
            for op, req, amount, step in ops:
                now += step
                rid = f"r{req}"
                if op == "acquire":
                    ask = BudgetAsk("key:f", "daily", limit, Decimal(amount) / 100, rid, now)
                    a, b = [await x.acquire(rules, amount, rid, now=now, budget=ask) for x in pair]
                    assert a == b
                    assert a.budget is not None and (a.allowed or a.denied_scopes or not a.budget.allowed)
                    if a.allowed:
                        held[req] = (a.window_start, a.budget.period_key)
                elif req in held:
                    window, key = held.pop(req)
                    charge = BudgetCharge("key:f", "daily", rid, Decimal(amount) / 100, key, now)
                    lease = Settlement(rules, rid, 20, amount, window)
                    batch = [lease, Settlement((), rid, 0, 0, 0.0, charge)]
                    for x in pair:
                        await x.settle_many(batch)
                        await x.settle_many(batch)  # a resent batch changes nothing
                assert await pair[0].headroom(rules, now=now) == await pair[1].headroom(rules, now=now)
                assert await mbud.spent("key:f", "daily", now) == await rbud.spent("key:f", "daily", now)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_budget_denial_records_no_limit_and_a_limit_denial_reserves_nothing(
    kind: str, redis_url: str
) -> None:
    from decimal import Decimal

    from kubellm.router.metering._budget import BudgetAsk, MemoryBudgetStore, RedisBudgetStore

    async def scenario() -> None:
        client = connect(redis_url)
        prefix = f"d{uuid.uuid4().hex[:8]}:"
        bud = MemoryBudgetStore() if kind == "memory" else RedisBudgetStore(client, prefix=prefix)
        lim: Limiter = (
            MemoryLimiter(budgets=bud)
            if isinstance(bud, MemoryBudgetStore)
            else RedisLimiter(client, prefix, budgets=bud)
        )
        rules = [LimitRule("key:x", rpm=2), LimitRule("deployment:x", max_parallel=1)]

        def ask(rid: str, usd: str) -> BudgetAsk:
            return BudgetAsk("key:x", "daily", Decimal("1"), Decimal(usd), rid, T0)

        first = await lim.acquire(rules, 0, "a", now=T0, budget=ask("a", "1.5"))  # crosses the budget
        assert first.allowed and first.budget is not None and first.budget.reserved == Decimal("1.5")
        over = await lim.acquire([rules[0]], 0, "b", now=T0, budget=ask("b", "0.1"))
        assert not over.allowed and over.denied_scopes == () and over.budget is not None
        assert not over.budget.allowed
        assert (await lim.headroom(rules, now=T0))["key:x"].rpm_left == 1  # b was not counted
        busy = await lim.acquire(rules, 0, "c", now=T0, budget=ask("c", "0"))
        assert not busy.allowed and busy.denied_scopes == ("deployment:x",)
        assert busy.budget is not None and busy.budget.reserved == Decimal("1.5")  # c reserved nothing
        await client.aclose()

    asyncio.run(scenario())


def test_concurrent_acquires_share_one_script_and_stay_exact(redis_url: str) -> None:
    async def scenario() -> None:
        async with limiters("redis", redis_url) as (lim,):
            client = lim.client  # type: ignore[attr-defined]

            async def scripts() -> int:
                stats = await client.info("commandstats")
                return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))

            rules = [LimitRule("key:batch", rpm=25, max_parallel=40)]
            await lim.acquire([LimitRule("key:warm", rpm=1)], 0, "w", now=T0)  # load the scripts
            await lim.acquire([LimitRule("key:warm", rpm=1)], 0, "x", now=T0)
            before = await scripts()
            got = await asyncio.gather(*(lim.acquire(rules, 0, f"c{i}", now=T0) for i in range(30)))
            used = await scripts() - before
            assert [a.allowed for a in got] == [True] * 25 + [False] * 5  # in order, as if one by one
            assert [a.headers["x-ratelimit-remaining-requests"] for a in got[:3]] == ["24", "23", "22"]
            assert used <= 2, used  # one batch (two when the many-script is loaded first)

    asyncio.run(scenario())
