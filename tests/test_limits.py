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

from kubellm.router._limits import (
    Admission,
    Limiter,
    LimitRule,
    MemoryLimiter,
    RedisLimiter,
    format_reset,
)
from kubellm.router._redis import connect
from tests.support.redis_server import RedisServer

T0 = 1_700_000_080.0  # 40 s into an epoch minute
W0 = 1_700_000_040.0


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
            assert got[0].headers == {
                "x-ratelimit-limit-requests": "5",
                "x-ratelimit-remaining-requests": "4",
                "x-ratelimit-reset-requests": "20s",
            }
            assert got[4].headers["x-ratelimit-remaining-requests"] == "0"
            assert got[5].denied_by == "key:a rpm"
            assert got[5].retry_after == pytest.approx(20.0)
            assert got[0].window_start == W0
            nxt = await lim.acquire(rules, 0, "next", now=T0 + 20)  # the next minute
            assert nxt.allowed and nxt.window_start == W0 + 60

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
            # A window with nothing counted admits one request even above tpm (no starvation).
            big = await lim.acquire(rules, 500, "big", now=T0 + 60)
            assert big.allowed
            assert not (await lim.acquire(rules, 1, "small", now=T0 + 61)).allowed
            # A settle after its window ended leaves the new window alone.
            await lim.settle(rules, "c", 40, 0, a.window_start)
            assert (await lim.headroom(rules, now=T0 + 61))["key:t"].tpm_left == 0

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
        st.floats(0, 3),  # time step
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
    per_window: dict[float, int] = {}
    for w in admitted:
        per_window[w] = per_window.get(w, 0) + 1
    assert all(n <= 60 for n in per_window.values()), per_window
    assert len(admitted) >= 60
    assert 1 <= peak.value <= 5


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
