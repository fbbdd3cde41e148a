"""The usage ledger: idempotent stores (SQLite, real Redis) and a writer that loses nothing when
the store dies, even across a Redis crash, and when the router process itself is SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubellm.router.metering._ledger import (
    GroupBy,
    LedgerStore,
    LedgerWriter,
    RedisLedger,
    SqliteLedger,
    Totals,
    UsageRecord,
    totals,
)
from kubellm.router.redis_store import connect
from tests.support.ledger_crash import DAY0, REPORT_WINDOW, make_records, redis_store
from tests.support.redis_server import RedisServer

END = DAY0 + 3 * 86400
BYS: tuple[GroupBy, ...] = ("key", "model_group", "deployment")
ROOT = Path(__file__).resolve().parents[1]


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
    estimated=st.booleans(), cache_write_tokens=st.integers(0, 10**9),
))  # fmt: skip
def test_record_json_round_trip(record: UsageRecord) -> None:
    assert record.cost == record.cost.quantize(Decimal("1e-12"))
    assert UsageRecord.from_json(record.to_json()) == record


def test_records_of_an_older_or_newer_router_are_read() -> None:
    """A journal line written before cache writes were metered reads as none; one from a newer
    router with fields this one does not know still reads."""
    old = {"id": "a", "ts": 1.0, "request_id": "a", "key": "k", "model_group": "g", "deployment": "d",
           "prompt_tokens": 3, "cost": "0.5"}  # fmt: skip
    assert UsageRecord.from_dict(old).cache_write_tokens == 0
    assert UsageRecord.from_dict({**old, "cache_write_tokens": 2, "later": 1}).cache_write_tokens == 2


def test_sqlite_ledger_gains_the_cache_write_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE usage (id TEXT PRIMARY KEY, ts REAL NOT NULL, request_id TEXT, key TEXT, "
        "model_group TEXT, deployment TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, "
        "cached_tokens INTEGER, cost TEXT, cost_pico INTEGER, latency_ms REAL, ttft_ms REAL, "
        "status INTEGER, estimated INTEGER)"
    )
    db.execute("INSERT INTO usage VALUES ('old', 5, 'old', 'k', 'g', 'd', 1, 1, 0, '0', 0, 1, NULL, 200, 0)")
    db.commit()
    db.close()
    store = SqliteLedger(path)
    new = UsageRecord("new", 6, "new", "k", "g", "d", 9, 1, 2, Decimal(1), cache_write_tokens=5)

    async def scenario() -> list[UsageRecord]:
        await store.write([new])
        return await store.records(0, 10)

    got = asyncio.run(scenario())
    store.close()
    assert [(r.id, r.cache_write_tokens) for r in got] == [("old", 0), ("new", 5)]


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


def test_redis_ledger_writes_a_batch_as_one_entry_and_reads_older_entries(redis_url: str) -> None:
    """A batch is one stream entry; an id twice in one batch is stored once; entries of one record
    each (field ``r``, as routers before batching wrote them) are still read and aggregated."""

    async def scenario() -> None:
        client = connect(redis_url)
        p = f"t{uuid.uuid4().hex[:8]}:"
        store = RedisLedger(client, stream=p + "ledger", prefix=p)
        try:
            old, *records = make_records(121, seed=7)
            old.ts = END + 10  # outside the aggregated days: an older writer counted it there
            await client.xadd(p + "ledger", {"r": old.to_json()})
            assert await store.write(records[:100] + records[:1]) == 100
            assert await store.write(records[90:]) == 20
            assert await client.xlen(p + "ledger") == 3
            got = await store.records(DAY0, END)
            assert sorted(r.id for r in got) == sorted(r.id for r in records)
            assert await store.records(END, END + 86400) == [old]
            await assert_aggregates(store, records)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_redis_crash_mid_way_loses_nothing(tmp_path: Path) -> None:
    """1,000 records plus 200 duplicates; Redis is killed (SIGKILL) a third of the way in and
    restarted (AOF, script cache gone) later. Records wait in the journal and are replayed."""
    records = make_records(1000, seed=2)
    rng = random.Random(3)
    stream = records + [records[i] for i in rng.sample(range(1000), 200)]
    rng.shuffle(stream)
    journal = tmp_path / "journal.jsonl"

    async def scenario(srv: RedisServer) -> None:
        client = connect(srv.url)
        store = RedisLedger(client)
        writer = LedgerWriter(
            store, journal, batch_size=50, flush_interval=0.02, backoff_base=0.02, backoff_max=0.2
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
        assert journal.stat().st_size > 0
        await asyncio.to_thread(srv.start)
        for r in stream[800:]:
            writer.submit(r)
        await writer.close()
        assert journal.stat().st_size == 0
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
    journal = tmp_path / "journal.jsonl"
    db = SqliteLedger(tmp_path / "ledger.db")

    async def first_process() -> None:
        store = FlakyStore(db)
        writer = LedgerWriter(
            store, journal, batch_size=64, flush_interval=0.01, backoff_base=0.01, backoff_max=0.1
        )
        await writer.start()
        for r in stream[:500]:
            writer.submit(r)
        assert await writer.flush()
        store.down = True
        for r in stream[500:900]:
            writer.submit(r)
        await asyncio.sleep(0.1)
        await writer.close()  # the store is still down: records stay in the journal
        assert journal.stat().st_size > 0 and writer.pending == 0

    async def second_process() -> None:
        writer = LedgerWriter(db, journal, batch_size=64, flush_interval=0.01)
        await writer.start()
        for r in stream[900:]:
            writer.submit(r)
        await writer.close()
        assert journal.stat().st_size == 0

    asyncio.run(first_process())
    asyncio.run(second_process())

    async def check() -> None:
        assert_reconciles(await db.records(0, 4e9), records)
        await assert_aggregates(db, records)

    asyncio.run(check())
    db.close()


def test_torn_journal_line_is_skipped(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    a, b = make_records(2, seed=6)
    journal.write_bytes(a.to_json() + b"\n" + b"not json\n" + b.to_json()[:20])  # crash mid-write
    db = SqliteLedger(tmp_path / "ledger.db")

    async def scenario() -> None:
        writer = LedgerWriter(db, journal)
        await writer.start()
        await writer.close()
        assert [r.id for r in await db.records(0, 4e9)] == [a.id]
        assert journal.stat().st_size == 0

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
        writer = LedgerWriter(store, tmp_path / "journal.jsonl", batch_size=100, flush_interval=0.01)
        await writer.start()
        records = make_records(5000, seed=7)
        await asyncio.sleep(0.02)
        for r in records:
            writer.submit(r)
        # submit() is synchronous and the store is stuck: every record is queued, none written yet.
        assert store.got == []
        store.gate.set()
        await writer.close()
        assert_reconciles(store.got, records)

    asyncio.run(scenario())


# --------------------------------------------------------------------------- crash safety


def run_until_killed(args: Sequence[str], n: int, rng: random.Random, log: Path) -> int:
    """Start the router-like child (tests/support/ledger_crash.py) submitting ``n`` records, SIGKILL
    it at a random point, and return how many submits it reported as returned."""
    kill_at = rng.randint(1, n)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.ledger_crash", *args, str(n)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdout is not None
    reported = 0
    try:
        while reported < kill_at and (line := proc.stdout.readline()):
            reported = int(line) if line.strip().isdigit() else reported
        time.sleep(rng.uniform(0, 0.002))
    finally:
        proc.kill()
        rest = proc.stdout.read()  # through the same buffered reader: it may hold reports already
        proc.wait(10)
        proc.stdout.close()
    reported = max([reported, *(int(x) for x in rest.split() if x.isdigit())])
    assert proc.returncode == -signal.SIGKILL and reported >= kill_at, log.read_text()[-3000:]
    return reported


def submitted_count(ids: set[str], seed: int, reported: int, n: int) -> int:
    """How many of ``make_records(n, seed)`` the store holds; they must be a prefix (none lost)
    at least as long as what the child reported, and at most what it could submit unreported."""
    got = sorted(int(i.rpartition("-")[2]) for i in ids if i.startswith(f"rec-{seed}-"))
    lost = sorted(set(range(got[-1] + 1 if got else 0)) - set(got))
    assert not lost, f"records of seed {seed} lost: {lost[:10]} ({len(lost)} in all)"
    assert reported <= len(got) <= min(n, reported + REPORT_WINDOW), (seed, reported, len(got))
    return len(got)


def test_sigkilled_router_loses_nothing_and_counts_nothing_twice(
    kind: str, redis_url: str, tmp_path: Path
) -> None:
    """A process submits records as fast as it can and is SIGKILLed at a random point; a second
    one on the same journal replays what the first left unconfirmed while submitting its own, and
    is killed too; a third writer starts and closes. The store then holds exactly the records
    the processes submitted (every reported one, plus the one a kill may have caught between its
    submit and its report), none twice, and aggregates equal to their sums."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    journal = tmp_path / "journal.jsonl"
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    target = [str(tmp_path / "ledger.db")] if kind == "sqlite" else [redis_url, prefix]
    n = 10_000
    reported = {
        s: run_until_killed([kind, *target, str(journal), str(s)], n, rng, tmp_path / f"child-{s}.log")
        for s in (100, 101)
    }

    async def check() -> None:
        store = SqliteLedger(target[0]) if kind == "sqlite" else redis_store(redis_url, prefix)
        writer = LedgerWriter(store, journal)
        await writer.start()
        await writer.close()
        assert journal.stat().st_size == 0, f"seed {seed}"
        got = await store.records(0, 4e9)
        ids = {r.id for r in got}
        expected = [
            r for s, rep in reported.items() for r in make_records(submitted_count(ids, s, rep, n), s)
        ]
        assert_reconciles(got, expected)
        await assert_aggregates(store, expected)
        if isinstance(store, SqliteLedger):
            store.close()
        else:
            await store.client.aclose()

    asyncio.run(check())


