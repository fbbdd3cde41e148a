"""Quota leasing: several replicas (LeasingLimiters, each with its own connection) on one real Redis.

What must hold (docs/keys-and-metering.md, "Quota leasing"): no more admitted than the limit (a
slice is counted when granted and ends with its window bucket), unused slice given back, budgets
charged exactly once per request, a dead replica's slices bounded by the TTL, and the router still
answering 429 with Retry-After when a key runs out.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import openai
import pytest
import redis as redis_sync

from kubellm.router.config._schema import LeaseSettings
from kubellm.router.metering._budget import BudgetAsk, BudgetCharge, RedisBudgetStore, period_window
from kubellm.router.metering._lease import LeasingLimiter
from kubellm.router.metering._limits import Admission, LimitRule, Settlement
from kubellm.router.metering._limits_redis import RedisLimiter
from kubellm.router.redis_store import connect
from tests.conftest import UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.redis_server import RedisServer
from tests.support.servers import RouterProcess

PERIOD = "daily"


def synchronously(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """A test of its own event loop (the suite runs no asyncio plugin)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as srv:
        yield srv.url


@asynccontextmanager
async def replicas(url: str, n: int, **settings: Any) -> AsyncIterator[tuple[list[LeasingLimiter], str]]:
    """``n`` leasing limiters, each on its own connection, sharing one key prefix."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    clients = [connect(url) for _ in range(n)]
    lease = LeaseSettings(enabled=True, **settings)
    lims = [
        LeasingLimiter(RedisLimiter(c, prefix, budgets=RedisBudgetStore(c, prefix)), lease) for c in clients
    ]
    try:
        yield lims, prefix
    finally:
        for lim in lims:
            await lim.close()
        for c in clients:
            await c.aclose()


async def window(lim: LeasingLimiter, prefix: str, scope: str) -> tuple[int, int]:
    """The (requests, tokens) Redis counts in the scope's window hash."""
    h = await lim.client.hmget(f"{prefix}lim:{scope}:w", "r", "t")
    return int(h[0] or 0), int(h[1] or 0)


async def budget_state(lim: LeasingLimiter, prefix: str, scope: str) -> tuple[int, int]:
    """(spent, reserved) in pico-USD."""
    key = period_window(PERIOD)[2]
    h = await lim.client.hmget(f"{prefix}budget:{scope}:{key}", "s", "r")
    return int(h[0] or 0), int(h[1] or 0)


def ask(scope: str, limit: str, estimate: str, rid: str) -> BudgetAsk:
    return BudgetAsk(scope, PERIOD, Decimal(limit), Decimal(estimate), rid, time.time())


async def settle(lim: LeasingLimiter, rules: list[LimitRule], adm: Admission, est: int, actual: int) -> None:
    items = [Settlement(rules, adm.lease_id, est, actual, adm.window_start)]
    if adm.budget is not None:
        rid = adm.lease_id.split(":")[0]
        charge = BudgetCharge(
            rules[0].scope, PERIOD, rid, Decimal("0.0002"), adm.budget.period_key, time.time()
        )
        items.append(Settlement((), rid, 0, 0, 0.0, charge))
    await lim.settle_many(items)


@synchronously
async def test_leasing_admits_locally_and_counts_exactly(redis_url: str) -> None:
    async with replicas(redis_url, 1) as (lims, prefix):
        lim = lims[0]
        rules = [LimitRule("key:a", rpm=10_000, tpm=10_000_000), LimitRule("deployment:d", rpm=50_000)]
        for i in range(200):
            adm = await lim.acquire(rules, 100, f"r{i}:d")
            assert adm.allowed
            await settle(lim, rules, adm, 100, 40)
        assert lim.leases <= 20  # about one per slice, not one per request
        assert adm.headers["x-ratelimit-limit-requests"] == "10000"
        await lim.close()
        # Unused slice given back, corrections applied: the window holds exactly what was admitted.
        assert await window(lim, prefix, "key:a") == (200, 200 * 40)
        assert (await window(lim, prefix, "deployment:d"))[0] == 200


@synchronously
async def test_replicas_never_admit_more_than_the_limit(redis_url: str) -> None:
    rpm, tpm, est = 400, 400 * 50, 50
    async with replicas(redis_url, 3, max_fraction=0.2) as (lims, prefix):
        rules = [LimitRule("key:shared", rpm=rpm, tpm=tpm)]
        admitted = [0, 0, 0]
        stop = time.monotonic() + 2.5  # a couple of buckets: slices end and are given back

        async def worker(i: int, w: int) -> None:
            n = 0
            while time.monotonic() < stop:
                n += 1
                adm = await lims[i].acquire(rules, est, f"{i}-{w}-{n}")
                if adm.allowed:
                    admitted[i] += 1
                    await settle(lims[i], rules, adm, est, est)
                else:
                    assert adm.retry_after is not None and adm.retry_after > 0
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker(i, w) for i in range(3) for w in range(8)))
        for lim in lims:
            await lim.close()
        total = sum(admitted)
        assert total <= rpm  # exact: never above the limit
        # Slices held by one replica and given back at their bucket's end are admitted by others.
        assert total >= rpm - 3 * round(0.2 * rpm) / 4
        assert await window(lims[0], prefix, "key:shared") == (total, total * est)
        assert sum(lim.leases for lim in lims) < total / 2


