"""Load with faults: routers behind nginx, a real Redis, fake upstreams, and a timeline of faults.

One harness for two callers: ``tests/test_chaos.py`` runs a short cycle in CI and asserts the
bounds; ``bench/chaos.py`` runs longer (several cycles) and publishes the numbers.

The fleet (everything on 127.0.0.1):

* ``redis-server`` with ``appendonly yes`` (the ledger's documented durability), shared by
* ``routers`` ``kubellm router`` processes, each with its own config file and state directory
  (ledger journal), behind
* ``nginx`` round-robin with ``proxy_next_upstream error timeout http_502``. nginx passes a POST
  to the next router only if the first never received it (connection refused): it does not
  replay requests a router may have started (``non_idempotent`` is deliberately off: that could
  bill twice). A request in flight on a killed router is therefore lost *to nginx*; the client's
  own retries (the openai SDK's, ``max_retries=2``) are what recover it, as in production.
* three fake OpenAI upstreams: deployments ``gpt-a`` and ``gpt-b`` of the group ``gpt``, and
  ``fallback`` of the group ``gpt-fallback`` that ``gpt`` falls back to. Each records the usage it
  reported for every answer it sent whole (:attr:`FakeOpenAI.answered`).

The load: ``load_workers`` asyncio workers over many virtual keys (``keyEnv``), half streamed;
plus an rpm-limited key and a budget-limited key, whose clients do not retry (429s are counted).
Every key has a (huge or real) rpm limit, so a response carrying ``x-ratelimit-*`` headers proves
it was admitted through Redis, and one without them was admitted fail-open (Redis unreachable).

The faults, per cycle: ``gpt-a`` answers 500s, then 429 + Retry-After, then hangs past the first
token timeout, then resets connections (``gpt-b`` cuts its streams after the headers meanwhile),
then cuts streams after their first bytes; one router is killed with SIGKILL and restarted;
Redis is killed and restarted (overlapping a second 500 phase); and the config file is swapped
(a valid change while a router is down, an invalid one, and a valid one) under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import redis

from kubellm.router.metering._ledger import UsageRecord, decode_entry
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.support.redis_server import RedisServer
from tests.support.servers import RouterProcess, as_written, free_port, http_get

UPSTREAM_KEY = "sk-chaos-upstream-0123456789"
MASTER_KEY = "sk-chaos-master-0123456789"
RPM_KEY = "sk-chaos-rpm-0123456789"
BUDGET_KEY = "sk-chaos-budget-0123456789"
LATE_KEY = "sk-chaos-late-0123456789"
PRICING = {"inputPerMillion": "100", "outputPerMillion": "200"}
#: Every answer of the fakes is "<name> says hi to upstream-model": 5 completion tokens.
COMPLETION_TOKENS = 5
#: The budget key always sends one one-word message: 1 + 4 prompt tokens at the fakes.
BUDGET_COST = (Decimal(5) * 100 + Decimal(COMPLETION_TOKENS) * 200) / Decimal(1_000_000)


def load_keys(n: int) -> dict[str, str]:
    """Environment variable -> secret for the ``n`` load keys."""
    return {f"CHAOS_KEY_{i}": f"sk-chaos-load-{i:03d}-0123456789" for i in range(n)}


@dataclass
class ChaosOptions:
    cycles: int = 1
    #: Seconds per fault cycle; the load runs for ``cycles * cycle_seconds``.
    cycle_seconds: float = 36.0
    routers: int = 2
    load_keys: int = 20
    load_workers: int = 24
    stream_share: float = 0.5
    rpm: int = 40
    rpm_workers: int = 2
    budget_usd: Decimal = Decimal("0.03")
    budget_workers: int = 3
    seed: int = 7


# --------------------------------------------------------------------------- nginx


class Nginx:
    """nginx round-robin in front of the routers, from a config written into a temp dir."""

    def __init__(self, ports: list[int]) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(binary):
            raise RuntimeError("nginx is not installed")
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="kubellm-nginx-"))
        self.dir.chmod(0o755)  # workers may run as another user
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in ports)
        d = self.dir
        self.config = d / "nginx.conf"
        self.config.write_text(
            f"""worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
  log_format chaos '$status $request_time "$upstream_addr" "$upstream_status"';
  access_log {d}/access.log chaos;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream routers {{
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{self.port};
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    location / {{
      proxy_pass http://routers;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_connect_timeout 1s;
      proxy_read_timeout 60s;
      proxy_next_upstream error timeout http_502;
      proxy_next_upstream_tries 2;
    }}
  }}
}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        log = open(self.dir / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.dir), "-c", str(self.config), "-e", str(self.dir / "error.log")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.dir / 'error.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                status, _ = http_get(self.base_url + "/health/liveness", timeout=1)
                if status == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def upstream_retries(self) -> int:
        """Requests nginx passed to a second router (its access log shows two upstream addresses)."""
        path = self.dir / "access.log"
        if not path.exists():
            return 0
        return sum(1 for line in path.read_text().splitlines() if ", 127.0.0.1:" in line)


