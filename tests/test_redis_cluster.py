"""Limits, budgets and the ledger on a real 3-master Redis Cluster, and across a Sentinel failover.

Router processes run against the servers of tests/support/redis_cluster.py (loopback only), with
a fake OpenAI upstream; what the clients get is checked against the Redis state and the ledger.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
import redis as redis_sync

from kubellm.router.config._schema import RedisSettings
from kubellm.router.metering import redis_ledger
from kubellm.router.metering._budget import period_window
from kubellm.router.metering._ledger import UsageRecord
from kubellm.router.redis_connect import connect_settings
from tests.conftest import UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.redis_cluster import RedisClusterServers, SentinelServers
from tests.support.servers import RouterProcess

MESSAGES = [{"role": "user", "content": "hi"}]
KEYS = {f"K{i}_KEY": f"sk-k{i}-0123456789abcdef" for i in range(6)} | {
    "BUDGET_KEY": "sk-budget-0123456789abcdef"
}
PRICING = {"inputPerMillion": "1", "outputPerMillion": "2"}


def _config(fake: FakeOpenAI, redis: dict[str, Any], dep_rpm: int) -> dict[str, Any]:
    keys: list[dict[str, Any]] = [
        {"name": f"k{i}", "keyEnv": f"K{i}_KEY", "limits": {"rpm": (5, 5, 5, 5, 1000, 30)[i]}}
        for i in range(6)
    ]
    keys.append(
        {"name": "budget", "keyEnv": "BUDGET_KEY", "budget": {"amountUsd": "0.000050", "period": "daily"}}
    )
    return {
        "deployments": [openai_deployment(fake, name="dep", pricing=PRICING, limits={"rpm": dep_rpm})],
        "keys": keys,
        "settings": {"numRetries": 0, "redis": {**redis, "failOpen": False}},
    }


def _burst(routers: list[RouterProcess], key: str, total: int, **kwargs: Any) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    async def run() -> None:
        clients = [openai.AsyncOpenAI(base_url=r.v1, api_key=key, max_retries=0) for r in routers]

        async def one(i: int) -> None:
            try:
                await clients[i % len(clients)].chat.completions.create(
                    model="gpt-test", messages=MESSAGES, **kwargs
                )
                code = 200
            except openai.APIStatusError as exc:
                code = exc.status_code
            except openai.APIConnectionError:
                code = 0
            with lock:
                statuses.append(code)

        await asyncio.gather(*(one(i) for i in range(total)))
        for c in clients:
            await c.close()

    asyncio.run(run())
    return statuses


def _routers(config: dict[str, Any], n: int = 2) -> list[RouterProcess]:
    return [RouterProcess(config, env={**KEYS, "TEST_UPSTREAM_KEY": UPSTREAM_KEY}).start() for _ in range(n)]


def _ledger_records(settings: RedisSettings, want: int, timeout: float = 20.0) -> list[UsageRecord]:
    async def read() -> list[UsageRecord]:
        client = connect_settings(settings, timeout=2.0)
        assert client is not None
        try:
            return await redis_ledger(client, settings).records(0, time.time() + 3600)
        finally:
            await client.aclose()

    deadline = time.monotonic() + timeout
    while True:
        try:
            got = asyncio.run(read())
        except Exception:  # a failover still settling
            got = []
        if len(got) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


def test_limits_budgets_and_ledger_hold_with_keys_spread_over_shards(
    cluster: RedisClusterServers, fake_openai: FakeOpenAI
) -> None:
    settings = {"mode": "cluster", "nodes": cluster.nodes}
    routers = _routers(_config(fake_openai, settings, dep_rpm=30))
    try:
        # Key limits bind: 4 keys of rpm 5, 12 requests each, over both routers (20 of the 30).
        for i in range(4):
            statuses = _burst(routers, KEYS[f"K{i}_KEY"], 12)
            assert statuses.count(200) == 5 and set(statuses) == {200, 429}, statuses
        # The deployment binds for a key whose own rpm is far away: its limits live in another slot,
        # so every refusal there rolls back the key's reservation.
        statuses = _burst(routers, KEYS["K4_KEY"], 25)
        assert statuses.count(200) == 10 and set(statuses) == {200, 429}, statuses
        assert fake_openai.calls == 30
    finally:
        for r in routers:
            r.stop()

    nodes = [redis_sync.Redis(host="127.0.0.1", port=p) for p in cluster.ports]
    # k4's window counts only its 10 admissions: the 15 refused by the deployment were rolled back.
    k4 = redis_sync.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    assert int(k4.hget("kubellm:lim:{key:k4}:w", "r") or 0) == 10
    assert int(k4.hget("kubellm:lim:{deployment:dep}:w", "r") or 0) == 30
    assert sum(1 for n in nodes if n.dbsize() > 0) >= 2  # the keys landed on more than one shard
    want = 4 * 12 + 25
    records = _ledger_records(RedisSettings(mode="cluster", nodes=cluster.nodes), want)
    assert len(records) == want and len({r.id for r in records}) == want
    assert sum(1 for r in records if r.status == 200) == 30
    k4.close()
    for n in nodes:
        n.close()


def test_budget_holds_on_a_cluster(cluster: RedisClusterServers, fake_openai: FakeOpenAI) -> None:
    settings = {"mode": "cluster", "nodes": cluster.nodes, "keyPrefix": "b:"}
    routers = _routers(_config(fake_openai, settings, dep_rpm=1000))
    try:
        client = openai.OpenAI(base_url=routers[1].v1, api_key=KEYS["BUDGET_KEY"], max_retries=0)
        calls = 0
        with pytest.raises(openai.RateLimitError) as info:
            for _ in range(20):
                client.chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=5)
                calls += 1
        assert info.value.code == "budget_exceeded"
        assert calls == 4  # $0.000015 a call: the 4th crosses $0.00005, the 5th is refused
    finally:
        for r in routers:
            r.stop()
    c = redis_sync.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    bucket = f"b:budget:{{key:budget}}:{period_window('daily', time.time())[2]}"
    assert int(c.hget(bucket, "s") or 0) == 60_000_000  # pico-USD: 4 x $0.000015
    assert int(c.hget(bucket, "r") or 0) == 0  # no reservation left over
    c.close()


def test_sentinel_failover_keeps_limits_budgets_and_the_ledger(fake_openai: FakeOpenAI) -> None:
    with SentinelServers() as s:
        settings = {
            "mode": "sentinel",
            "sentinels": s.sentinels,
            "masterName": s.MASTER,
            "ledgerWaitReplicas": 1,
        }
        routers = _routers(_config(fake_openai, settings, dep_rpm=1000))
        try:
            results: list[int] = []
            done = threading.Event()

            def load() -> None:
                while not done.is_set():
                    results.extend(_burst(routers, KEYS["K5_KEY"], 8))

            # Half the budget is spent before the failover: $0.000015 a call, 2 of the 4 calls.
            client = openai.OpenAI(base_url=routers[0].v1, api_key=KEYS["BUDGET_KEY"], max_retries=0)
            for _ in range(2):
                client.chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=5)
            worker = threading.Thread(target=load)
            worker.start()
            time.sleep(1.0)
            old = s.master_port
            s.kill(old)  # SIGKILL mid-load
            deadline = time.monotonic() + 30
            while s.master() in (old, None) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert s.master() == s.replica_port
            s.start_data(old, s.replica_port)  # the old master comes back as a replica
            time.sleep(2.0)  # load goes on against the new master
            done.set()
            worker.join(60)
            # Limits after the failover: a key of rpm 5, fresh, admits exactly 5.
            statuses = _burst(routers, KEYS["K0_KEY"], 12)
            assert statuses.count(200) == 5 and set(statuses) == {200, 429}, statuses
            # The budget remembers the spend from before the failover: 2 more calls, then refused.
            client = openai.OpenAI(base_url=routers[1].v1, api_key=KEYS["BUDGET_KEY"], max_retries=0)
            calls = 2
            with pytest.raises(openai.RateLimitError):
                for _ in range(20):
                    client.chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=5)
                    calls += 1
            assert calls == 4
        finally:
            for r in routers:
                r.stop()
        ok_before = results.count(200)
        # k5 (rpm 30) was loaded across the failover: never more than 30 admitted in its window.
        assert 0 < ok_before <= 30 and set(results) <= {200, 429, 503, 0}, (ok_before, set(results))
        assert 429 in results  # the limit was reached, so the bound was tested
        # The ledger: every answered request once (the 503s during the failover were never admitted
        # and have records too, when the router answered them), no duplicate.
        answered = sum(1 for x in results if x in (200, 429, 503))
        want = answered + len(statuses) + calls + 1
        red = RedisSettings(mode="sentinel", sentinels=s.sentinels, master_name=s.MASTER)
        records = _ledger_records(red, want, timeout=30)
        ids = [r.id for r in records]
        assert len(ids) == len(set(ids))
        assert len(records) == want, (len(records), want)
        assert sum(1 for r in records if r.status == 200) == ok_before + 5 + 4
        spent = sum((r.cost for r in records if r.key == "budget"), Decimal(0))
        assert spent == Decimal("0.000060")


def test_every_store_speaks_to_the_cluster(cluster: RedisClusterServers) -> None:
    """Breakers, the response cache, the Responses store, budgets and the ledger on the cluster
    client, as the router builds them (build_services)."""
    from kubellm.router.config._schema import CacheSettings, CooldownSettings
    from kubellm.router.core._cache import RedisCache
    from kubellm.router.core._health import RedisHealthStore
    from kubellm.router.inbound.responses._store import RedisResponseStore, StoredResponse
    from kubellm.router.metering._budget import RedisBudgetStore

    settings = RedisSettings(mode="cluster", nodes=cluster.nodes, key_prefix="s:")

    async def run() -> None:
        client = connect_settings(settings)
        assert client is not None
        try:
            health = RedisHealthStore(client, "s:")
            policy = CooldownSettings(failure_threshold=2)
            now = time.time()
            assert await health.record_failure("dep-a", now, policy) is None
            assert await health.record_failure("dep-a", now, policy) is not None  # the breaker opens
            await health.open("dep-b", now, now + 30)
            assert set(await health.snapshot(["dep-a", "dep-b", "dep-c"])) == {"dep-a", "dep-b"}
            cache = RedisCache(client, CacheSettings(), "s:")
            for i in range(20):
                await cache.set(f"entry-{i}", b"v%d" % i)
            assert [await cache.get(f"entry-{i}") for i in range(20)] == [b"v%d" % i for i in range(20)]
            store = RedisResponseStore(client, "s:", 60)
            await store.put("alice", StoredResponse({"id": "resp_1"}, []))
            got = await store.get("alice", "resp_1")
            assert got is not None and got.id == "resp_1"
            assert await store.delete("alice", "resp_1") and await store.get("alice", "resp_1") is None
            budgets = RedisBudgetStore(client, "s:", tag_scopes=True)
            d = await budgets.reserve("key:x", "daily", Decimal("1"), Decimal("0.4"), "r1")
            assert d.allowed
            assert await budgets.settle("key:x", "daily", "r1", Decimal("0.4"), Decimal("0.25"))
            assert not await budgets.settle("key:x", "daily", "r1", Decimal("0.4"), Decimal("0.25"))
            assert await budgets.spent("key:x", "daily") == Decimal("0.25")
            ledger = redis_ledger(client, settings)
            rec = [UsageRecord(f"id-{i}", time.time(), f"req-{i}", "k", "g", "d", 1, 2) for i in range(5)]
            assert await ledger.write(rec) == 5
            assert await ledger.write(rec) == 0  # idempotent
            assert [r.id for r in await ledger.records(0, time.time() + 60)] == [r.id for r in rec]
        finally:
            await client.aclose()

    asyncio.run(run())
    nodes = [redis_sync.Redis(host="127.0.0.1", port=p) for p in cluster.ports]
    assert sum(1 for n in nodes if n.keys("s:*")) >= 2  # spread over the shards
    for n in nodes:
        n.close()


def test_a_refusal_on_one_shard_rolls_back_the_others(cluster: RedisClusterServers) -> None:
    """The key's limits and budget on one slot, the deployment's on another: a refusal by the
    deployment undoes the key's request count, lease and budget hold exactly."""
    from kubellm.router.metering._budget import BudgetAsk, RedisBudgetStore
    from kubellm.router.metering._limits import LimitRule
    from kubellm.router.metering._limits_cluster import ClusterLimiter
    from kubellm.router.redis_connect import slot

    settings = RedisSettings(mode="cluster", nodes=cluster.nodes, key_prefix="rb:")
    key, dep = LimitRule("key:rb", rpm=100, max_parallel=10), LimitRule("deployment:rb", rpm=1)

    async def run() -> tuple[int, str, int]:
        client = connect_settings(settings)
        assert client is not None
        try:
            budgets = RedisBudgetStore(client, "rb:", tag_scopes=True)
            lim = ClusterLimiter(client, "rb:", budgets=budgets)
            assert slot(lim._base(key.scope)) != slot(lim._base(dep.scope))
            now = time.time()

            def ask(rid: str) -> BudgetAsk:
                return BudgetAsk("key:rb", "daily", Decimal("1"), Decimal("0.25"), rid, now)

            first = await lim.acquire([key, dep], 10, "l1", budget=ask("r1"))
            second = await lim.acquire([key, dep], 10, "l2", budget=ask("r2"))
            assert first.allowed and first.budget is not None and first.budget.allowed
            assert not second.allowed and second.denied_scopes == ("deployment:rb",)
            window = await client.hmget(lim._base(key.scope) + ":w", ["r", "t"])
            bucket = budgets.reserve_keys_args(ask("x"))[0]
            held = await client.hkeys(bucket[1])
            leases = await client.zcard(lim._base(key.scope) + ":l")
            return int(window[0]), f"{int(window[1])}:{sorted(h.decode() for h in held)}", int(leases)
        finally:
            await client.aclose()

    requests, tokens_and_holds, leases = asyncio.run(run())
    assert requests == 1  # the refused request's count on the key's slot was rolled back
    assert tokens_and_holds == "10:['r1']"  # its tokens and its budget hold too
    assert leases == 1
