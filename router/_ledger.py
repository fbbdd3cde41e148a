"""The usage ledger: one record per request, none lost, none counted twice.

The request path calls :meth:`LedgerWriter.submit`, which only appends to an
in-memory queue. A background task writes batches to a :class:`LedgerStore`.
When a write fails the batch goes to a local spill file (JSON lines, fsync'ed
per batch) at once, and the file is replayed with exponential backoff until
the store takes it; a spill file left by a previous process is replayed at
start. Delivery is therefore at-least-once, and every store ignores a record
id it already holds, so the ledger holds each record exactly once.

Stores:

* :class:`SqliteLedger`: a local table keyed by record id (``INSERT OR IGNORE``).
* :class:`RedisLedger`: a stream plus per-day aggregate hashes. One script
  per batch sets a dedupe key per record and, only for new ids, XADDs the
  record and HINCRBYs the aggregates, so the aggregates are exactly the sum
  of the records in the stream. Durability is Redis's own: run it with
  ``appendonly yes``. Dedupe keys live ``dedupe_ttl`` (default 30 days): a
  record replayed later than that would be counted again.

Ranges are half-open, ``since <= ts < until``, on the record's own timestamp.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import orjson
from redis.asyncio import Redis

from ._pricing import from_pico, quantize, to_pico
from ._redis import Arg, Script

log = logging.getLogger("kubellm.ledger")

GroupBy = Literal["key", "model_group", "deployment"]
_GROUPS: tuple[GroupBy, ...] = ("key", "model_group", "deployment")
_DAY = 86400


@dataclass(slots=True)
class UsageRecord:
    #: Idempotency id: the same request must always produce the same id.
    id: str
    ts: float
    request_id: str
    #: The virtual key's name (never the secret).
    key: str
    model_group: str
    deployment: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    #: USD, rounded to whole pico-USD on construction (as every store keeps it).
    cost: Decimal = Decimal(0)
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    status: int = 200
    #: Token counts were estimated (the upstream reported no usage).
    estimated: bool = False

    def __post_init__(self) -> None:
        self.cost = quantize(Decimal(self.cost))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost"] = str(self.cost)
        return d

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UsageRecord:
        return cls(**{**d, "cost": Decimal(d["cost"])})

    @classmethod
    def from_json(cls, data: bytes | str) -> UsageRecord:
        return cls.from_dict(orjson.loads(data))


@dataclass(slots=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)

    def add(self, r: UsageRecord) -> None:
        self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.cost += r.cost


def totals(records: Sequence[UsageRecord], by: GroupBy) -> dict[str, Totals]:
    """Aggregate records in memory: what every store's ``aggregate`` must equal."""
    out: dict[str, Totals] = {}
    for r in records:
        out.setdefault(getattr(r, by), Totals()).add(r)
    return out


class LedgerStore(Protocol):
    async def write(self, records: Sequence[UsageRecord]) -> int:
        """Store records, ignoring ids already stored; returns how many were new."""
        ...

    async def records(self, since: float, until: float) -> list[UsageRecord]: ...

    async def aggregate(self, since: float, until: float, by: GroupBy = "key") -> dict[str, Totals]: ...


def _check_by(by: str) -> None:
    if by not in _GROUPS:
        raise ValueError(f"cannot aggregate by {by!r}; choose one of {', '.join(_GROUPS)}")


# --------------------------------------------------------------------------- sqlite

_COLUMNS = (
    "id, ts, request_id, key, model_group, deployment, prompt_tokens, completion_tokens, "
    "cached_tokens, cost, cost_pico, latency_ms, ttft_ms, status, estimated"
)


