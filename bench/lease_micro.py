#!/usr/bin/env python3
"""Redis CPU per admission of one leasing limiter, in-process, without the router or its ledger.

Starts a ``redis-server`` on loopback, admits 20,000 requests for a key and a deployment (rpm/tpm),
with and without a daily budget, settling them in batches, and prints Redis main-thread CPU per
admission (``INFO cpu``, before and after) and the lease scripts sent.

    python bench/lease_micro.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis as redis_sync

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubellm.router.config._schema import LeaseSettings
from kubellm.router.metering._budget import BudgetAsk, BudgetCharge, RedisBudgetStore
from kubellm.router.metering._lease import LeasingLimiter
from kubellm.router.metering._limits import LimitRule, Settlement
from kubellm.router.metering._limits_redis import RedisLimiter
from kubellm.router.redis_store import connect
from tests.support.redis_server import RedisServer

N = 20_000


def cpu_us(client: Any) -> float:
    info = client.info("cpu")
    return (float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])) * 1e6


async def run(url: str, budget: bool, batch: int) -> str:
    client = connect(url)
    prefix = f"micro{int(budget)}{batch}:"
    store = RedisBudgetStore(client, prefix)
    lim = LeasingLimiter(RedisLimiter(client, prefix, budgets=store), LeaseSettings(enabled=True))
    rules = [LimitRule("key:a", rpm=10**8, tpm=10**10), LimitRule("deployment:d", rpm=10**8, tpm=10**10)]
    probe = redis_sync.Redis.from_url(url)
    before, started = cpu_us(probe), time.time()
    pending: list[Settlement] = []
    for i in range(N):
        ask = (
            BudgetAsk("key:a", "daily", Decimal(10**6), Decimal("0.003"), f"r{i}", time.time())
            if budget
            else None
        )
        adm = await lim.acquire(rules, 100, f"r{i}:d", budget=ask)
        pending.append(Settlement(rules, adm.lease_id, 100, 60, adm.window_start))
        if adm.budget is not None:
            charge = BudgetCharge(
                "key:a", "daily", f"r{i}", Decimal("0.0002"), adm.budget.period_key, time.time()
            )
            pending.append(Settlement((), f"r{i}", 0, 0, 0.0, charge))
        if len(pending) >= batch:
            await lim.settle_many(pending)
            pending = []
        if i % 50 == 0:
            await asyncio.sleep(0.001)  # let the flusher and the returner run, as in a router
    await lim.settle_many(pending)
    elapsed = time.time() - started
    await lim.close()
    used = (cpu_us(probe) - before) / N
    await client.aclose()
    what = f"budget={budget} settle batch={batch}"
    return f"{what}: {used:.1f} µs Redis CPU/admission, {lim.leases} leases, {N / elapsed:,.0f}/s"


def main() -> int:
    with RedisServer() as srv:
        for budget, batch in ((False, 8), (True, 16)):
            print(asyncio.run(run(srv.url, budget, batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
