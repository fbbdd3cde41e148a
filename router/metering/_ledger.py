"""The usage ledger: one record per request, none lost, none counted twice.

The request path calls :meth:`LedgerWriter.submit`, which appends the record
to a local journal (JSON lines, one ``write`` each, so it survives the
process being killed) and queues it. A background task writes batches to a
:class:`LedgerStore` and checkpoints the journal offset the store confirmed;
a writer started on a journal resends everything past the checkpoint, and
records the store refuses stay in the journal and are retried with backoff.
Delivery is therefore at-least-once, and every store ignores a record id it
already holds, so the ledger holds each record exactly once.

Stores:

* :class:`SqliteLedger`: a local table keyed by record id (``INSERT OR IGNORE``).
* :class:`RedisLedger`: a stream plus per-day aggregate hashes. One script
  per batch checks the records' ids against their day's id set and, if none is
  held, XADDs the batch as one stream entry, adds the ids and HINCRBYs the
  aggregates the writer summed; a batch with held ids is sent again without
  them. The aggregates are therefore exactly the sum of the records in the
  stream, and Redis' work per record is one set lookup and one set insert
  (a few microseconds of its CPU; ``bench/metering.py`` measures it). Durability is Redis's own: run it
  with ``appendonly yes``. Id sets live ``dedupe_ttl`` (default 30 days): a
  record replayed later than that would be counted again. The stream is the
  ledger itself and grows with traffic; export and trim it (``maxlen``).

Ranges are half-open, ``since <= ts < until``, on the record's own timestamp.

Aggregates count each record under one outcome (:func:`outcome`): ``requests`` are the
successful ones (status below 400), ``rejected`` those refused with 429 (a key's rate limit or
budget, or every deployment rate-limited), ``failed`` every other error. Tokens and spend sum
all records: a stream broken midway was still billed for what it produced.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import itertools
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import orjson

from ..redis_connect import is_cluster
from ..redis_store import Arg, Client, Script
from ._pricing import format_usd, from_pico, quantize, to_pico

if TYPE_CHECKING:
    from ..config._schema import RedisSettings

log = logging.getLogger("kubellm.ledger")
#: Least time between two saves of the journal's confirmed offset.
CHECKPOINT_SECONDS = 0.5

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
    #: Prompt tokens written to the provider's prompt cache (part of ``prompt_tokens``, like
    #: ``cached_tokens``, the cache reads), priced at the cache-write price.
    cache_write_tokens: int = 0

    def __post_init__(self) -> None:
        self.cost = quantize(Decimal(self.cost))

    def to_json(self) -> bytes:
        return orjson.dumps(self, default=_decimal)  # cost as a string, like from_dict reads it

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UsageRecord:
        # Fields a newer router added are dropped, so a rolled-back router still reads its journal.
        known = {k: v for k, v in d.items() if k in _FIELDS}
        return cls(**{**known, "cost": Decimal(d["cost"])})

    @classmethod
    def from_json(cls, data: bytes | str) -> UsageRecord:
        return cls.from_dict(orjson.loads(data))


_FIELDS = frozenset(UsageRecord.__dataclass_fields__)


Outcome = Literal["n", "r", "f"]


def outcome(status: int) -> Outcome:
    """The aggregate a record counts under: ``n`` succeeded, ``r`` rejected (429), ``f`` failed."""
    if status < 400:
        return "n"
    return "r" if status == 429 else "f"


@dataclass(slots=True)
class Totals:
    #: Successful requests (status below 400).
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    #: Requests refused with 429: a rate limit or budget.
    rejected: int = 0
    #: Requests that ended in any other error.
    failed: int = 0

    def count(self, kind: Outcome, n: int = 1) -> None:
        if kind == "n":
            self.requests += n
        elif kind == "r":
            self.rejected += n
        else:
            self.failed += n

    def merge(self, t: Totals) -> None:
        self.requests += t.requests
        self.rejected += t.rejected
        self.failed += t.failed
        self.prompt_tokens += t.prompt_tokens
        self.completion_tokens += t.completion_tokens
        self.cost += t.cost

    def add(self, r: UsageRecord) -> None:
        self.count(outcome(r.status))
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
    "cached_tokens, cost, cost_pico, latency_ms, ttft_ms, status, estimated, cache_write_tokens"
)
_NAMES = [name.strip() for name in _COLUMNS.split(",")]


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
            # Ledgers created before cache writes were metered lack the column: add it in place.
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(usage)")}
            if "cache_write_tokens" not in columns:
                self._db.execute("ALTER TABLE usage ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0")

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
                format_usd(r.cost),
                to_pico(r.cost),
                r.latency_ms,
                r.ttft_ms,
                r.status,
                int(r.estimated),
                r.cache_write_tokens,
            )
            for r in records
        ]
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    f"INSERT OR IGNORE INTO usage ({_COLUMNS}) VALUES ({','.join('?' * 16)})", rows
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
        records = []
        for row in rows:
            d = dict(zip(_NAMES, row, strict=True))
            del d["cost_pico"]
            d.update(cost=Decimal(d["cost"]), estimated=bool(d["estimated"]))
            records.append(UsageRecord(**{**d, "cache_write_tokens": d["cache_write_tokens"] or 0}))
        return records

    def _aggregate(self, since: float, until: float, by: GroupBy) -> dict[str, Totals]:
        _check_by(by)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {by}, SUM(status < 400), SUM(prompt_tokens), SUM(completion_tokens), "
                "SUM(cost_pico), SUM(status = 429), SUM(status >= 400 AND status != 429) "
                f"FROM usage WHERE ts >= ? AND ts < ? GROUP BY {by}",
                (since, until),
            ).fetchall()
        return {name: Totals(n, p, c, from_pico(cost), r, f) for name, n, p, c, cost, r, f in rows}

    async def write(self, records: Sequence[UsageRecord]) -> int:
        return await asyncio.to_thread(self._write, list(records))

    async def records(self, since: float, until: float) -> list[UsageRecord]:
        return await asyncio.to_thread(self._records, since, until)

    async def aggregate(self, since: float, until: float, by: GroupBy = "key") -> dict[str, Totals]:
        return await asyncio.to_thread(self._aggregate, since, until, by)


# --------------------------------------------------------------------------- redis

# One script per batch, whose Redis work does not grow with the fields summed: the router sums the
# batch's aggregates and Redis only checks ids, appends one stream entry and adds the sums.
# KEYS[1] the stream, KEYS[2..1+D] the id sets of the D days the batch touches, then the aggregate
# hashes. ARGV[1] dedupe ttl ms, ARGV[2] aggregate ttl ms, ARGV[3] stream MAXLEN (0 = never trim),
# ARGV[4] D, ARGV[5] the batch (the records' JSON lines, newline-separated); then per id set its
# count and ids; then per hash its field count and (field, increment) pairs. If any id is already
# held, nothing is written and the held ids are returned (the caller drops them and retries), so the
# aggregates stay exactly the sum of the stream's records. One id set per day (not one key per
# record) keeps Redis' key count bounded.
_WRITE = Script("""
local days, pos, held = tonumber(ARGV[4]), 6, {}
for d = 1, days do
  local n = tonumber(ARGV[pos])
  local seen = redis.call('SMISMEMBER', KEYS[1 + d], unpack(ARGV, pos + 1, pos + n))
  for i = 1, n do
    if seen[i] == 1 then held[#held + 1] = ARGV[pos + i] end
  end
  pos = pos + 1 + n
end
if #held > 0 then return held end
local maxlen = tonumber(ARGV[3])
if maxlen > 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'b', ARGV[5])
else
  redis.call('XADD', KEYS[1], '*', 'b', ARGV[5])