class SqliteLedger:
    """A local ledger in one SQLite file, used from worker threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS usage (id TEXT PRIMARY KEY, ts REAL NOT NULL, "
                "request_id TEXT, key TEXT, model_group TEXT, deployment TEXT, prompt_tokens INTEGER, "
                "completion_tokens INTEGER, cached_tokens INTEGER, cost TEXT, cost_pico INTEGER, "
                "latency_ms REAL, ttft_ms REAL, status INTEGER, estimated INTEGER)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, records: Sequence[UsageRecord]) -> int:
        rows = [
            (
                r.id,
                r.ts,
                r.request_id,
                r.key,
                r.model_group,
                r.deployment,
                r.prompt_tokens,
                r.completion_tokens,
                r.cached_tokens,
                str(r.cost),
                to_pico(r.cost),
                r.latency_ms,
                r.ttft_ms,
                r.status,
                int(r.estimated),
            )
            for r in records
        ]
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    f"INSERT OR IGNORE INTO usage ({_COLUMNS}) VALUES ({','.join('?' * 15)})", rows
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    def _records(self, since: float, until: float) -> list[UsageRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM usage WHERE ts >= ? AND ts < ? ORDER BY ts, id", (since, until)
            ).fetchall()
        return [
            UsageRecord(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                r[8],
                Decimal(r[9]),
                r[11],
                r[12],
                r[13],
                bool(r[14]),
            )
            for r in rows
        ]

    def _aggregate(self, since: float, until: float, by: GroupBy) -> dict[str, Totals]:
        _check_by(by)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {by}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_pico) "
                f"FROM usage WHERE ts >= ? AND ts < ? GROUP BY {by}",
                (since, until),
            ).fetchall()
        return {name: Totals(n, p, c, from_pico(cost)) for name, n, p, c, cost in rows}

    async def write(self, records: Sequence[UsageRecord]) -> int:
        return await asyncio.to_thread(self._write, list(records))

    async def records(self, since: float, until: float) -> list[UsageRecord]:
        return await asyncio.to_thread(self._records, since, until)

    async def aggregate(self, since: float, until: float, by: GroupBy = "key") -> dict[str, Totals]:
        return await asyncio.to_thread(self._aggregate, since, until, by)


# --------------------------------------------------------------------------- redis

# KEYS[1] the stream; per record i, KEYS[1+4(i-1)+1..4] = dedupe key, then the day's aggregate hash
# by key, by model group, by deployment. ARGV[1] dedupe ttl ms, ARGV[2] aggregate ttl ms,
# ARGV[3] stream MAXLEN (0 = never trim); per record 7 values: json, key, model group,
# deployment, prompt, completion, cost in pico-USD (a decimal string; Lua never does math on it).
_WRITE = Script("""
local new, maxlen = 0, tonumber(ARGV[3])
for i = 1, (#KEYS - 1) / 4 do
  local k, a = 1 + 4 * (i - 1), 3 + 7 * (i - 1)
  if redis.call('SET', KEYS[k + 1], '1', 'NX', 'PX', ARGV[1]) then
    if maxlen > 0 then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'r', ARGV[a + 1])
    else
      redis.call('XADD', KEYS[1], '*', 'r', ARGV[a + 1])
    end
    for j = 1, 3 do
      local h, name = KEYS[k + 1 + j], ARGV[a + 1 + j]
      redis.call('HINCRBY', h, name .. '|n', 1)
      redis.call('HINCRBY', h, name .. '|p', ARGV[a + 5])
      redis.call('HINCRBY', h, name .. '|c', ARGV[a + 6])
      redis.call('HINCRBY', h, name .. '|$', ARGV[a + 7])
      redis.call('PEXPIRE', h, ARGV[2])
    end
    new = new + 1
  end