class CountingStore:
    """Wraps a store, counting the records sent to it; fails after ``fail_after`` of them."""

    def __init__(self, inner: LedgerStore, fail_after: int | None = None) -> None:
        self.inner = inner
        self.sent = 0
        self.fail_after = fail_after

    async def write(self, records: Sequence[UsageRecord]) -> int:
        if self.fail_after is not None and self.sent + len(records) > self.fail_after:
            raise ConnectionError("store unreachable")
        self.sent += len(records)
        return await self.inner.write(records)

    async def records(self, since: float, until: float) -> list[UsageRecord]:
        return await self.inner.records(since, until)

    async def aggregate(self, since: float, until: float, by: GroupBy = "key") -> dict[str, Totals]:
        return await self.inner.aggregate(since, until, by)


def test_restart_resends_only_what_the_store_did_not_confirm(tmp_path: Path) -> None:
    records = make_records(1000, seed=8)
    journal = tmp_path / "journal.jsonl"
    db = SqliteLedger(tmp_path / "ledger.db")

    async def scenario() -> None:
        writer = LedgerWriter(CountingStore(db, fail_after=300), journal, batch_size=100)
        for r in records:
            writer.submit(r)
        assert not await writer.flush()  # batches 1-3 confirmed, then the store fails
        await writer.close()
        assert (tmp_path / "journal.jsonl.confirmed").exists()
        store = CountingStore(db)
        writer = LedgerWriter(store, journal, batch_size=100)
        await writer.start()
        await writer.close()
        assert store.sent == 700 and writer.written == 700
        assert journal.stat().st_size == 0 and not (tmp_path / "journal.jsonl.confirmed").exists()
        assert_reconciles(await db.records(0, 4e9), records)

    asyncio.run(scenario())
    db.close()