# --------------------------------------------------------------------------- the fleet


def router_config(fleet: Fleet, revision: int, options: ChaosOptions, redis_url: str) -> dict[str, Any]:
    # Generous for a shared 2-core CI machine: a healthy fake never comes near it, a hang does.
    timeouts = {"connect": 1.0, "firstToken": 2.0}

    def dep(name: str, model: str, fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "model": model,
            "provider": "openai-compatible",
            "upstreamModel": "upstream-model",
            "baseUrl": fake.base_url,
            "apiKeyEnv": "CHAOS_UPSTREAM_KEY",
            "pricing": PRICING,
            "timeouts": timeouts,
            **extra,
        }

    marker = {"rpm": 1_000_000}  # a limit that never binds: its headers prove admission went through Redis
    keys: list[dict[str, Any]] = [
        {"name": f"load-{i}", "keyEnv": env, "limits": marker}
        for i, env in enumerate(load_keys(options.load_keys))
    ]
    keys.append({"name": "rpm", "keyEnv": "CHAOS_RPM_KEY", "limits": {"rpm": options.rpm}})
    keys.append(
        {
            "name": "budget",
            "keyEnv": "CHAOS_BUDGET_KEY",
            "limits": marker,
            "budget": {"amountUsd": str(options.budget_usd), "period": "daily"},
        }
    )
    if revision % 2:  # each revision is a real change: a key comes and goes, a weight moves
        keys.append({"name": f"late-{revision}", "keyEnv": "CHAOS_LATE_KEY"})
    return {
        "deployments": [
            dep("gpt-a", "gpt", fleet.a),
            dep("gpt-b", "gpt", fleet.b, weight=1 + revision % 2),
            dep("fallback", "gpt-fallback", fleet.f),
        ],
        "modelGroups": [{"name": "gpt", "fallbacks": ["gpt-fallback"]}],
        "keys": keys,
        "settings": {
            "redis": {"url": redis_url},
            "numRetries": 2,
            "initialBackoffSeconds": 0.02,
            "maxBackoffSeconds": 0.5,
            "reloadIntervalSeconds": 0.2,
            "requestTimeoutSeconds": 20,
            "accessLog": False,
            "cooldown": {
                "failureThreshold": 3,
                "windowSeconds": 10,
                "cooldownSeconds": 1.0,
                # A probe held by the router that the next fault SIGKILLs blocks other probes this
                # long: at 5 s, gpt-a's recovery from the fault before the kill measured 7-8 s.
                "probeTimeoutSeconds": 2,
            },
        },
    }


