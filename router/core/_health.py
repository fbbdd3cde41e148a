"""Per-deployment circuit breakers, shared by every replica when Redis is configured.

A deployment that fails ``failureThreshold`` times within ``windowSeconds``,
or answers 429 with ``Retry-After``, is *open* (cooled down) until a deadline.
After it, exactly one request, across all replicas, is let through as a
*half-open* probe; its success closes the breaker, its failure reopens it.

A deployment whose upstream rejected its credentials (401/403) is opened at
once, and the breaker remembers that status (:attr:`Breaker.rejected`) until a
call succeeds or another failure replaces it: the router then answers with the
credential error rather than a cooldown, and readiness and the operator show it.

The request path reads a local snapshot only. Failures, probes and the
refresh of the snapshot talk to the store, which is either process memory or
Redis (each transition is one Lua script).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ..config._schema import CooldownSettings

log = logging.getLogger("kubellm.router")

Clock = Callable[[], float]


@dataclass(slots=True, frozen=True)
class Breaker:
    #: Wall-clock time until which the deployment is kept out.
    open_until: float
    #: A probe is in flight until this time (0 when none).
    probe_until: float = 0.0
    #: The upstream status (401 or 403) when the last answer rejected the credentials, else 0.
    rejected: int = 0


#: A credential rejection is remembered this long without any traffic to the deployment, so
#: that readiness and the operator keep showing it (a success or a config change clears it).
REJECTION_TTL_SECONDS = 86_400.0


def rejection_reason(status: int) -> str:
    """What readiness and the ModelDeployment status say about a credential rejection."""
    what = "credentials" if status == 401 else "credentials' permissions"
    return f"the upstream rejected the {what} ({status})"


class HealthStore(Protocol):
    async def record_failure(self, name: str, now: float, policy: CooldownSettings) -> Breaker | None: ...

    async def open(self, name: str, now: float, until: float) -> Breaker: ...

    async def reject(self, name: str, now: float, until: float, status: int) -> Breaker: ...

    async def acquire_probe(self, name: str, now: float, policy: CooldownSettings) -> bool: ...

    async def close(self, name: str) -> None: ...

    async def snapshot(self, names: Iterable[str]) -> dict[str, Breaker]: ...


class MemoryHealthStore:
    def __init__(self) -> None:
        self._failures: dict[str, list[float]] = {}
        self._breakers: dict[str, Breaker] = {}

    async def record_failure(self, name: str, now: float, policy: CooldownSettings) -> Breaker | None:
        current = self._breakers.get(name)
        if current is not None and current.probe_until:
            # A failed half-open probe reopens the breaker at once.
            return await self.open(name, now, now + policy.cooldown_seconds)
        recent = [t for t in self._failures.get(name, []) if t > now - policy.window_seconds]
        recent.append(now)
        self._failures[name] = recent
        if len(recent) >= policy.failure_threshold:
            self._failures.pop(name, None)
            return await self.open(name, now, now + policy.cooldown_seconds)
        return None

    async def open(self, name: str, now: float, until: float) -> Breaker:
        current = self._breakers.get(name)
        if current is not None and current.open_until >= until and not current.probe_until:
            if current.rejected:  # a 429 means the credentials were accepted
                current = self._breakers[name] = Breaker(current.open_until)
            return current
        breaker = Breaker(until)
        self._breakers[name] = breaker
        return breaker

    async def reject(self, name: str, now: float, until: float, status: int) -> Breaker:
        self._failures.pop(name, None)
        current = self._breakers.get(name)
        breaker = Breaker(max(until, current.open_until if current else 0.0), 0.0, status)
        self._breakers[name] = breaker
        return breaker

    async def acquire_probe(self, name: str, now: float, policy: CooldownSettings) -> bool:
        current = self._breakers.get(name)
        if current is None:
            return True
        if now < current.open_until or now < current.probe_until:
            return False
        self._breakers[name] = Breaker(
            current.open_until, now + policy.probe_timeout_seconds, current.rejected
        )
        return True

    async def close(self, name: str) -> None:
        self._breakers.pop(name, None)
        self._failures.pop(name, None)

    async def snapshot(self, names: Iterable[str]) -> dict[str, Breaker]:
        return {n: self._breakers[n] for n in names if n in self._breakers}


_RECORD_FAILURE = """
local failures, breaker = KEYS[1], KEYS[2]
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local threshold, cooldown = tonumber(ARGV[3]), tonumber(ARGV[4])
local probe = tonumber(redis.call('HGET', breaker, 'probe_until') or '0')
if probe > 0 then
  redis.call('HSET', breaker, 'open_until', now + cooldown, 'probe_until', 0)
  redis.call('HDEL', breaker, 'rejected')
  redis.call('PEXPIRE', breaker, math.ceil((cooldown * 2 + 60) * 1000))
  return tostring(now + cooldown)
