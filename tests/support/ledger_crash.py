"""Usage records for ledger tests, and a router-like process that submits them until it is killed.

``python -m tests.support.ledger_crash sqlite DB JOURNAL SEED N`` (or ``redis URL PREFIX JOURNAL
SEED N``) starts a :class:`LedgerWriter` on the journal, submits ``make_records(N, SEED)`` as fast
as it can while the writer flushes to the store, and prints how many it has submitted (a line
``K`` as each submit returns, then ``done``), so a kill can land between a submit and its report
(``REPORT_WINDOW``) but never hide more. It never closes the writer: it waits to be killed, like
a router process that dies between answering a request and recording its usage.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from datetime import UTC, datetime

from kubellm.router.metering._ledger import LedgerStore, LedgerWriter, RedisLedger, SqliteLedger, UsageRecord
from kubellm.router.metering._pricing import DEFAULT_PRICES, cost
from kubellm.router.redis_store import connect

DAY0 = datetime(2025, 3, 10, tzinfo=UTC).timestamp()
REPORT_WINDOW = 1  # submits that may have returned unreported when the process is killed


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


def redis_store(url: str, prefix: str) -> RedisLedger:
    return RedisLedger(connect(url), stream=prefix + "ledger", prefix=prefix)


async def submit_until_killed(store: LedgerStore, journal: str, seed: int, n: int) -> None:
    records = make_records(n, seed)
    writer = LedgerWriter(store, journal)  # production defaults: batches of 100, flushed every 0.25 s
    await writer.start()
    out = sys.stdout
    for i, record in enumerate(records, 1):
        writer.submit(record)
        out.write(f"{i}\n")
        out.flush()
        if i % 20 == 0:
            await asyncio.sleep(0)  # let the writer send batches meanwhile, as a busy router would
    out.write("done\n")
    out.flush()
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    if argv[0] == "redis":
        store: LedgerStore = redis_store(argv[1], argv[2])
        rest = argv[3:]
    else:
        store = SqliteLedger(argv[1])
        rest = argv[2:]
    journal, seed, n = rest[0], int(rest[1]), int(rest[2])
    asyncio.run(submit_until_killed(store, journal, seed, n))


if __name__ == "__main__":
    main(sys.argv[1:])