end
return new
""")


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


class RedisLedger:
    """A ledger in a Redis stream with per-day aggregate hashes kept in step by one script."""

    def __init__(
        self,
        client: Redis,
        stream: str = "kubellm:ledger",
        *,
        prefix: str = "kubellm:",
        dedupe_ttl: float = 30 * _DAY,
        aggregate_ttl: float = 400 * _DAY,
        maxlen: int = 0,
        clock_skew: float = 300.0,
    ) -> None:
        self.client = client
        self.stream = stream
        self.prefix = prefix
        self.dedupe_ttl_ms = round(dedupe_ttl * 1000)
        self.aggregate_ttl_ms = round(aggregate_ttl * 1000)
        self.maxlen = maxlen
        #: Stream ids are Redis arrival times; a record's ts can be at most this far ahead of them.
        self.clock_skew = clock_skew

    def _agg_key(self, by: str, day: str) -> str:
        return f"{self.prefix}ledger:agg:{by}:{day}"

    async def write(self, records: Sequence[UsageRecord]) -> int:
        if not records:
            return 0
        keys = [self.stream]
        args: list[Arg] = [self.dedupe_ttl_ms, self.aggregate_ttl_ms, self.maxlen]
        for r in records:
            day = _day(r.ts)
            keys.append(f"{self.prefix}ledger:id:{r.id}")
            keys += [self._agg_key(by, day) for by in _GROUPS]
            args += [r.to_json(), r.key, r.model_group, r.deployment]
            args += [r.prompt_tokens, r.completion_tokens, str(to_pico(r.cost))]
        return int(await _WRITE(self.client, keys, args))

    async def records(self, since: float, until: float) -> list[UsageRecord]:
        # A record is added after it happened (possibly much later, after a spill), so scan
        # from `since` (less the allowed clock skew) to the end of the stream.
        start = f"{max(0, int((since - self.clock_skew) * 1000))}-0"
        out: list[UsageRecord] = []
        while True:
            raw = await self.client.xrange(self.stream, min=start, max="+", count=1000)
            page = cast(list[tuple[bytes, dict[bytes, bytes]]], raw or [])
            for _, fields in page:
                r = UsageRecord.from_json(fields[b"r"])
                if since <= r.ts < until:
                    out.append(r)
            if len(page) < 1000:
                break
            start = "(" + page[-1][0].decode()
        out.sort(key=lambda r: (r.ts, r.id))
        return out

    async def aggregate(self, since: float, until: float, by: GroupBy = "key") -> dict[str, Totals]:
        """Whole UTC days are read from the aggregate hashes (one round trip); other ranges
        are summed from the records. Both agree exactly."""
        _check_by(by)
        if since % _DAY or until % _DAY or not 0 < until - since <= 1000 * _DAY:
            return totals(await self.records(since, until), by)
        pipe = self.client.pipeline(transaction=False)
        for day in range(int(since), int(until), _DAY):
            pipe.hgetall(self._agg_key(by, _day(day)))
        out: dict[str, Totals] = {}
        for fields in await pipe.execute():
            for raw, value in fields.items():
                name, _, kind = raw.decode().rpartition("|")
                t = out.setdefault(name, Totals())
                n = int(value)
                if kind == "n":
                    t.requests += n
                elif kind == "p":
                    t.prompt_tokens += n
                elif kind == "c":
                    t.completion_tokens += n
                else:
                    t.cost += from_pico(n)
        return out


# --------------------------------------------------------------------------- writer


class LedgerWriter:
    """Moves records from the request path to a store without losing any.

    ``submit`` is O(1) and never awaits. Call ``await start()`` once on the
    event loop and ``await close()`` at shutdown; records the store cannot
    take by then stay in the spill file and are replayed by the next start.
    One writer per spill file.
    """

    def __init__(
        self,
        store: LedgerStore,
        spill_path: str | os.PathLike[str],
        *,
        batch_size: int = 100,
        flush_interval: float = 0.25,
        backoff_base: float = 0.05,
        backoff_max: float = 5.0,
    ) -> None:
        self.store = store
        self.spill_path = Path(spill_path)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._queue: collections.deque[UsageRecord] = collections.deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._backoff = 0.0
        self._retry_at = 0.0
        self._replayed_to = 0  # bytes of the spill file already replayed
        #: Counters, for metrics.
        self.submitted = 0
        self.written = 0
        self.spilled = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _spill_size(self) -> int:
        try:
            return self.spill_path.stat().st_size
        except FileNotFoundError:
            return 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kubellm-ledger")

    def submit(self, record: UsageRecord) -> None:
        self._queue.append(record)
        self.submitted += 1
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    async def flush(self) -> bool:
        """Write everything queued, trying the store even while backing off.

        True when the store holds every record (nothing left in the spill file)."""
        async with self._lock:
            return await self._drain(force=True)

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if not await self.flush():
            log.warning("ledger store unreachable at shutdown; records kept in %s", self.spill_path)

    async def _run(self) -> None:
        while not self._closing:
            try:
                async with asyncio.timeout(self.flush_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                async with self._lock:
                    await self._drain(force=False)
            except Exception:  # never let the writer die
                log.exception("ledger writer error")

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self._backoff = min(self.backoff_max, max(self.backoff_base, self._backoff * 2))
        self._retry_at = asyncio.get_running_loop().time() + self._backoff * random.uniform(0.8, 1.2)
        log.warning("ledger store write failed (%s); retrying in %.2fs", exc, self._backoff)

    async def _drain(self, force: bool) -> bool:
        loop = asyncio.get_running_loop()
        store_ok = force or loop.time() >= self._retry_at
        if store_ok and self._spill_size() > self._replayed_to:
            store_ok = await self._replay()
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            if store_ok:
                try:
                    self.written += await self.store.write(batch)
                    self._backoff = 0.0
                    continue
                except Exception as exc:
                    self._failed(exc)
                    store_ok = False
                except BaseException:  # cancelled mid-write: keep the batch for close()
                    self._queue.extendleft(reversed(batch))
                    raise
            try:
                await asyncio.to_thread(self._append_spill, batch)
                self.spilled += len(batch)
            except OSError:
                log.exception(
                    "cannot write the ledger spill file %s; keeping records in memory", self.spill_path
                )
                self._queue.extendleft(reversed(batch))
                return False
        return store_ok and self._spill_size() == 0

    def _append_spill(self, batch: Sequence[UsageRecord]) -> None:
        data = b"".join(r.to_json() + b"\n" for r in batch)
        with open(self.spill_path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _read_spill(self, offset: int, max_records: int) -> tuple[list[UsageRecord], int]:
        """Up to ``max_records`` whole lines from ``offset``; returns them and the next offset."""
        out: list[UsageRecord] = []
        with open(self.spill_path, "rb") as f:
            f.seek(offset)
            while len(out) < max_records:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break  # end of file, or a line torn by a crash mid-write: never complete
                offset += len(line)
                try:
                    out.append(UsageRecord.from_json(line))
                except (ValueError, TypeError):
                    log.error("skipping an unreadable ledger spill line: %r", line[:200])
        return out, offset

    def _truncate_spill(self) -> None:
        with open(self.spill_path, "r+b") as f:
            f.truncate(0)
            os.fsync(f.fileno())

    async def _replay(self) -> bool:
        """Send the spill file to the store; True once all of it is in (and the file emptied)."""
        while True:
            batch, nxt = await asyncio.to_thread(self._read_spill, self._replayed_to, self.batch_size)
            if nxt == self._replayed_to:
                break
            try:
                self.written += await self.store.write(batch)
            except Exception as exc:
                self._failed(exc)
                return False
            self._replayed_to = nxt
        self._backoff = 0.0
        await asyncio.to_thread(self._truncate_spill)
        self._replayed_to = 0
        return True
