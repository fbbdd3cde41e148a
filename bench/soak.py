#!/usr/bin/env python3
"""Soak: a steady request rate against one router + Redis for a long time, watching for leaks.

Everything runs on 127.0.0.1: ``redis-server`` (shared limits, budgets, breakers and the usage
ledger), one ``kubellm router`` process, and a fake OpenAI upstream in its own process. The load
is open-loop (requests start on schedule, whatever the latency), half of them streamed, spread
over many virtual keys that each have an rpm limit and a daily budget, so every request runs
the limiter, the budget and the ledger scripts.

Every ``--sample`` seconds it records the router's RSS (``/proc/<pid>/status``), its open file
descriptors (``/proc/<pid>/fd``), and Redis's key count (``DBSIZE``, split by key family) and
memory. At the end it compares the first minute after ``--warmup`` with the last minute:

* RSS must grow less than ``--max-rss-growth`` percent (default 10);
* open fds must stay under a ceiling set by the pools, not by time: Redis's pool (32), the
  client's connections, and as many upstream connections as requests in flight (``--max-fds``,
  default ``40 + 32 + 2 * --connections``): pools grow in bursts, a leak grows for ever;
* the Redis keys of limits, budgets and breakers must stay bounded (their windows expire);
  the ledger's id sets (one per UTC day, kept 30 days) are reported separately.

    python bench/soak.py                       # 30 minutes at 200 requests/s
    python bench/soak.py --minutes 3 --rps 200 --warmup 30 --json soak.json

The exit code is 1 when a bound did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.redis_server import RedisServer
from tests.support.servers import RouterProcess, free_port, http_get

UPSTREAM_KEY = "sk-soak-upstream"
MASTER_KEY = "sk-soak-master"


def serve_upstream(port: int) -> None:
    """The child process: a fake OpenAI upstream that forgets what it saw (it runs for hours)."""
    from tests.fakes.openai_upstream import FakeOpenAI
    from tests.support.servers import ThreadedApp

    fake = FakeOpenAI(UPSTREAM_KEY, "soak")
    fake.seen = deque(maxlen=100)  # type: ignore[assignment]
    fake.server = ThreadedApp(fake.server.app, port)
    fake.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_kb: int
    fds: int
    redis_keys: int
    redis_memory: int
    families: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    ok: int = 0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


LEDGER_IDS = "ledger id sets (one per day, 30-day TTL)"


def _family(name: bytes) -> str:
    """kubellm:ledger:ids:<day> -> ledger id sets; kubellm:budget:key:k:<period> -> budget buckets; ..."""
    text = name.decode(errors="replace").removeprefix("kubellm:")
    if text.startswith("ledger:ids:"):
        return LEDGER_IDS
    if text.startswith("ledger:agg:"):
        return "ledger daily aggregates"
    if text == "ledger":
        return "ledger stream"
    if text.startswith("budget:"):
        return "budget buckets"
    return "limits, leases, breakers and the rest"


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.samples: list[Sample] = []
        self.statuses: Counter[int] = Counter()
        self.latencies: deque[float] = deque(maxlen=200_000)
        self.sent = 0
        self.started = 0.0
        self.stop = threading.Event()

    # -- the fleet --------------------------------------------------------------------------------

    def config(self, upstream_url: str, redis_url: str) -> dict[str, Any]:
        a = self.args
        keys = [
            {
                "name": f"soak-{i}",
                "keyEnv": f"SOAK_KEY_{i}",
                "limits": {"rpm": 100_000},
                "budget": {"amountUsd": "1000000", "period": "daily"},
            }
            for i in range(a.keys)
        ]
        dep = {
            "model": "soak",
            "provider": "openai-compatible",
            "baseUrl": upstream_url,
            "apiKeyEnv": "SOAK_UPSTREAM_KEY",
            "upstreamModel": "upstream-model",
            "pricing": {"inputPerMillion": "1", "outputPerMillion": "2"},
        }
        return {
            "deployments": [{**dep, "name": "soak-a"}, {**dep, "name": "soak-b"}],
            "keys": keys,
            "settings": {"redis": {"url": redis_url}, "accessLog": False},
        }

    def secrets(self) -> dict[str, str]:
        return {f"SOAK_KEY_{i}": f"sk-soak-{i:04d}-0123456789" for i in range(self.args.keys)}

    # -- sampling ---------------------------------------------------------------------------------

    def sample(self, pid: int, client: redis.Redis) -> Sample:
        families: Counter[str] = Counter()
        for name in client.scan_iter(count=10_000):
            families[_family(name)] += 1
        info = client.info("memory")
        return Sample(
            t=round(time.monotonic() - self.started, 1),
            rss_kb=_rss_kb(pid),
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            redis_keys=int(client.dbsize()),
            redis_memory=int(info["used_memory"]),
            families=dict(families),
            sent=self.sent,
            ok=self.statuses[200],
        )

    def sampler(self, pid: int, port: int) -> None:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            while not self.stop.is_set():
                s = self.sample(pid, client)
                self.samples.append(s)
                print(
                    f"[{s.t:7.1f}s] sent {s.sent:>8} ok {s.ok:>8}  rss {s.rss_kb / 1024:7.1f} MiB  "
                    f"fds {s.fds:>4}  redis keys {s.redis_keys:>8}  "
                    f"redis mem {s.redis_memory / 2**20:7.1f} MiB",
                    flush=True,
                )
                self.stop.wait(self.args.sample)
        finally:
            client.close()

    # -- the load ---------------------------------------------------------------------------------

    async def load(self, base_url: str) -> None:
        a = self.args
        rng = random.Random(a.seed)
        secrets = list(self.secrets().values())
        duration = a.minutes * 60
        in_flight: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=a.connections)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(key: str, stream: bool) -> None:
                body = {
                    "model": "soak",
                    "messages": [{"role": "user", "content": " ".join(["word"] * rng.randint(1, 30))}],
                    "stream": stream,
                }
                started = time.monotonic()
                try:
                    async with session.post(
                        base_url + "/v1/chat/completions",
                        data=orjson.dumps(body),
                        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                        timeout=aiohttp.ClientTimeout(total=30),
                    ) as resp:
                        await resp.read()
                        self.statuses[resp.status] += 1
                except (aiohttp.ClientError, TimeoutError):
                    self.statuses[0] += 1
                self.latencies.append(time.monotonic() - started)

            while True:
                elapsed = time.monotonic() - self.started
                if elapsed >= duration:
                    break
                due = int(elapsed * a.rps) - self.sent
                for _ in range(max(0, due)):
                    if len(in_flight) >= a.max_in_flight:
                        self.statuses[-1] += 1  # shed by the client: the router fell behind
                    else:
                        task = asyncio.create_task(one(rng.choice(secrets), rng.random() < 0.5))
                        in_flight.add(task)
                        task.add_done_callback(in_flight.discard)
                    self.sent += 1
                await asyncio.sleep(0.005)
            if in_flight:
                await asyncio.wait(in_flight, timeout=60)

    # -- the verdict ------------------------------------------------------------------------------

    def verdict(self) -> dict[str, Any]:
        a = self.args
        after = [s for s in self.samples if s.t >= a.warmup]
        if len(after) < 3:
            return {"error": "not enough samples after the warm-up; run longer or lower --warmup"}
        window = max(1, int(60 / a.sample))
        first, last = after[:window], after[-window:]

        def med(samples: list[Sample], attr: str) -> float:
            return float(statistics.median(getattr(s, attr) for s in samples))

        def fam(samples: list[Sample], name: str) -> float:
            return float(statistics.median(s.families.get(name, 0) for s in samples))

        rss0, rss1 = med(first, "rss_kb"), med(last, "rss_kb")
        fd0, fd1 = med(first, "fds"), med(last, "fds")
        bounded = "limits, leases, breakers and the rest"
        lat = sorted(self.latencies)
        dedupe = LEDGER_IDS
        answered = max(1, after[-2].ok - after[0].ok)  # the last sample is taken after the load
        result = {
            "minutes": a.minutes,
            "rps_target": a.rps,
            "sent": self.sent,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "latency_ms": {
                "p50": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
                "p99": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
            },
            "rss_mib": {"baseline": round(rss0 / 1024, 1), "end": round(rss1 / 1024, 1)},
            "rss_growth_pct": round((rss1 - rss0) / rss0 * 100, 2),
            "fds": {"baseline": fd0, "end": fd1},
            "bounded_redis_keys": {"baseline": fam(first, bounded), "end": fam(last, bounded)},
            "redis_keys": {"baseline": med(first, "redis_keys"), "end": med(last, "redis_keys")},
            "redis_memory_mib": {
                "baseline": round(med(first, "redis_memory") / 2**20, 1),
                "end": round(med(last, "redis_memory") / 2**20, 1),
            },
            "ledger_dedupe_keys_per_request": round(
                (after[-2].families.get(dedupe, 0) - after[0].families.get(dedupe, 0)) / answered, 3
            ),
            "redis_bytes_per_request": round((after[-2].redis_memory - after[0].redis_memory) / answered),
            "families_at_end": after[-1].families,
        }
        failures = []
        if result["rss_growth_pct"] >= a.max_rss_growth:
            failures.append(f"RSS grew {result['rss_growth_pct']}% (bound {a.max_rss_growth}%)")
        ceiling = a.max_fds or 40 + 32 + 2 * a.connections
        result["fds"]["max"] = max(s.fds for s in self.samples)
        result["fds"]["ceiling"] = ceiling
        if result["fds"]["max"] > ceiling:
            failures.append(f"open fds reached {result['fds']['max']} (ceiling {ceiling})")
        b0, b1 = result["bounded_redis_keys"]["baseline"], result["bounded_redis_keys"]["end"]
        if b1 > b0 * 1.5 + 50:
            failures.append(f"limit/budget/breaker keys grew from {b0} to {b1}")
        k0, k1 = result["redis_keys"]["baseline"], result["redis_keys"]["end"]
        if k1 > k0 * 1.5 + 50:
            failures.append(f"Redis keys grew from {k0} to {k1}: something keeps a key per request")
        errors = sum(v for k, v in self.statuses.items() if k != 200)
        if errors > self.sent * 0.001:
            failures.append(f"{errors} requests failed or were shed: {dict(self.statuses)}")
        result["failures"] = failures
        return result

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        port = free_port()
        upstream = subprocess.Popen(
            [sys.executable, __file__, "--serve-upstream", str(port)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
            with RedisServer(appendonly=True) as redis_server:
                env = {**self.secrets(), "SOAK_UPSTREAM_KEY": UPSTREAM_KEY, "KUBELLM_MASTER_KEY": MASTER_KEY}
                config = self.config(f"http://127.0.0.1:{port}/v1", redis_server.url)
                with RouterProcess(config, env=env) as router:
                    assert router.proc is not None
                    self.started = time.monotonic()
                    sampler = threading.Thread(
                        target=self.sampler, args=(router.proc.pid, redis_server.port), daemon=True
                    )
                    sampler.start()
                    asyncio.run(self.load(router.base_url))
                    self.stop.set()
                    sampler.join(30)
                    self.samples.append(self.sample(router.proc.pid, redis.Redis(port=redis_server.port)))
                    _status, spend = http_get(
                        router.base_url + "/admin/spend",
                        {"Authorization": f"Bearer {MASTER_KEY}"},
                        timeout=60,
                    )
                    result = self.verdict()
                    result["ledger_requests"] = orjson.loads(spend)["total"]["requests"]
                    result["samples"] = [asdict(s) for s in self.samples]
                    return result
        finally:
            upstream.kill()
            upstream.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default 30)")
    parser.add_argument("--rps", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument(
        "--warmup", type=float, default=120.0, help="seconds before the baseline (default 120)"
    )
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--keys", type=int, default=100, help="virtual keys the load spreads over")
    parser.add_argument("--connections", type=int, default=64, help="client connections to the router")
    parser.add_argument("--max-in-flight", type=int, default=512, help="shed beyond this many in flight")
    parser.add_argument("--max-rss-growth", type=float, default=10.0, help="percent (default 10)")
    parser.add_argument("--max-fds", type=int, help="open fds ceiling (default 40 + 32 + 2 * connections)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path, help="write the full result (with every sample) here")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    result = Soak(args).run()
    samples = result.pop("samples", [])
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    if args.json:
        args.json.write_bytes(orjson.dumps({**result, "samples": samples}, option=orjson.OPT_INDENT_2))
        print(f"written to {args.json}")
    if result.get("failures") or "error" in result:
        print("BOUNDS NOT HELD:", result.get("failures") or result.get("error"))
        return 1
    print("every bound held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