class Fleet:
    def __init__(self, options: ChaosOptions) -> None:
        self.options = options
        self.redis = RedisServer(appendonly=True)
        self.a = FakeOpenAI(UPSTREAM_KEY, "gpt-a")
        self.b = FakeOpenAI(UPSTREAM_KEY, "gpt-b")
        self.f = FakeOpenAI(UPSTREAM_KEY, "fallback")
        for fake in self.fakes:
            fake.answered = []
        self.routers: list[RouterProcess] = []
        self.nginx: Nginx | None = None
        self.revision = 0
        self.env = {
            "CHAOS_UPSTREAM_KEY": UPSTREAM_KEY,
            "KUBELLM_MASTER_KEY": MASTER_KEY,
            "CHAOS_RPM_KEY": RPM_KEY,
            "CHAOS_BUDGET_KEY": BUDGET_KEY,
            "CHAOS_LATE_KEY": LATE_KEY,
            **load_keys(options.load_keys),
        }

    @property
    def fakes(self) -> tuple[FakeOpenAI, FakeOpenAI, FakeOpenAI]:
        return self.a, self.b, self.f

    @property
    def base_url(self) -> str:
        assert self.nginx is not None
        return self.nginx.base_url

    def config(self, revision: int) -> dict[str, Any]:
        return router_config(self, revision, self.options, self.redis.url)

    def start(self) -> Fleet:
        self.redis.start()
        for fake in self.fakes:
            fake.start()
        self.routers = [RouterProcess(self.config(0), env=self.env) for _ in range(self.options.routers)]
        for router in self.routers:
            router.start(wait=False)
        for router in self.routers:
            router.wait_ready(30)
        self.nginx = Nginx([r.port for r in self.routers]).start()
        return self

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        for router in self.routers:
            router.stop()
        for fake in self.fakes:
            fake.stop()
        self.redis.stop()
        shutil.rmtree(self.redis.dir, ignore_errors=True)

    def __enter__(self) -> Fleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------------------

    def kill_router(self, index: int) -> int:
        """SIGKILL, as a crash or an OOM kill would; returns the pid."""
        proc = self.routers[index].proc
        assert proc is not None
        proc.kill()
        proc.wait(10)
        return proc.pid

    def restart_router(self, index: int) -> float:
        """Start the killed router again on its port and state directory; returns seconds to ready."""
        router = self.routers[index]
        with contextlib.suppress(Exception):
            router._log.close()
        started = time.monotonic()
        router.start(wait=False)
        router.wait_ready(30)
        return time.monotonic() - started

    def write_config(self, text: str | None = None) -> str | None:
        """Swap every router's config file: the next revision, or raw ``text``; returns the version."""
        if text is None:
            self.revision += 1
            doc = self.config(self.revision)
            for router in self.routers:
                router.write_config(doc)
            from kubellm.router.config._schema import parse_config

            return parse_config(as_written(doc)).version
        for router in self.routers:
            assert router.config_path is not None
            tmp = router.config_path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(router.config_path)
        return None

    def versions(self) -> list[str | None]:
        out: list[str | None] = []
        for router in self.routers:
            try:
                _status, body = http_get(router.base_url + "/health/readiness", timeout=1)
                out.append(orjson.loads(body).get("configVersion"))
            except (OSError, ValueError):
                out.append(None)
        return out

    def flush_ledgers(self) -> None:
        """Ask every router to write its pending usage records (``/admin/spend`` flushes first)."""
        for router in self.routers:
            http_get(router.base_url + "/admin/spend", {"Authorization": f"Bearer {MASTER_KEY}"}, timeout=10)

    def ledger(self) -> tuple[list[UsageRecord], int]:
        """Every record in the Redis ledger stream (one entry holds a batch), and the number of entries."""
        client = redis.Redis(host="127.0.0.1", port=self.redis.port)
        try:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange("kubellm:ledger", "-", "+")  # type: ignore[assignment]
        finally:
            client.close()
        return [r for _, fields in entries for r in decode_entry(fields)], len(entries)

    def budget_spent(self) -> Decimal:
        status, body = http_get(self.base_url + "/v1/key/info", {"Authorization": f"Bearer {BUDGET_KEY}"})
        assert status == 200, body
        return Decimal(orjson.loads(body)["budget"]["spentUsd"])


# --------------------------------------------------------------------------- the load


@dataclass
class Outcome:
    """One logical client call (the SDK's retries included)."""

    kind: str  # load | rpm | budget
    key: str
    stream: bool
    t0: float  # monotonic
    wall0: float
    t1: float = 0.0
    status: int = 0  # 200, the final HTTP error status, or 0 for a connection or stream error
    code: str | None = None
    error: str | None = None
    request_id: str | None = None
    completion_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    rate_remaining: int | None = None
    rate_reset: float | None = None
    attempts: int = 0
    #: Statuses of the failed HTTP attempts before the last one, with who answered them.
    failed_attempts: list[tuple[int, str]] = field(default_factory=list)


_CURRENT: contextvars.ContextVar[Outcome | None] = contextvars.ContextVar("chaos_outcome", default=None)
_RESET = re.compile(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?(?:(\d+)ms)?$")


def parse_reset(text: str) -> float:
    """``x-ratelimit-reset-*`` (``20ms``, ``1s``, ``6m0s``, ``1h2m3.5s``) in seconds."""
    m = _RESET.match(text)
    if not m:
        raise ValueError(text)
    h, mi, s, ms = m.groups()
    return int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0) + int(ms or 0) / 1000