end
pos = 6
for d = 1, days do
  local n = tonumber(ARGV[pos])
  redis.call('SADD', KEYS[1 + d], unpack(ARGV, pos + 1, pos + n))
  redis.call('PEXPIRE', KEYS[1 + d], ARGV[1])
  pos = pos + 1 + n
end
for h = 2 + days, #KEYS do
  local n = tonumber(ARGV[pos])
  for i = 1, n do
    redis.call('HINCRBY', KEYS[h], ARGV[pos + 2 * i - 1], ARGV[pos + 2 * i])
  end
  redis.call('PEXPIRE', KEYS[h], ARGV[2])
  pos = pos + 1 + 2 * n
end
return days
""")
#: Records per script call: Lua's unpack() takes a few thousand values at most.
_CHUNK = 1000


def decode_entry(fields: dict[bytes, bytes]) -> list[UsageRecord]:
    """The records of one ledger stream entry: a batch (``b``) or, as older routers wrote, one (``r``)."""
    batch = fields.get(b"b")
    if batch is None:
        return [UsageRecord.from_json(fields[b"r"])]
    return [UsageRecord.from_json(line) for line in batch.split(b"\n")]


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


class RedisLedger:
    """A ledger in a Redis stream with per-day aggregate hashes kept in step by one script."""

    def __init__(
        self,
        client: Client,
        stream: str = "kubellm:ledger",
        *,
        prefix: str = "kubellm:",
        dedupe_ttl: float = 30 * _DAY,
        aggregate_ttl: float = 400 * _DAY,
        maxlen: int = 0,
        clock_skew: float = 300.0,
        wait_replicas: int = 0,
    ) -> None:
        self.client = client
        #: A batch is confirmed once this many replicas hold it (``WAIT``), so a failover to one
        #: of them loses no confirmed record; else it raises and the writer sends it again.
        self.wait_replicas = wait_replicas
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
        new = 0
        for i in range(0, len(records), _CHUNK):
            new += await self._write_chunk(records[i : i + _CHUNK])
        return new

    async def _write_chunk(self, records: Sequence[UsageRecord]) -> int:
        pending = {r.id: r for r in records}  # a batch holding one id twice stores it once
        while pending:
            keys, args = self._script_input(list(pending.values()))
            if self.wait_replicas:
                held = await self._write_replicated(keys, args)
            else:
                held = await _WRITE(self.client, keys, args)
            if not isinstance(held, list):
                return len(pending)
            for raw in held:
                pending.pop(raw.decode() if isinstance(raw, bytes) else str(raw), None)
        return 0

    def _script_input(self, records: list[UsageRecord]) -> tuple[list[str], list[Arg]]:
        ids: dict[str, list[Arg]] = {}
        sums: dict[str, dict[str, int]] = {}
        for r in records:
            day = _day(r.ts)
            ids.setdefault(f"{self.prefix}ledger:ids:{day}", []).append(r.id)
            kind, cost = outcome(r.status), to_pico(r.cost)
            for by, name in (("key", r.key), ("model_group", r.model_group), ("deployment", r.deployment)):
                fields = sums.setdefault(self._agg_key(by, day), {})
                for field, n in ((kind, 1), ("p", r.prompt_tokens), ("c", r.completion_tokens), ("$", cost)):
                    if n:
                        fields[f"{name}|{field}"] = fields.get(f"{name}|{field}", 0) + n
        blob = b"\n".join(r.to_json() for r in records)
        keys = [self.stream, *ids, *sums]
        args: list[Arg] = [self.dedupe_ttl_ms, self.aggregate_ttl_ms, self.maxlen, len(ids), blob]
        for members in ids.values():
            args += [len(members), *members]
        for fields in sums.values():
            args.append(len(fields))
            for field, n in fields.items():
                args += [field, n]
        return keys, args

    async def _write_replicated(self, keys: list[str], args: list[Arg]) -> object:
        # WAIT covers the writes of its own connection: the script and WAIT share one pipeline.
        await _WRITE.load(self.client)
        pipe = self.client.pipeline(transaction=False)
        pipe.evalsha(_WRITE.sha, len(keys), *keys, *args)
        pipe.execute_command("WAIT", self.wait_replicas, 1000)
        result, acked = await pipe.execute()
        if int(acked) < self.wait_replicas:
            raise ConnectionError(f"ledger batch reached {acked} of {self.wait_replicas} replicas")
        return result

    async def records(self, since: float, until: float) -> list[UsageRecord]:
        # A record is added after it happened (possibly much later, after a spill), so scan
        # from `since` (less the allowed clock skew) to the end of the stream.
        start = f"{max(0, int((since - self.clock_skew) * 1000))}-0"
        out: list[UsageRecord] = []
        while True:
            raw = await self.client.xrange(self.stream, min=start, max="+", count=1000)
            page = cast(list[tuple[bytes, dict[bytes, bytes]]], raw or [])
            for _, fields in page:
                out += [r for r in decode_entry(fields) if since <= r.ts < until]
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
                if kind in ("n", "r", "f"):
                    t.count(cast(Outcome, kind), n)
                elif kind == "p":
                    t.prompt_tokens += n
                elif kind == "c":
                    t.completion_tokens += n
                else:
                    t.cost += from_pico(n)
        return out


# --------------------------------------------------------------------------- writer


class LedgerWriter:
    """Moves records from the request path to a store, losing none even if the process is killed.

    ``submit`` (O(1), never awaits; call it on the event loop's thread) queues the record and
    appends its line to the journal with one ``write``: it is in the OS page cache, safe from a
    SIGKILL, when ``submit`` returns. Batches go to the store in journal order; the offset the
    store confirmed is saved in ``<journal>.confirmed``, and a writer started on the journal
    resends what lies past it. A fully confirmed journal is truncated. While the store fails, and
    past ``max_queued``, the queue is dropped ("spilled") and read back from the journal later.
    ``fsync_interval`` (seconds) guards against machine crashes too. One writer per journal (locked).
    """

    def __init__(
        self,
        store: LedgerStore,
        journal_path: str | os.PathLike[str],
        *,
        batch_size: int = 100,
        flush_interval: float = 0.25,
        backoff_base: float = 0.05,
        backoff_max: float = 5.0,
        max_queued: int = 10_000,
        fsync_interval: float | None = None,
    ) -> None:
        self.store = store
        self.journal_path = Path(journal_path)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_queued = max_queued
        self.fsync_interval = fsync_interval
        self._confirmed_path = self.journal_path.with_name(self.journal_path.name + ".confirmed")
        # Journal offsets: the store holds every record before _sent; those in [_sent, _mem) are
        # read back from the file; _queue holds those in [_mem, _end), each with its end offset.
        self._queue: collections.deque[tuple[UsageRecord, int]] = collections.deque()
        self._sent = self._mem = self._end = 0
        self._prefix = b""  # goes before the next line: a new journal's header, or a torn line's end
        self._gen = ""  # the journal's generation, named in its header and in each checkpoint
        self._unjournaled = False  # the queue holds records the journal failed to take: never spill
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._backoff = self._retry_at = self._fsync_at = self._checkpoint_at = 0.0
        #: Counters, for metrics.
        self.submitted = self.written = self.spilled = self.failures = self.journal_errors = 0
        self._journal = open(self.journal_path, "a+b", buffering=0)  # noqa: SIM115 - closed in close()
        try:
            self._recover(self._journal.fileno())
        except BaseException:
            self._journal.close()
            raise

    def _recover(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"ledger journal {self.journal_path} is used by another writer") from None
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            size += os.write(fd, b"\n")  # end a line torn by a crash mid-write (it is skipped)
        try:
            self._gen = orjson.loads(os.pread(fd, 64, 0).partition(b"\n")[0])["journal"]
        except (ValueError, TypeError, KeyError):
            self._gen = "" if size else self._new_generation()
        try:
            gen, _, raw = self._confirmed_path.read_text().rpartition(" ")
            if gen == self._gen and 0 < int(raw) <= size and os.pread(fd, 1, int(raw) - 1) == b"\n":
                self._sent = int(raw)
        except (OSError, ValueError):
            pass  # no usable checkpoint: resend the whole journal
        self._mem = self._end = size

    def _new_generation(self) -> str:
        self._gen = os.urandom(8).hex()
        self._prefix = b'{"journal":"%s"}\n' % self._gen.encode()
        return self._gen

    @property
    def pending(self) -> int:
        """Records held in memory for the store (the journal may hold more)."""
        return len(self._queue)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kubellm-ledger")
            self._wake.set()  # at once: resend what a previous process left unconfirmed

    def submit(self, record: UsageRecord) -> None:
        line = self._prefix + orjson.dumps(record, default=_decimal, option=orjson.OPT_APPEND_NEWLINE)
        n = 0
        try:
            n = self._journal.write(line)
            self._prefix = b"" if n == len(line) else b"\n"
            if n != len(line):
                raise OSError(f"short write, {n} of {len(line)} bytes")
        except (OSError, ValueError) as exc:  # ValueError: submitted after close()
            self.journal_errors += 1
            if not self._unjournaled:
                self._unjournaled = True
                log.error("cannot write the ledger journal (%s): records kept in memory only", exc)
        self._end += n
        self._queue.append((record, self._end))
        self.submitted += 1
        if len(self._queue) == self.batch_size:
            self._wake.set()
        elif len(self._queue) > self.max_queued:
            self._spill()

    def _spill(self) -> None:
        """Drop the queued records from memory: they are read back from the journal."""
        if not self._unjournaled:
            self.spilled += len(self._queue)
            self._queue.clear()
            self._mem = self._end

    async def flush(self) -> bool:
        """Write everything unconfirmed, trying the store even while backing off.

        True when the store holds every record (and the journal is empty)."""
        async with self._lock:
            return await self._drain(force=True)

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if not await self.flush():
            log.warning("ledger store unreachable at shutdown; records kept in %s", self.journal_path)
        if self.fsync_interval is not None:
            await asyncio.to_thread(os.fsync, self._journal.fileno())
        self._queue.clear()
        self._journal.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
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
                if self.fsync_interval is not None and loop.time() >= self._fsync_at:
                    self._fsync_at = loop.time() + self.fsync_interval
                    await asyncio.to_thread(os.fsync, self._journal.fileno())
            except Exception:  # never let the writer die
                log.exception("ledger writer error")

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self._backoff = min(self.backoff_max, max(self.backoff_base, self._backoff * 2))
        self._retry_at = asyncio.get_running_loop().time() + self._backoff * random.uniform(0.8, 1.2)
        log.warning("ledger store write failed (%s); retrying in %.2fs", exc, self._backoff)

    async def _drain(self, force: bool) -> bool:
        if not force and asyncio.get_running_loop().time() < self._retry_at:
            return False
        while self._sent < self._mem or self._queue:
            start, mem = self._sent, self._mem
            try:
                if start < mem:
                    batch, end = await asyncio.to_thread(self._read, start, mem)
                else:
                    batch = [r for r, _ in itertools.islice(self._queue, self.batch_size)]
                    end = self._queue[len(batch) - 1][1]
                if batch:
                    self.written += await self.store.write(batch)
            except Exception as exc:
                self._failed(exc)
                self._spill()
                if 0 < self._sent < self._end:
                    self._checkpoint()  # what was confirmed before the failure is not resent
                return False
            if start == mem == self._mem:  # sent from the queue, and not spilled meanwhile
                for _ in batch:
                    self._queue.popleft()
                self._mem = end
            self._sent = end
            # Under load the journal rarely empties: save the confirmed offset now and then. A stale
            # one only means resending more after a crash (the stores drop duplicates by id).
            if end < self._end and time.monotonic() >= self._checkpoint_at:
                self._checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
                self._checkpoint()
        self._backoff = 0.0
        self._unjournaled = False
        if self._end:
            self._truncate()
        return True

    def _read(self, offset: int, stop: int) -> tuple[list[UsageRecord], int]:
        """Up to ``batch_size`` records from the lines in [offset, stop), and where they end."""
        out: list[UsageRecord] = []
        with open(self.journal_path, "rb") as f:
            f.seek(offset)
            while offset < stop and len(out) < self.batch_size:
                line = f.readline(stop - offset)
                if not line:
                    log.error("the ledger journal %s is shorter than written", self.journal_path)
                    return out, stop
                offset += len(line)
                try:
                    d = orjson.loads(line)
                    if "journal" not in d:  # the header
                        out.append(UsageRecord.from_dict(d))
                except (ValueError, TypeError):
                    log.error("skipping an unreadable ledger journal line: %r", line[:200])
        return out, offset

    def _checkpoint(self) -> None:
        """Save the confirmed offset, atomically. A stale one only means resending more."""
        tmp = self._confirmed_path.with_name(self._confirmed_path.name + ".tmp")
        try:
            tmp.write_text(f"{self._gen} {self._sent}")
            os.replace(tmp, self._confirmed_path)
        except OSError as exc:
            log.warning("cannot save the ledger checkpoint %s: %s", self._confirmed_path, exc)

    def _truncate(self) -> None:
        """Empty the confirmed journal. No await since the check, so no submit comes in between."""
        try:
            self._confirmed_path.unlink(missing_ok=True)  # first: a crash in between resends, never skips
            os.ftruncate(self._journal.fileno(), 0)
        except (OSError, ValueError) as exc:
            log.warning("cannot truncate the ledger journal %s: %s", self.journal_path, exc)
            return
        self._sent = self._mem = self._end = 0
        self._new_generation()


def _decimal(obj: object) -> str:
    if isinstance(obj, Decimal):
        return format_usd(obj)
    raise TypeError


def redis_ledger(client: Client, settings: RedisSettings) -> RedisLedger:
    """The Redis ledger the routers write and the operator reads. On a cluster its keys share one slot
    (``{ledger}``): a batch is one script, off the request path."""
    prefix = settings.key_prefix + ("{ledger}:" if is_cluster(client) else "")
    return RedisLedger(client, f"{prefix}ledger", prefix=prefix, wait_replicas=settings.ledger_wait_replicas)