@synchronously
async def test_tpm_slice_is_admitted_and_corrected(redis_url: str) -> None:
    async with replicas(redis_url, 2, max_fraction=0.5) as (lims, prefix):
        rules = [LimitRule("key:t", tpm=10_000)]
        ok = 0
        for i in range(400):
            adm = await lims[i % 2].acquire(rules, 100, f"r{i}")
            if adm.allowed:
                ok += 1
                await settle(lims[i % 2], rules, adm, 100, 30 + i % 7)
        for lim in lims:
            await lim.close()
        used = await window(lims[0], prefix, "key:t")
        assert used[1] <= 10_000 + 100  # settled usage below the estimates frees room, never more
        assert ok > 100  # corrections below the estimate let more than tpm/estimate in


@synchronously
async def test_expired_slice_returns_its_capacity(redis_url: str) -> None:
    async with replicas(redis_url, 1, max_fraction=0.5, ttl_seconds=0.3) as (lims, prefix):
        lim = lims[0]
        rules = [LimitRule("key:e", rpm=1000)]
        adm = await lim.acquire(rules, 0, "one")
        assert adm.allowed
        granted = (await window(lim, prefix, "key:e"))[0]
        assert granted > 1  # the whole slice counts from the moment it is granted
        await asyncio.sleep(0.6)  # the returner gives the unused part back once the slice ends
        assert (await window(lim, prefix, "key:e"))[0] == 1


@synchronously
async def test_budget_leases_charge_each_request_exactly_once(redis_url: str) -> None:
    limit, worst = "0.05", "0.001"  # at most 50 worst cases; each call actually costs $0.0002
    async with replicas(redis_url, 3, max_fraction=0.3) as (lims, prefix):
        rules = [LimitRule("key:b", rpm=100_000)]
        admitted = 0

        async def worker(i: int) -> None:
            nonlocal admitted
            for n in range(120):
                rid = f"b{i}-{n}"
                adm = await lims[i % 3].acquire(rules, 10, f"{rid}:d", budget=ask("key:b", limit, worst, rid))
                if adm.allowed:
                    admitted += 1
                    await asyncio.sleep(random.random() * 0.01)
                    await settle(lims[i % 3], rules, adm, 10, 10)

        await asyncio.gather(*(worker(i) for i in range(6)))
        for lim in lims:
            await lim.close()
        spent, reserved = await budget_state(lims[0], prefix, "key:b")
        assert reserved == 0  # every slice and in-flight worst case released
        assert spent == admitted * 200_000_000  # $0.0002 in pico, once per request
        assert spent <= 50_000_000_000  # never above the budget: slices are carved out of it
        assert admitted >= 200  # actual costs are below the worst case: the freed rest is reused


@synchronously
async def test_dead_replica_holds_budget_no_longer_than_the_ttl(redis_url: str) -> None:
    async with replicas(redis_url, 2, ttl_seconds=0.5, max_fraction=0.5) as (lims, prefix):
        dead, alive = lims
        rules = [LimitRule("key:d", rpm=100_000)]
        adm = await dead.acquire(rules, 1, "x:d", budget=ask("key:d", "1", "0.01", "x"))
        assert adm.allowed
        # The replica dies: no settlement, no return (its returner stops with it).
        assert dead._returner is not None
        dead._returner.cancel()
        dead._slices.clear()
        dead._budgets.clear()
        _, held = await budget_state(dead, prefix, "key:d")
        assert held >= 20_000_000_000  # its slice: at least min_slice worst cases
        await asyncio.sleep(0.7)
        adm = await alive.acquire(rules, 1, "y:d", budget=ask("key:d", "1", "0.01", "y"))
        assert adm.allowed
        _, held_now = await budget_state(alive, prefix, "key:d")
        mine = alive._budgets[("key:d", period_window(PERIOD)[2])].granted
        assert held_now == mine  # the dead replica's hold expired; only the live slice is held
        # Its rpm slice counts as used (it may have been): at most one slice above what it admitted.
        used = (await window(alive, prefix, "key:d"))[0]
        assert used <= 1 + round(0.5 * 100_000) + alive._slices["key:d"].granted_requests


@synchronously
async def test_small_limits_fall_back_to_exact_admission(redis_url: str) -> None:
    async with replicas(redis_url, 2) as (lims, prefix):
        rules = [LimitRule("key:small", rpm=10)]  # 10% of 10 is one request: below min_slice
        results = [await lims[i % 2].acquire(rules, 0, f"s{i}") for i in range(14)]
        assert [a.allowed for a in results] == [True] * 10 + [False] * 4
        assert all(a.retry_after and a.retry_after > 0 for a in results[10:])
        assert not lims[0]._slices and not lims[1]._slices
        assert (await window(lims[0], prefix, "key:small"))[0] == 10