async def _on_request(request: httpx2.Request) -> None:
    current = _CURRENT.get()
    if current is not None:
        current.attempts += 1


async def _on_response(response: httpx2.Response) -> None:
    current = _CURRENT.get()
    if current is not None and response.status_code >= 500:
        who = "router" if "x-request-id" in response.headers else response.headers.get("server", "?")
        current.failed_attempts.append((response.status_code, who))


class Load:
    """The client side: the openai SDK over many keys, in a thread with its own event loop."""

    def __init__(self, base_url: str, options: ChaosOptions, duration: float) -> None:
        self.base_url = base_url + "/v1"
        self.options = options
        self.duration = duration
        self.outcomes: list[Outcome] = []
        self.started = 0.0
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Load:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join(self.duration + 120)
        if self._thread.is_alive():
            raise RuntimeError("the load did not stop")
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by join()
            self.error = exc

    def _client(self, key: str, retries: int) -> openai.AsyncOpenAI:
        http = openai.DefaultAsyncHttpxClient(
            event_hooks={"request": [_on_request], "response": [_on_response]},
            limits=httpx2.Limits(max_connections=64, max_keepalive_connections=64),
        )
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=key, max_retries=retries, timeout=30, http_client=http
        )

    async def _main(self) -> None:
        o = self.options
        stop_at = self.started + self.duration
        rng = random.Random(o.seed)
        secrets = list(load_keys(o.load_keys).values())
        clients = [self._client(secret, 2) for secret in secrets]
        rpm_client = self._client(RPM_KEY, 0)
        budget_client = self._client(BUDGET_KEY, 0)
        workers = [
            self._worker("load", f"load-{i % len(clients)}", clients[i % len(clients)], stop_at, rng, 0.0)
            for i in range(o.load_workers)
        ]
        workers += [self._worker("rpm", "rpm", rpm_client, stop_at, rng, 0.15) for _ in range(o.rpm_workers)]
        workers += [
            self._worker("budget", "budget", budget_client, stop_at, rng, 0.2)
            for _ in range(o.budget_workers)
        ]
        await asyncio.gather(*workers)
        for client in [*clients, rpm_client, budget_client]:
            await client.close()

    async def _worker(
        self, kind: str, key: str, client: openai.AsyncOpenAI, stop_at: float, rng: random.Random, pace: float
    ) -> None:
        while time.monotonic() < stop_at:
            stream = rng.random() < self.options.stream_share
            words = 1 if kind == "budget" else rng.randint(1, 20)
            out = Outcome(kind, key, stream, time.monotonic(), time.time())
            _CURRENT.set(out)
            await self._call(client, out, " ".join(["word"] * words))
            out.t1 = time.monotonic()
            _CURRENT.set(None)
            self.outcomes.append(out)
            if pace:
                await asyncio.sleep(pace)

    async def _call(self, client: openai.AsyncOpenAI, out: Outcome, text: str) -> None:
        messages: Any = [{"role": "user", "content": text}]
        extra: dict[str, Any] = {"max_tokens": 5} if out.kind == "budget" else {}
        try:
            if out.stream:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt",
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    **extra,
                )
                self._headers(out, raw.headers)
                async for chunk in raw.parse():
                    out.completion_id = chunk.id
                    if chunk.usage is not None:
                        out.prompt_tokens = chunk.usage.prompt_tokens
                        out.completion_tokens = chunk.usage.completion_tokens
            else:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt", messages=messages, **extra
                )
                self._headers(out, raw.headers)
                completion = raw.parse()
                out.completion_id = completion.id
                if completion.usage is not None:
                    out.prompt_tokens = completion.usage.prompt_tokens
                    out.completion_tokens = completion.usage.completion_tokens
            out.status = 200
        except openai.APIStatusError as exc:
            out.status = exc.status_code
            out.code = str(exc.code) if exc.code is not None else None
            out.error = type(exc).__name__
            self._headers(out, exc.response.headers)
        except openai.APIError as exc:  # connection errors, and error events inside a stream
            out.status = 0
            out.error = f"{type(exc).__name__}: {exc.message[:120]}"
            out.code = str(exc.code) if getattr(exc, "code", None) is not None else None
        except Exception as exc:  # anything else the client saw is an error too
            out.status = 0
            out.error = f"{type(exc).__name__}: {str(exc)[:120]}"

    @staticmethod
    def _headers(out: Outcome, headers: Any) -> None:
        out.request_id = headers.get("x-request-id")
        remaining = headers.get("x-ratelimit-remaining-requests")
        reset = headers.get("x-ratelimit-reset-requests")
        if remaining is not None and reset is not None:
            out.rate_remaining = int(remaining)
            out.rate_reset = parse_reset(reset)