end
redis.call('ZREMRANGEBYSCORE', failures, '-inf', now - window)
redis.call('ZADD', failures, now, ARGV[5])
redis.call('PEXPIRE', failures, math.ceil(window * 1000))
if redis.call('ZCARD', failures) >= threshold then
  redis.call('DEL', failures)
  local deadline = now + cooldown
  local current = tonumber(redis.call('HGET', breaker, 'open_until') or '0')
  if current > deadline then deadline = current end
  redis.call('HSET', breaker, 'open_until', deadline, 'probe_until', 0)
  redis.call('HDEL', breaker, 'rejected')
  redis.call('PEXPIRE', breaker, math.ceil((deadline - now + cooldown + 60) * 1000))
  return tostring(deadline)
end
return false
"""

_OPEN = """
local breaker, deadline, now = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local current = tonumber(redis.call('HGET', breaker, 'open_until') or '0')
local probe = tonumber(redis.call('HGET', breaker, 'probe_until') or '0')
redis.call('HDEL', breaker, 'rejected')
if current >= deadline and probe == 0 then return tostring(current) end
redis.call('HSET', breaker, 'open_until', deadline, 'probe_until', 0)
redis.call('PEXPIRE', breaker, math.ceil((deadline - now + 120) * 1000))
return tostring(deadline)
"""

_REJECT = """
local failures, breaker = KEYS[1], KEYS[2]
local deadline, status, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local current = tonumber(redis.call('HGET', breaker, 'open_until') or '0')
if current > deadline then deadline = current end
redis.call('DEL', failures)
redis.call('HSET', breaker, 'open_until', deadline, 'probe_until', 0, 'rejected', status)
redis.call('PEXPIRE', breaker, math.ceil(ttl * 1000))
return tostring(deadline)
"""

_ACQUIRE_PROBE = """
local breaker, now, ttl = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
if redis.call('EXISTS', breaker) == 0 then return 1 end
local open_until = tonumber(redis.call('HGET', breaker, 'open_until') or '0')
local probe = tonumber(redis.call('HGET', breaker, 'probe_until') or '0')
if now < open_until or now < probe then return 0 end
redis.call('HSET', breaker, 'probe_until', now + ttl)
redis.call('PEXPIRE', breaker, math.ceil((ttl + 120) * 1000))
return 1
"""


class RedisHealthStore:
    """The same state machine in Redis, so every replica sees one breaker per deployment."""

    def __init__(self, client: object, prefix: str = "kubellm:") -> None:
        from redis.asyncio import Redis
        from redis.asyncio.cluster import RedisCluster

        assert isinstance(client, Redis | RedisCluster)
        self._redis = client
        self._prefix = prefix + "health:"
        self._record = client.register_script(_RECORD_FAILURE)
        self._open = client.register_script(_OPEN)
        self._reject = client.register_script(_REJECT)
        self._probe = client.register_script(_ACQUIRE_PROBE)

    def _keys(self, name: str) -> list[str]:
        return [f"{self._prefix}{{{name}}}:failures", f"{self._prefix}{{{name}}}:breaker"]

    async def record_failure(self, name: str, now: float, policy: CooldownSettings) -> Breaker | None:
        member = f"{now}:{uuid.uuid4().hex[:12]}"
        args: list[float | str] = [
            now,
            policy.window_seconds,
            policy.failure_threshold,
            policy.cooldown_seconds,
            member,
        ]
        until = await self._record(keys=self._keys(name), args=args)
        return Breaker(float(until)) if until else None

    async def open(self, name: str, now: float, until: float) -> Breaker:
        value = await self._open(keys=self._keys(name)[1:], args=[until, now])
        return Breaker(float(value))

    async def reject(self, name: str, now: float, until: float, status: int) -> Breaker:
        ttl = max(until - now, 0.0) + REJECTION_TTL_SECONDS
        value = await self._reject(keys=self._keys(name), args=[until, status, ttl])
        return Breaker(float(value), 0.0, status)

    async def acquire_probe(self, name: str, now: float, policy: CooldownSettings) -> bool:
        got = await self._probe(keys=self._keys(name)[1:], args=[now, policy.probe_timeout_seconds])
        return bool(got)

    async def close(self, name: str) -> None:
        await self._redis.delete(*self._keys(name))

    async def snapshot(self, names: Iterable[str]) -> dict[str, Breaker]:
        names = list(names)
        if not names:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.hmget(self._keys(name)[1], "open_until", "probe_until", "rejected")
        rows = await pipe.execute()
        out: dict[str, Breaker] = {}
        for name, (open_until, probe_until, rejected) in zip(names, rows, strict=True):
            if open_until is not None:
                out[name] = Breaker(float(open_until), float(probe_until or 0), int(rejected or 0))
        return out


class HealthTracker:
    """The router's view of deployment health: a local snapshot plus the shared store."""

    def __init__(self, store: HealthStore, policy: CooldownSettings, clock: Clock = time.time) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock
        self._breakers: dict[str, Breaker] = {}
        self._probing: set[str] = set()
        #: Used while the shared store is unreachable, so breakers still work per replica.
        self._fallback = MemoryHealthStore()
        #: Called with (deployment, open) whenever this replica sees a breaker change.
        self.on_change: Callable[[str, bool], None] = lambda name, is_open: None
        #: Called when the shared store fails, so readiness can report the degradation.
        self.on_store_error: Callable[[str, Exception], None] = lambda what, exc: None

    def is_open(self, name: str) -> bool:
        breaker = self._breakers.get(name)
        return breaker is not None and self.clock() < breaker.open_until

    def cooling(self) -> dict[str, float]:
        now = self.clock()
        return {n: b.open_until for n, b in self._breakers.items() if b.open_until > now}

    def clear(self, name: str) -> bool:
        """No breaker and no probe for ``name``: :meth:`admit` would say yes and :meth:`success`
        would do nothing. Lets the hot path skip both calls."""
        return name not in self._breakers and name not in self._probing

    async def admit(self, name: str) -> bool:
        """May a request go to this deployment now? Claims the half-open probe when one is due."""
        breaker = self._breakers.get(name)
        if breaker is None:
            return True
        now = self.clock()
        if now < breaker.open_until or now < breaker.probe_until or name in self._probing:
            return False
        try:
            claimed = await self.store.acquire_probe(name, now, self.policy)
        except Exception as exc:  # the store is down: fall back to this replica's own view
            log.warning("health store unreachable while probing %s: %s", name, type(exc).__name__)
            claimed = True
        if claimed:
            self._probing.add(name)
            self._breakers[name] = Breaker(
                breaker.open_until, now + self.policy.probe_timeout_seconds, breaker.rejected
            )
        return claimed

    async def success(self, name: str) -> None:
        if name in self._probing or name in self._breakers:
            self._probing.discard(name)
            self._breakers.pop(name, None)
            with contextlib.suppress(Exception):
                await self.store.close(name)
            self.on_change(name, False)

    async def failure(self, name: str, retry_after: float | None = None) -> bool:
        """Record a failure; return True if the deployment is now cooled down."""
        now = self.clock()
        self._probing.discard(name)
        try:
            breaker = await self._record(self.store, name, now, retry_after)
        except Exception as exc:
            log.warning("health store unreachable recording a failure of %s: %s", name, type(exc).__name__)
            breaker = await self._record(self._fallback, name, now, retry_after)
        if breaker is None:
            return False
        self._breakers[name] = breaker
        self.on_change(name, True)
        return True

    def rejected(self, name: str) -> int:
        """The status (401/403) if the deployment's last upstream answer rejected its credentials."""
        breaker = self._breakers.get(name)
        return breaker.rejected if breaker is not None else 0

    async def reject(self, name: str, status: int) -> None:
        """The upstream rejected the credentials: keep the deployment out at once, with that reason.

        Not counted towards ``failureThreshold``: the next call would be refused too. After
        ``cooldownSeconds`` one request probes it, as for any open breaker."""
        now = self.clock()
        self._probing.discard(name)
        until = now + self.policy.cooldown_seconds
        try:
            breaker = await self.store.reject(name, now, until, status)
        except Exception as exc:
            log.warning("health store unreachable recording a rejection of %s: %s", name, type(exc).__name__)
            breaker = await self._fallback.reject(name, now, until, status)
        self._breakers[name] = breaker
        self.on_change(name, True)

    async def forget_rejections(self, names: Iterable[str]) -> None:
        """Clear the credential rejections of ``names``: their credentials changed (a reload)."""
        for name in [n for n in names if self.rejected(n)]:
            with contextlib.suppress(Exception):
                await self.store.close(name)
            await self._fallback.close(name)
            self._breakers.pop(name, None)
            self._probing.discard(name)
            self.on_change(name, False)

    def describe(self, name: str) -> dict[str, object]:
        """The deployment's health for readiness: ``healthy``, and a ``reason`` when it is not."""
        breaker = self._breakers.get(name)
        now = self.clock()
        if breaker is None:
            return {"healthy": True}
        if breaker.rejected:
            return {"healthy": False, "reason": rejection_reason(breaker.rejected)}
        if now < breaker.open_until:
            return {"healthy": False, "reason": "circuit breaker open after upstream failures"}
        if name in self._probing or now < breaker.probe_until:
            return {"healthy": False, "reason": "a probe request is testing the upstream"}
        return {"healthy": True}

    async def _record(
        self, store: HealthStore, name: str, now: float, retry_after: float | None
    ) -> Breaker | None:
        if retry_after is not None and retry_after > 0:
            return await store.open(name, now, now + retry_after)
        return await store.record_failure(name, now, self.policy)

    async def refresh(self, names: Iterable[str]) -> None:
        snapshot = await self.store.snapshot(names)
        for name in set(self._breakers) - set(snapshot):
            # Closed elsewhere (another replica's probe succeeded, or the breaker expired).
            self._breakers.pop(name, None)
            self._probing.discard(name)
            self.on_change(name, False)
        for name, breaker in snapshot.items():
            if name not in self._breakers:
                self.on_change(name, True)
            self._breakers[name] = breaker

    async def run_refresh(self, names: Callable[[], Iterable[str]], interval: float = 0.25) -> None:
        while True:
            try:
                await self.refresh(names())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.on_store_error("health refresh", exc)
            await asyncio.sleep(interval)
