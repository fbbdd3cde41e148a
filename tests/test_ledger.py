"""The usage ledger: idempotent stores (SQLite, real Redis) and a writer that loses nothing when
the store dies, even across a Redis crash and a router restart."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubellm.router._ledger import (
    GroupBy,
    LedgerStore,
    LedgerWriter,
    RedisLedger,
    SqliteLedger,
    Totals,
    UsageRecord,
    totals,
)
from kubellm.router._pricing import DEFAULT_PRICES, cost
from kubellm.router._redis import connect
from tests.support.redis_server import RedisServer

DAY0 = datetime(2025, 3, 10, tzinfo=UTC).timestamp()
END = DAY0 + 3 * 86400
BYS: tuple[GroupBy, ...] = ("key", "model_group", "deployment")


def make_records(n: int, seed: int = 0) -> list[UsageRecord]:
    rng = random.Random(seed)
    models = list(DEFAULT_PRICES)
    out = []
    for i in range(n):
        model = rng.choice(models)
        prompt, completion = rng.randint(0, 20_000), rng.randint(0, 4_000)
        cached = rng.randint(0, prompt)
        out.append(
            UsageRecord(
                id=f"rec-{seed}-{i}",
                ts=DAY0 + rng.uniform(0, 3 * 86400),
                request_id=uuid.UUID(int=rng.getrandbits(128)).hex,
                key=rng.choice(["team-a", "team-b", "svc|pipes", "ünïcode"]),
                model_group=model,
                deployment=f"{model}-{rng.randint(1, 2)}",
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                cost=cost(prompt, completion, cached, DEFAULT_PRICES[model]),
                latency_ms=rng.uniform(5, 5000),
                ttft_ms=rng.choice([None, rng.uniform(1, 900)]),
                status=rng.choice([200, 200, 200, 429, 500]),
                estimated=rng.random() < 0.1,
            )
        )
    return out


def assert_reconciles(got: Sequence[UsageRecord], expected: Sequence[UsageRecord]) -> None:
    assert len(got) == len({r.id for r in got}), "a record is stored twice"
    assert {r.id: r for r in got} == {r.id: r for r in expected}


async def assert_aggregates(store: LedgerStore, expected: Sequence[UsageRecord]) -> None:
    for since, until in ((DAY0, END), (DAY0 + 86400, DAY0 + 2 * 86400), (DAY0 + 1234.5, END - 77.25)):
        inside = [r for r in expected if since <= r.ts < until]
        for by in BYS:
            agg = await store.aggregate(since, until, by)
            assert agg == totals(inside, by), (since, until, by)
    whole = await store.aggregate(DAY0, END, "key")
    assert sum((t.cost for t in whole.values()), Decimal(0)) == sum((r.cost for r in expected), Decimal(0))


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as srv:
        yield srv.url


@pytest.fixture(params=["sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def open_store(kind: str, url: str, tmp: Path) -> AsyncIterator[LedgerStore]:
    if kind == "sqlite":
        db = SqliteLedger(tmp / "ledger.db")
        try:
            yield db
        finally:
            db.close()
        return
    client = connect(url)
    p = f"t{uuid.uuid4().hex[:8]}:"
    try:
        yield RedisLedger(client, stream=p + "ledger", prefix=p)
    finally:
        await client.aclose()


@given(st.builds(
    UsageRecord,
    id=st.text(min_size=1), ts=st.floats(0, 4e9), request_id=st.text(), key=st.text(),
    model_group=st.text(), deployment=st.text(), prompt_tokens=st.integers(0, 10**9),
    completion_tokens=st.integers(0, 10**9), cached_tokens=st.integers(0, 10**9),
    cost=st.decimals(0, 10**6, places=15, allow_nan=False, allow_infinity=False),
    latency_ms=st.floats(0, 1e7), ttft_ms=st.none() | st.floats(0, 1e7), status=st.integers(100, 599),
    estimated=st.booleans(),
))  # fmt: skip
def test_record_json_round_trip(record: UsageRecord) -> None:
    assert record.cost == record.cost.quantize(Decimal("1e-12"))
    assert UsageRecord.from_json(record.to_json()) == record


def test_store_is_idempotent_and_aggregates_reconcile(kind: str, redis_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_store(kind, redis_url, tmp_path) as store:
            records = make_records(350, seed=1)
            assert await store.write(records[:300]) == 300
            assert await store.write(records[250:] + records[:40]) == 50  # only the 50 new ones
            assert await store.write([]) == 0
            got = await store.records(DAY0, END)
            assert got == sorted(records, key=lambda r: (r.ts, r.id))
            mid = DAY0 + 100_000.5
            assert await store.records(mid, END) == [r for r in got if r.ts >= mid]
            await assert_aggregates(store, records)
            assert await store.aggregate(END, END + 86400, "key") == {}
            with pytest.raises(ValueError, match="cannot aggregate by"):
                await store.aggregate(DAY0, END, "status")  # type: ignore[arg-type]

    asyncio.run(scenario())


def test_redis_crash_mid_way_loses_nothing(tmp_path: Path) -> None:
    """1,000 records plus 200 duplicates; Redis is killed (SIGKILL) a third of the way in and
    restarted (AOF, script cache gone) later. Records spill to the file and are replayed."""
    records = make_records(1000, seed=2)
    rng = random.Random(3)
    stream = records + [records[i] for i in rng.sample(range(1000), 200)]
    rng.shuffle(stream)
    spill = tmp_path / "spill.jsonl"

    async def scenario(srv: RedisServer) -> None:
        client = connect(srv.url)
        store = RedisLedger(client)
        writer = LedgerWriter(
            store, spill, batch_size=50, flush_interval=0.02, backoff_base=0.02, backoff_max=0.2
        )
        await writer.start()
        for i, r in enumerate(stream[:400]):
            writer.submit(r)
            if i % 50 == 0:
                await asyncio.sleep(0.005)
        assert await writer.flush()
        await asyncio.to_thread(srv.stop)
        for r in stream[400:800]:
            writer.submit(r)
        await asyncio.sleep(0.3)  # the writer fails, spills, backs off, fails again
        assert writer.spilled >= 400 - 50 and writer.failures >= 2
        assert spill.stat().st_size > 0
        await asyncio.to_thread(srv.start)
        for r in stream[800:]:
            writer.submit(r)
        await writer.close()
        assert spill.stat().st_size == 0
        assert writer.submitted == 1200 and writer.written == 1000
        assert_reconciles(await store.records(0, 4e9), records)
        await assert_aggregates(store, records)
        await client.aclose()

    with RedisServer(appendonly=True) as srv:
        asyncio.run(scenario(srv))


class FlakyStore:
    """Wraps a store; while ``down`` every write fails like an unreachable server."""

    def __init__(self, inner: LedgerStore) -> None:
        self.inner = inner
        self.down = False

    async def write(self, records: Sequence[UsageRecord]) -> int:
        if self.down:
            raise ConnectionError("store unreachable")
        return await self.inner.write(records)

    async def records(self, since: float, until: float) -> list[UsageRecord]:
        return await self.inner.records(since, until)

    async def aggregate(self, since: float, until: float, by: GroupBy = "key") -> dict[str, Totals]:
        return await self.inner.aggregate(since, until, by)


def test_sqlite_outage_and_router_restart_lose_nothing(tmp_path: Path) -> None:
    records = make_records(1000, seed=4)
    stream = records + records[100:300]
    random.Random(5).shuffle(stream)
    spill = tmp_path / "spill.jsonl"
    db = SqliteLedger(tmp_path / "ledger.db")

    async def first_process() -> None:
        store = FlakyStore(db)
        writer = LedgerWriter(
            store, spill, batch_size=64, flush_interval=0.01, backoff_base=0.01, backoff_max=0.1
        )
        await writer.start()
        for r in stream[:500]:
            writer.submit(r)
        assert await writer.flush()
        store.down = True
        for r in stream[500:900]:
            writer.submit(r)
        await asyncio.sleep(0.1)
        await writer.close()  # the store is still down: records stay in the spill file
        assert spill.stat().st_size > 0 and writer.pending == 0

    async def second_process() -> None:
        writer = LedgerWriter(db, spill, batch_size=64, flush_interval=0.01)
        await writer.start()
        for r in stream[900:]:
            writer.submit(r)
        await writer.close()
        assert spill.stat().st_size == 0

    asyncio.run(first_process())
    asyncio.run(second_process())

    async def check() -> None:
        assert_reconciles(await db.records(0, 4e9), records)
        await assert_aggregates(db, records)

    asyncio.run(check())
    db.close()


def test_torn_spill_line_is_skipped(tmp_path: Path) -> None:
    spill = tmp_path / "spill.jsonl"
    a, b = make_records(2, seed=6)
    spill.write_bytes(a.to_json() + b"\n" + b"not json\n" + b.to_json()[:20])  # crash mid-write
    db = SqliteLedger(tmp_path / "ledger.db")

    async def scenario() -> None:
        writer = LedgerWriter(db, spill)
        await writer.start()
        await writer.close()
        assert [r.id for r in await db.records(0, 4e9)] == [a.id]
        assert spill.stat().st_size == 0

    asyncio.run(scenario())
    db.close()


def test_submit_never_waits_for_the_store(tmp_path: Path) -> None:
    class Stuck:
        def __init__(self) -> None:
            self.gate = asyncio.Event()
            self.got: list[UsageRecord] = []

        async def write(self, records: Sequence[UsageRecord]) -> int:
            await self.gate.wait()
            self.got += records
            return len(records)

        async def records(self, since: float, until: float) -> list[UsageRecord]:
            return self.got

        async def aggregate(self, since: float, until: float, by: GroupBy = "key") -> dict[str, Totals]:
            return totals(self.got, by)

    async def scenario() -> None:
        store = Stuck()
        writer = LedgerWriter(store, tmp_path / "spill.jsonl", batch_size=100, flush_interval=0.01)
        await writer.start()
        records = make_records(5000, seed=7)
        await asyncio.sleep(0.02)
        started = time.perf_counter()
        for r in records:
            writer.submit(r)
        assert time.perf_counter() - started < 0.5
        store.gate.set()
        await writer.close()
        assert_reconciles(store.got, records)

    asyncio.run(scenario())