# --------------------------------------------------------------------------- the timeline


@dataclass
class Mark:
    label: str
    start: float  # monotonic
    end: float
    info: dict[str, Any] = field(default_factory=dict)


def run_timeline(fleet: Fleet, load: Load, options: ChaosOptions, log: Callable[[str], None]) -> list[Mark]:
    """Apply the faults of every cycle at their times (seconds from the start of the load)."""
    marks: list[Mark] = []
    a, b = fleet.a, fleet.b

    def at(offset: float) -> None:
        delay = load.started + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def upstream_fault(label: str, start: float, end: float, faults: dict[FakeOpenAI, Fault]) -> None:
        at(start)
        t0 = time.monotonic()
        for fake, fault in faults.items():
            fake.always = fault
        log(f"{label}: on")
        at(end)
        for fake in faults:
            fake.always = None
        t1 = time.monotonic()
        marks.append(Mark(label, t0, t1))
        log(f"{label}: off")

    for cycle in range(options.cycles):
        base = cycle * options.cycle_seconds
        upstream_fault("gpt-a 500", base + 3, base + 7, {a: Fault(status=500)})
        upstream_fault("gpt-a 429", base + 7, base + 10, {a: Fault(status=429, headers={"Retry-After": "1"})})
        upstream_fault("gpt-a hang", base + 10, base + 13, {a: Fault(hang=4.0)})
        upstream_fault(
            "gpt-a reset, gpt-b cut before first byte",
            base + 13,
            base + 16,
            {a: Fault(reset=True), b: Fault(drop_after=0)},
        )
        upstream_fault("gpt-a cut after first bytes", base + 16, base + 17.5, {a: Fault(drop_after=2)})
        at(base + 18)
        t0 = time.monotonic()
        pid = fleet.kill_router(1)
        marks.append(Mark("kill -9 router", t0, time.monotonic(), {"pid": pid}))
        log("router 1 killed")
        at(base + 19)
        t0 = time.monotonic()
        version = fleet.write_config()
        marks.append(Mark("config swap (router down)", t0, time.monotonic(), {"version": version}))
        at(base + 21)
        t0 = time.monotonic()
        ready_after = fleet.restart_router(1)
        marks.append(Mark("router restart", t0, time.monotonic(), {"ready_after": ready_after}))
        log(f"router 1 restarted in {ready_after:.2f}s")
        at(base + 22)
        t0 = time.monotonic()
        a.always = Fault(status=500)
        at(base + 24)
        r0 = time.monotonic()
        fleet.redis.restart()
        marks.append(Mark("redis restart", r0, time.monotonic()))
        log("redis restarted")
        at(base + 26)
        a.always = None
        marks.append(Mark("gpt-a 500 (again)", t0, time.monotonic()))
        at(base + 27)
        t0 = time.monotonic()
        before = fleet.versions()
        fleet.write_config("deployments: [ {model: broken\n")  # not YAML: must be rejected
        time.sleep(1.0)
        kept = fleet.versions()
        marks.append(Mark("invalid config", t0, time.monotonic(), {"before": before, "after": kept}))
        t0 = time.monotonic()
        version = fleet.write_config()
        applied: dict[int, float] = {}
        deadline = t0 + 10
        while len(applied) < len(fleet.routers) and time.monotonic() < deadline:
            for i, v in enumerate(fleet.versions()):
                if v == version and i not in applied:
                    applied[i] = time.monotonic() - t0
            time.sleep(0.05)
        marks.append(
            Mark("config swap", t0, time.monotonic(), {"version": version, "applied_after": applied})
        )
        log(f"config {version} applied after {applied}")
    return marks


# --------------------------------------------------------------------------- the verdict


def _overlaps(o: Outcome, mark: Mark, grace: float = 0.0) -> bool:
    return o.t0 <= mark.end + grace and o.t1 >= mark.start