def test_journal_is_emptied_once_confirmed(tmp_path: Path) -> None:
    records = make_records(6000, seed=9)
    journal = tmp_path / "journal.jsonl"
    db = SqliteLedger(tmp_path / "ledger.db")

    async def scenario() -> None:
        store = FlakyStore(db)
        writer = LedgerWriter(store, journal, batch_size=50, flush_interval=0.005, backoff_max=0.02)
        await writer.start()
        for chunk in range(0, 3000, 500):  # the background task alone keeps it bounded
            for r in records[chunk : chunk + 500]:
                writer.submit(r)
            assert journal.stat().st_size > 0
            for _ in range(200):
                await asyncio.sleep(0.01)
                if journal.stat().st_size == 0:
                    break
            assert journal.stat().st_size == 0 and writer.pending == 0
        store.down = True
        for r in records[3000:]:
            writer.submit(r)
        await asyncio.sleep(0.05)
        size = journal.stat().st_size
        assert size > 0 and writer.pending < 3000  # spilled from memory: the journal has them
        store.down = False
        assert await writer.flush()
        assert journal.stat().st_size == 0 and not (tmp_path / "journal.jsonl.confirmed").exists()
        await writer.close()
        assert writer.written == 6000
        assert_reconciles(await db.records(0, 4e9), records)

    asyncio.run(scenario())
    db.close()