def test_router_with_leasing_still_answers_429_with_retry_after(
    redis_url: str, fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]
) -> None:
    prefix = f"e{uuid.uuid4().hex[:6]}:"
    config = {
        "deployments": [
            openai_deployment(
                fake_openai,
                name="dep",
                limits={"rpm": 100_000},
                pricing={"inputPerMillion": "1", "outputPerMillion": "2"},
            )
        ],
        "keys": [
            {
                "name": "hot",
                "keyEnv": "HOT_KEY",
                "limits": {"rpm": 40},
                "budget": {"amountUsd": "100", "period": "daily"},
            },
        ],
        "settings": {
            "numRetries": 0,
            "redis": {"url": redis_url, "keyPrefix": prefix},
            "leasing": {"enabled": True, "maxFraction": 0.5, "ttlSeconds": 30},
        },
    }
    key = "sk-hot-0123456789abcdef"
    routers = [
        start_router(config, env={"HOT_KEY": key, "TEST_UPSTREAM_KEY": UPSTREAM_KEY}) for _ in range(2)
    ]
    before = fake_openai.calls
    ok, limited = 0, []
    held_key = f"{prefix}budget:key:hot:{period_window(PERIOD)[2]}:held"
    held: list[bytes] = []
    for i in range(50):
        if i == 10:  # the budget is admitted from leased slices (a hold per replica), not per request
            held = redis_sync.Redis.from_url(redis_url).hkeys(held_key)
        client = openai.OpenAI(base_url=routers[i % 2].v1, api_key=key, max_retries=0)
        try:
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            ok += 1
        except openai.RateLimitError as exc:
            limited.append(exc.response)
    assert held and all(h.startswith(b"lease:") for h in held)
    assert ok <= 40 and ok + len(limited) == 50
    assert len(limited) >= 10
    assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in limited)
    assert fake_openai.calls - before == ok


@synchronously
async def test_a_charge_applied_before_counts_once(redis_url: str) -> None:
    async with replicas(redis_url, 1) as (lims, prefix):
        lim = lims[0]
        rules = [LimitRule("key:once", rpm=100_000)]
        adms = []
        for rid in ("p", "q"):
            adm = await lim.acquire(rules, 1, f"{rid}:d", budget=ask("key:once", "1", "0.001", rid))
            assert adm.allowed and adm.budget is not None
            adms.append(adm)
        # The meter applied "p"'s charge already (an earlier batch failed after Redis ran it, say).
        store = lim.inner.budgets
        assert store is not None
        key = adms[0].budget.period_key if adms[0].budget else ""
        await store.settle("key:once", PERIOD, "p", Decimal(0), Decimal("0.0002"), period_key=key)
        # One batch: "p" again and "q" new, then both once more (no longer leased: the exact path).
        charges = [
            Settlement(
                (), rid, 0, 0, 0.0, BudgetCharge("key:once", PERIOD, rid, Decimal("0.0002"), key, time.time())
            )
            for rid in ("p", "q")
        ]
        await lim.settle_many(charges)
        await lim.settle_many(charges)
        await lim.close()
        spent, _ = await budget_state(lim, prefix, "key:once")
        assert spent == 2 * 200_000_000  # p and q once each, whatever was retried


@synchronously
async def test_ledger_day_totals_stay_exact_across_the_fast_sum(redis_url: str) -> None:
    """The ledger script adds costs with doubles below 10^15 pico-USD and digit by digit above."""
    from kubellm.router.metering._ledger import RedisLedger, UsageRecord

    client = connect(redis_url)
    prefix = f"l{uuid.uuid4().hex[:6]}:"
    ledger = RedisLedger(client, f"{prefix}ledger", prefix=prefix)
    day = 86400 * (int(time.time()) // 86400)
    costs = [Decimal("999.999999999999"), Decimal("999.999999999999"), Decimal("4000.000000000001")]
    costs += [Decimal("0.000000000001")] * 3 + [Decimal("9000.000000000003")] * 2
    records = [
        UsageRecord(
            id=f"r{i}", ts=day + 10 + i, request_id=f"r{i}", key="k", model_group="g", deployment="d", cost=c
        )
        for i, c in enumerate(costs)
    ]
    await ledger.write(records[:4])
    await ledger.write(records[4:])
    totals = await ledger.aggregate(day, day + 86400)
    await client.aclose()
    assert totals["k"].cost == sum(costs)  # 24000.000000000008: past 2^53 pico, to the pico
    assert totals["k"].requests == len(costs)


@synchronously
async def test_a_settlement_after_its_slice_ended_corrects_its_bucket(redis_url: str) -> None:
    async with replicas(redis_url, 1, max_fraction=0.5) as (lims, prefix):
        lim = lims[0]
        rules = [LimitRule("key:late", tpm=100_000)]
        adms = [await lim.acquire(rules, 500, f"r{i}") for i in range(3)]
        assert all(a.allowed for a in adms)
        await asyncio.sleep(1.2)  # the slice ended with its bucket and was given back
        assert await window(lim, prefix, "key:late") == (0, 3 * 500)
        for adm in adms:
            await settle(lim, [*rules], adm, 500, 120)
        await lim.close()
        assert await window(lim, prefix, "key:late") == (0, 3 * 120)