@dataclass
class ChaosReport:
    duration: float
    calls: int
    succeeded: int
    throughput: float
    errors: dict[str, int]
    unexpected: list[dict[str, Any]]
    in_flight_at_kill: int
    client_retried: int
    router_5xx_attempts: int
    nginx_next_upstream: int
    ledger: dict[str, Any]
    rpm: dict[str, Any]
    budget: dict[str, Any]
    recovery: dict[str, Any]
    faults: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(
            orjson.dumps(asdict(self), default=str, option=orjson.OPT_NON_STR_KEYS)
        )
        return doc


def analyse(fleet: Fleet, load: Load, marks: list[Mark]) -> ChaosReport:
    o = fleet.options
    outcomes = load.outcomes
    kills = [m for m in marks if m.label == "kill -9 router"]
    cuts = [m for m in marks if m.label == "gpt-a cut after first bytes"]
    redis_restarts = [m for m in marks if m.label == "redis restart"]

    # -- client-visible errors, by cause --------------------------------------------------------
    errors: Counter[str] = Counter()
    unexpected: list[Outcome] = []
    for out in outcomes:
        if out.status == 200:
            continue
        if out.kind in ("rpm", "budget") and out.status == 429:
            errors["429 by the key's own limit (expected)"] += 1
        elif any(_overlaps(out, k) for k in kills):
            errors["in flight on the killed router"] += 1
        elif out.stream and out.status == 0 and any(_overlaps(out, c, 0.5) for c in cuts):
            errors["stream cut after its first bytes (not retryable)"] += 1
        else:
            errors["unexpected"] += 1
            unexpected.append(out)
    in_flight_at_kill = sum(1 for out in outcomes for k in kills if out.t0 <= k.start <= out.t1)
    client_retried = sum(1 for out in outcomes if out.attempts > 1)
    router_5xx = [
        (out, status)
        for out in outcomes
        for status, who in out.failed_attempts
        if who == "router" and not any(_overlaps(out, k, 1.0) for k in kills)
    ]

    # -- ledger exactness -----------------------------------------------------------------------
    fleet.flush_ledgers()
    time.sleep(0.5)
    fleet.flush_ledgers()
    records, entries = fleet.ledger()
    by_request: dict[str, UsageRecord] = {}
    for r in records:
        by_request[r.request_id] = r
    answered: dict[str, dict[str, int]] = {}
    for fake in fleet.fakes:
        answered.update(dict(fake.answered or []))
    successes = [out for out in outcomes if out.status == 200]
    missing = [out for out in successes if out.request_id not in by_request]
    mismatched: list[tuple[Outcome, Any, Any]] = []
    ledger_tokens = fake_tokens = client_tokens = 0
    for out in successes:
        record = by_request.get(out.request_id or "")
        reported = answered.get(out.completion_id or "")
        if record is None or reported is None:
            if reported is None:
                mismatched.append((out, None, "the fake has no record of this answer"))
            continue
        got = (record.prompt_tokens, record.completion_tokens)
        want = (reported["prompt_tokens"], reported["completion_tokens"])
        ledger_tokens += sum(got)
        fake_tokens += sum(want)
        client_tokens += (out.prompt_tokens or 0) + (out.completion_tokens or 0)
        if got != want or record.status != 200 or record.estimated:
            mismatched.append((out, got, want))
    seen_ids = {out.request_id for out in successes}
    ledger_only = [r for r in records if r.status == 200 and r.request_id not in seen_ids]
    ledger = {
        "records": len(records),
        "stream_entries": entries,
        "duplicate_ids": len(records) - len({r.id for r in records}),
        "client_successes": len(successes),
        "successes_missing_from_ledger": len(missing),
        "usage_mismatches": len(mismatched),
        "mismatch_examples": [
            {"request_id": out.request_id, "ledger": got, "fake": want} for out, got, want in mismatched[:5]
        ],
        "ledger_tokens": ledger_tokens,
        "fake_reported_tokens": fake_tokens,
        "client_seen_tokens": client_tokens,
        "ledger_200_not_seen_by_client": len(ledger_only),
        "estimated_records": sum(1 for r in records if r.estimated and r.status == 200),
    }

    # -- rpm exactness, per 60 s window -------------------------------------------------------
    windows: dict[int, list[Outcome]] = defaultdict(list)
    fail_open_rpm = 0
    for out in outcomes:
        if out.kind != "rpm" or out.status == 429:
            continue
        if out.rate_reset is None or out.rate_remaining is None:
            if out.status == 200:
                fail_open_rpm += 1
            continue
        windows[round((out.wall0 + out.rate_reset) / 60)].append(out)
    refused: dict[int, int] = Counter(
        round((out.wall0 + (out.rate_reset or 0)) / 60)
        for out in outcomes
        if out.kind == "rpm" and out.status == 429
    )
    rpm = {
        "limit": o.rpm,
        "admitted_per_window": {str(w * 60): len(v) for w, v in sorted(windows.items())},
        "refused_per_window": {str(w * 60): refused.get(w, 0) for w in sorted(windows)},
        "max_admitted_in_a_window": max((len(v) for v in windows.values()), default=0),
        "duplicate_remaining_values": sum(
            len(v) - len({out.rate_remaining for out in v}) for v in windows.values()
        ),
        "admitted_fail_open": fail_open_rpm,
    }

    # -- budget overshoot -----------------------------------------------------------------------
    budget_records = {r.request_id: r for r in records if r.key == "budget" and r.status == 200}
    budget_ok = [out for out in outcomes if out.kind == "budget" and out.status == 200]
    fail_open_ids = {out.request_id for out in budget_ok if out.rate_remaining is None}
    ledger_spend = sum((r.cost for r in budget_records.values()), Decimal(0))
    fail_open_spend = sum((r.cost for rid, r in budget_records.items() if rid in fail_open_ids), Decimal(0))
    spent = fleet.budget_spent()
    # A call admitted just as Redis died or came back may have passed one check but not the other.
    racing = sum(1 for out in budget_ok for r in redis_restarts if _overlaps(out, r, 1.0))
    budget = {
        "limit_usd": str(o.budget_usd),
        "cost_per_request_usd": str(BUDGET_COST),
        "concurrency": o.budget_workers,
        "bound_usd": str(o.budget_usd + o.budget_workers * BUDGET_COST),
        "ledger_spend_usd": str(ledger_spend),
        "budget_counter_usd": str(spent),
        "admitted": len(budget_ok),
        "admitted_fail_open": len(fail_open_ids),
        "fail_open_spend_usd": str(fail_open_spend),
        "overshoot_usd": str(ledger_spend - fail_open_spend - o.budget_usd),
        "admitted_around_redis_restart": racing,
    }

    # -- recovery (the worst over all cycles) ----------------------------------------------------
    recovery: dict[str, Any] = {}

    def worst(name: str, seconds: float | None) -> None:
        if seconds is None or recovery.get(name, 0.0) is None:
            recovery[name] = None  # never recovered: stays None
        else:
            recovery[name] = max(recovery.get(name, 0.0), round(seconds, 3))

    for m in marks:
        if m.label.startswith("gpt-a") and m.label != "gpt-a cut after first bytes":
            back = [s.at for s in fleet.a.seen if s.at > m.end]
            worst(f"{m.label}: gpt-a serving again after", back[0] - m.end if back else None)
        elif m.label == "kill -9 router":
            errs = [
                out.t1 for out in outcomes if out.status not in (200, 429) and out.t0 <= m.start <= out.t1
            ]
            worst("kill -9: last client-visible error after", max(errs) - m.start if errs else 0.0)
        elif m.label == "router restart":
            worst("restarted router ready after", m.info["ready_after"])
        elif m.label == "redis restart":
            after = [
                out.t0
                for out in outcomes
                if out.t0 > m.end and out.status == 200 and out.rate_remaining is not None
            ]
            worst("redis restart: limits enforced again after", min(after) - m.end if after else None)
        elif m.label == "config swap":
            for i, t in m.info["applied_after"].items():
                worst(f"config swap applied after (router {i})", t)
    recovery["calls admitted fail-open (Redis down)"] = sum(
        1 for out in outcomes if out.status == 200 and out.rate_remaining is None
    )
    duration = max((out.t1 for out in outcomes), default=load.started) - load.started
    return ChaosReport(
        duration=round(duration, 2),
        calls=len(outcomes),
        succeeded=len(successes),
        throughput=round(len(outcomes) / duration, 1) if duration else 0.0,
        errors=dict(errors),
        unexpected=[asdict(out) for out in unexpected[:10]],
        in_flight_at_kill=in_flight_at_kill,
        client_retried=client_retried,
        router_5xx_attempts=len(router_5xx),
        nginx_next_upstream=fleet.nginx.upstream_retries() if fleet.nginx else 0,
        ledger=ledger,
        rpm=rpm,
        budget=budget,
        recovery=recovery,
        faults=[
            {
                "fault": m.label,
                "at": round(m.start - load.started, 2),
                "for": round(m.end - m.start, 2),
                **m.info,
            }
            for m in marks
        ],
    )