def test_queue_past_max_queued_is_read_back_from_the_journal_exactly_once(tmp_path: Path) -> None:
    """While a batch is in flight the queue overflows and is dropped from memory; the batch's
    confirmation still counts, and the rest is read back from the journal, none of it twice."""
    gate = asyncio.Event()
    got: list[UsageRecord] = []

    class Gated:
        async def write(self, records: Sequence[UsageRecord]) -> int:
            await gate.wait()
            got.extend(records)
            return len(records)

        async def records(self, since: float, until: float) -> list[UsageRecord]:
            return got

        async def aggregate(self, since: float, until: float, by: GroupBy = "key") -> dict[str, Totals]:
            return totals(got, by)

    async def scenario() -> None:
        records = make_records(1500, seed=10)
        writer = LedgerWriter(Gated(), tmp_path / "journal.jsonl", batch_size=100, max_queued=200)
        await writer.start()
        for r in records[:100]:
            writer.submit(r)
        await asyncio.sleep(0.01)  # the first batch is now in flight, waiting at the gate
        for r in records[100:]:
            writer.submit(r)
        assert writer.pending <= 200 and writer.spilled >= 1200
        gate.set()
        await writer.close()
        assert [r.id for r in got] == [r.id for r in records]

    asyncio.run(scenario())