def check_bounds(report: ChaosReport, options: ChaosOptions) -> list[str]:
    """Every bound the run must hold; an empty list means it held them all."""
    failures: list[str] = []

    def bound(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    e = report.errors
    bound(e.get("unexpected", 0) == 0, f"client-visible errors, a fallback available: {report.unexpected}")
    bound(report.router_5xx_attempts == 0, f"{report.router_5xx_attempts} router 5xx answers outside a kill")
    killed = e.get("in flight on the killed router", 0)
    bound(killed <= report.in_flight_at_kill, f"{killed} kill errors > {report.in_flight_at_kill} in flight")
    led = report.ledger
    bound(led["duplicate_ids"] == 0, f"{led['duplicate_ids']} duplicate ledger ids")
    missing = led["successes_missing_from_ledger"]
    bound(missing == 0, f"{missing} answers the client got are not in the ledger")
    bound(led["usage_mismatches"] == 0, f"usage mismatches: {led['mismatch_examples']}")
    bound(led["ledger_tokens"] == led["fake_reported_tokens"], "ledger tokens != upstream-reported tokens")
    bound(led["estimated_records"] == 0, "a record was estimated although the upstream reported usage")
    bound(
        led["ledger_200_not_seen_by_client"] <= report.in_flight_at_kill,
        f"{led['ledger_200_not_seen_by_client']} recorded answers no client saw",
    )
    r = report.rpm
    bound(r["max_admitted_in_a_window"] <= options.rpm, f"a window over the rpm: {r['admitted_per_window']}")
    bound(r["duplicate_remaining_values"] == 0, "two admissions saw the same x-ratelimit-remaining")
    b = report.budget
    bound(
        Decimal(b["ledger_spend_usd"]) - Decimal(b["fail_open_spend_usd"]) <= Decimal(b["bound_usd"]),
        f"budget overshoot past the bound: {b}",
    )
    counted = Decimal(b["ledger_spend_usd"]) - Decimal(b["fail_open_spend_usd"])
    gap = abs(Decimal(b["budget_counter_usd"]) - counted)
    bound(
        gap <= b["admitted_around_redis_restart"] * BUDGET_COST,
        f"budget counter and ledger disagree: {b}",
    )
    bound(Decimal(b["ledger_spend_usd"]) >= Decimal(b["limit_usd"]), f"the budget was never reached: {b}")
    rec = report.recovery
    for name, value in rec.items():
        if name.endswith("serving again after"):
            bound(value is not None and value < 6.0, f"{name}: {value}")
    for i in range(options.routers):
        seconds = rec.get(f"config swap applied after (router {i})")
        bound(seconds is not None and seconds < 3.0, f"router {i} applied the config swap after {seconds}s")
    for fault in report.faults:
        if fault["fault"] == "invalid config":
            bound(fault["before"] == fault["after"], f"an invalid config changed what is served: {fault}")
    return failures


@contextlib.contextmanager
def chaos_run(options: ChaosOptions, log: Callable[[str], None] = print) -> Iterator[ChaosReport]:
    """Start the fleet, run load and faults, and yield the report (the fleet stops afterwards)."""
    with Fleet(options) as fleet:
        load = Load(fleet.base_url, options, options.cycles * options.cycle_seconds).start()
        marks = run_timeline(fleet, load, options, log)
        load.join()
        yield analyse(fleet, load, marks)


def render(report: ChaosReport) -> str:
    """A human-readable summary."""
    lines = [
        f"{report.calls} calls in {report.duration}s ({report.throughput}/s), {report.succeeded} succeeded",
        f"client-visible errors by cause: {report.errors}",
        f"in flight at the kill: {report.in_flight_at_kill}; calls the SDK retried: {report.client_retried}; "
        f"router 5xx attempts outside a kill: {report.router_5xx_attempts}; "
        f"nginx passed to the next router: {report.nginx_next_upstream}",
        f"ledger: {report.ledger}",
        f"rpm: {report.rpm}",
        f"budget: {report.budget}",
        f"recovery: {report.recovery}",
    ]
    lines += [f"fault: {f}" for f in report.faults]
    return "\n".join(lines)