def test_unwritable_journal_keeps_records_in_memory(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    journal.symlink_to("/dev/full")  # every write fails with ENOSPC
    db = SqliteLedger(tmp_path / "ledger.db")

    async def scenario() -> None:
        records = make_records(300, seed=11)
        store = FlakyStore(db)
        store.down = True
        writer = LedgerWriter(store, journal, batch_size=50, flush_interval=0.01, max_queued=100)
        await writer.start()
        for r in records:
            writer.submit(r)
        await asyncio.sleep(0.05)
        assert writer.journal_errors == 300 and writer.failures >= 1
        assert writer.pending == 300 and writer.spilled == 0  # never dropped: only memory has them
        store.down = False
        await writer.close()
        assert_reconciles(await db.records(0, 4e9), records)

    asyncio.run(scenario())
    db.close()


def test_one_writer_per_journal(tmp_path: Path) -> None:
    db = SqliteLedger(tmp_path / "ledger.db")

    async def scenario() -> None:
        writer = LedgerWriter(db, tmp_path / "journal.jsonl")
        with pytest.raises(RuntimeError, match="used by another writer"):
            LedgerWriter(db, tmp_path / "journal.jsonl")
        await writer.close()
        await LedgerWriter(db, tmp_path / "journal.jsonl").close()  # the lock went with the first

    asyncio.run(scenario())
    db.close()


def test_fsync_interval_syncs_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr("kubellm.router.metering._ledger.os.fsync", fsync)
    db = SqliteLedger(tmp_path / "ledger.db")

    async def scenario() -> None:
        writer = LedgerWriter(db, tmp_path / "journal.jsonl", flush_interval=0.01, fsync_interval=0.02)
        await writer.start()
        for r in make_records(100, seed=12):
            writer.submit(r)
        await asyncio.sleep(0.1)
        assert 2 <= len(synced) <= 10
        await writer.close()

    asyncio.run(scenario())
    db.close()


def test_aggregates_count_successes_rejections_and_failures_apart(
    kind: str, redis_url: str, tmp_path: Path
) -> None:
    """Issue 15 defect 5: `requests` counted rate-limited ones too (1,623 when 642 succeeded), while
    tokens and spend are only what was billed. Each record counts once, under its outcome."""

    def rec(i: int, status: int, tokens: int = 0) -> UsageRecord:
        return UsageRecord(
            id=f"r{i}", ts=DAY0 + i, request_id=f"r{i}", key="k", model_group="g", deployment="d",
            prompt_tokens=tokens, completion_tokens=tokens, cost=Decimal(tokens) / 1000, status=status,
        )  # fmt: skip

    records = [rec(0, 200, 5), rec(1, 200, 5), rec(2, 429), rec(3, 429), rec(4, 429), rec(5, 502, 2)]
    records += [rec(6, 400), rec(7, 499)]

    async def scenario() -> None:
        async with open_store(kind, redis_url, tmp_path) as store:
            assert await store.write(records) == len(records)
            for since, until in ((DAY0, DAY0 + 86400), (DAY0, DAY0 + 100.5)):  # hashes, then records
                got = (await store.aggregate(since, until, "key"))["k"]
                assert (got.requests, got.rejected, got.failed) == (2, 3, 3)
                assert (got.prompt_tokens, got.cost) == (12, Decimal("0.012"))

    asyncio.run(scenario())


def test_operator_reports_the_counts_in_api_key_status(redis_url: str) -> None:
    """The operator's reader of the routers' ledger, down to ApiKey status.usage."""
    from kubellm.operator._build import Verdict
    from kubellm.operator._status import api_key_status
    from kubellm.operator._usage import UsageReader

    now = DAY0 + 3600.0
    statuses = [200, 429, 429, 200, 503, 429]
    records = [
        UsageRecord(
            id=f"o{i}", ts=now - 60 + i, request_id=f"o{i}", key="team/app", model_group="g",
            deployment="d", prompt_tokens=3, completion_tokens=1, status=status,
        )
        for i, status in enumerate(statuses)
    ]  # fmt: skip

    async def scenario() -> dict[str, Any]:
        p = f"t{uuid.uuid4().hex[:8]}:"
        client = connect(redis_url)
        try:
            await RedisLedger(client, stream=p + "ledger", prefix=p).write(records)
            reader = UsageReader(client, p)
            usage = (await reader.key_usage([("team/app", "daily")], now=now))["team/app"]
        finally:
            await client.aclose()
        body = {"metadata": {"name": "app", "namespace": "team", "generation": 1}, "spec": {}}
        verdict = Verdict(True, "Rendered", "ok")
        return api_key_status(body, verdict, None, usage, datetime.fromtimestamp(now, UTC))

    status = asyncio.run(scenario())
    assert status["usage"] == {
        "requests": 2,
        "rejected": 3,
        "failed": 1,
        "promptTokens": 18,
        "completionTokens": 6,
    }
