"""Admission control: rpm, tpm and parallel-request limits, exact across replicas.

Each :class:`LimitRule` names a scope (``"key:team-a"``, ``"deployment:gpt-a"``).
A request is admitted only if *every* rule admits it, and the check and the
bookkeeping happen in one atomic step (one Lua script in Redis, one
synchronous block in memory), so N router replicas behave like one.

Semantics, identical for :class:`MemoryLimiter` and :class:`RedisLimiter`:

* **rpm** counts admitted requests in fixed 60 s windows aligned to the epoch
  minute. A window never admits more than ``rpm``.
* **tpm** uses the same windows with reserve-then-settle: admission reserves
  ``estimated_tokens`` and is denied if ``counted + estimate > tpm``, where
  ``counted`` is settled usage plus outstanding reservations. One exception
  prevents starvation: a window with nothing counted yet admits a request even
  if its estimate alone exceeds ``tpm`` (otherwise a large prompt could never
  run). :meth:`Limiter.settle` later corrects the admission's window by
  ``actual - estimate``; a window that has already ended is left alone.
* **max_parallel** counts *leases*: a sorted set of lease ids scored by their
  expiry. A lease ends on settle/release, or by expiring ``lease_ttl``
  seconds after its last acquire/renew, so a crashed router's slots free
  themselves. Long streams must :meth:`Limiter.renew` (every ``lease_ttl/3``).
  Rules with a tpm also record the lease, so that settle applies its token
  correction at most once per lease (settle is idempotent).
* A denial records nothing (purging expired leases is not recording).
* The scopes in one call must be distinct (one rule per scope).

Time: with ``now=None`` the Redis limiter uses the Redis server clock, so all
replicas agree on window edges and lease expiry whatever their own clocks say.
Passing ``now`` (seconds) pins time, for tests.

Round trips: ``acquire``, ``settle``, ``renew``, ``release`` and ``headroom``
are each one EVALSHA (two only right after a Redis restart, see ``_redis``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis

from ._redis import Arg, Script

WINDOW_MS = 60_000
DEFAULT_LEASE_TTL = 30.0
_SLACK_MS = 1_000  # keys outlive their contents by this much


@dataclass(frozen=True, slots=True)
class LimitRule:
    scope: str
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_parallel is not None


class LimitsLike(Protocol):
    """What :func:`rule` reads (``_config.Limits`` fits)."""

    @property
    def rpm(self) -> int | None: ...

    @property
    def tpm(self) -> int | None: ...

    @property
    def max_parallel_requests(self) -> int | None: ...


def rule(scope: str, limits: LimitsLike) -> LimitRule | None:
    """The rule for a config ``Limits`` block, or ``None`` when it limits nothing."""
    r = LimitRule(scope, limits.rpm, limits.tpm, limits.max_parallel_requests)
    return r if r.active else None


@dataclass(slots=True)
class Admission:
    allowed: bool
    lease_id: str
    retry_after: float | None = None
    denied_by: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Start of the rpm/tpm window the request was counted in; pass it to settle.
    window_start: float = 0.0


@dataclass(frozen=True, slots=True)
class Headroom:
    rpm_left: int | None
    tpm_left: int | None
    parallel_left: int | None
    reset_in: float


class Limiter(Protocol):
    async def acquire(
        self, rules: Sequence[LimitRule], estimated_tokens: int, lease_id: str, now: float | None = None
    ) -> Admission: ...

    async def settle(
        self,
        rules: Sequence[LimitRule],
        lease_id: str,
        estimated_tokens: int,
        actual_tokens: int,
        window_start: float,
    ) -> None: ...

    async def renew(self, rules: Sequence[LimitRule], lease_id: str, now: float | None = None) -> bool: ...

    async def release(self, rules: Sequence[LimitRule], lease_id: str) -> None: ...

    async def headroom(self, rules: Sequence[LimitRule], now: float | None = None) -> dict[str, Headroom]: ...


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it: ``20ms``, ``1s``, ``6m0s``."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = str(rest // 1000) if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(slots=True)
class _Count:
    """One rule's state as the atomic step saw it: window usage and live leases."""

    requests: int
    tokens: int
    parallel: int
    first_expiry_ms: int  # earliest live lease expiry, -1 if none


def _denials(rules: Sequence[LimitRule], counts: Sequence[_Count], est: int) -> list[tuple[int, str]]:
    """(rule index, limit kind) for every limit that denies, judged on pre-admission counts."""
    out: list[tuple[int, str]] = []
    for i, (r, c) in enumerate(zip(rules, counts, strict=True)):
        if r.rpm is not None and c.requests + 1 > r.rpm:
            out.append((i, "rpm"))
        if r.tpm is not None and c.tokens > 0 and c.tokens + est > r.tpm:
            out.append((i, "tpm"))
        if r.max_parallel is not None and c.parallel + 1 > r.max_parallel:
            out.append((i, "parallel"))
    return out


def _build(
    rules: Sequence[LimitRule],
    counts: Sequence[_Count],
    allowed: bool,
    lease_id: str,
    now_ms: int,
    win: int,
    est: int,
) -> Admission:
    """Build the answer. ``counts`` are post-admission when allowed, pre-admission when denied."""
    reset_s = (win + WINDOW_MS - now_ms) / 1000
    adm = Admission(allowed, lease_id, window_start=win / 1000)
    if not allowed:
        worst: tuple[float, str] | None = None
        for i, kind in _denials(rules, counts, est):
            if kind == "parallel":
                first = counts[i].first_expiry_ms
                wait = min(1.0, max(0.001, (first - now_ms) / 1000)) if first >= 0 else 1.0
            else:
                wait = reset_s
            if worst is None or wait > worst[0]:
                worst = (wait, f"{rules[i].scope} {kind}")
        if worst is not None:
            adm.retry_after, adm.denied_by = worst
    req = [(r.rpm - c.requests, r.rpm) for r, c in zip(rules, counts, strict=True) if r.rpm is not None]
    tok = [(r.tpm - c.tokens, r.tpm) for r, c in zip(rules, counts, strict=True) if r.tpm is not None]
    reset = format_reset(reset_s)
    for suffix, options in (("requests", req), ("tokens", tok)):
        if options:
            left, limit = min(options)
            adm.headers[f"x-ratelimit-limit-{suffix}"] = str(limit)
            adm.headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, left))
            adm.headers[f"x-ratelimit-reset-{suffix}"] = reset
    return adm


def _headroom(r: LimitRule, c: _Count, now_ms: int, win: int) -> Headroom:
    return Headroom(
        None if r.rpm is None else max(0, r.rpm - c.requests),
        None if r.tpm is None else max(0, r.tpm - c.tokens),
        None if r.max_parallel is None else max(0, r.max_parallel - c.parallel),
        (win + WINDOW_MS - now_ms) / 1000,
    )


def _ms(now: float | None) -> int:
    return round((time.time() if now is None else now) * 1000)


# --------------------------------------------------------------------------- memory


@dataclass(slots=True)
class _Window:
    start: int = -1
    requests: int = 0
    tokens: int = 0


class MemoryLimiter:
    """The single-process limiter: same semantics, no I/O (each call is atomic on the event loop)."""

    def __init__(self, lease_ttl: float = DEFAULT_LEASE_TTL) -> None:
        self.lease_ttl_ms = round(lease_ttl * 1000)
        self._windows: dict[str, _Window] = {}
        self._leases: dict[str, dict[str, int]] = {}

    def _count(self, r: LimitRule, lease_id: str, now_ms: int, win: int) -> _Count:
        w = self._windows.get(r.scope)
        requests, tokens = (w.requests, w.tokens) if w is not None and w.start == win else (0, 0)
        parallel, first = 0, -1
        leases = self._leases.get(r.scope)
        if leases:
            for lid in [lid for lid, exp in leases.items() if exp <= now_ms]:
                del leases[lid]
            if r.max_parallel is not None:
                parallel = len(leases) - (lease_id in leases)
                first = min(leases.values(), default=-1)
        return _Count(requests, tokens, parallel, first)

    async def acquire(
        self, rules: Sequence[LimitRule], estimated_tokens: int, lease_id: str, now: float | None = None
    ) -> Admission:
        rules = [r for r in rules if r.active]
        now_ms = _ms(now)
        win = now_ms - now_ms % WINDOW_MS
        counts = [self._count(r, lease_id, now_ms, win) for r in rules]
        allowed = not _denials(rules, counts, estimated_tokens)
        if allowed:
            for r, c in zip(rules, counts, strict=True):
                if r.rpm is not None or r.tpm is not None:
                    c.requests += 1
                    c.tokens += estimated_tokens
                    self._windows[r.scope] = _Window(win, c.requests, c.tokens)
                if r.max_parallel is not None or r.tpm is not None:
                    leases = self._leases.setdefault(r.scope, {})
                    if r.max_parallel is not None and lease_id not in leases:
                        c.parallel += 1
                    leases[lease_id] = now_ms + self.lease_ttl_ms
        return _build(rules, counts, allowed, lease_id, now_ms, win, estimated_tokens)

    async def settle(
        self,
        rules: Sequence[LimitRule],
        lease_id: str,
        estimated_tokens: int,
        actual_tokens: int,
        window_start: float,
    ) -> None:
        win = round(window_start * 1000)
        for r in rules:
            leases = self._leases.get(r.scope)
            if leases is None or leases.pop(lease_id, None) is None:
                continue
            w = self._windows.get(r.scope)
            if r.tpm is not None and w is not None and w.start == win:
                w.tokens += actual_tokens - estimated_tokens

    async def renew(self, rules: Sequence[LimitRule], lease_id: str, now: float | None = None) -> bool:
        now_ms = _ms(now)
        held = True
        for r in rules:
            if r.max_parallel is None and r.tpm is None:
                continue
            leases = self._leases.get(r.scope, {})
            if leases.get(lease_id, -1) > now_ms:
                leases[lease_id] = now_ms + self.lease_ttl_ms
            else:
                leases.pop(lease_id, None)
                held = False
        return held

    async def release(self, rules: Sequence[LimitRule], lease_id: str) -> None:
        for r in rules:
            self._leases.get(r.scope, {}).pop(lease_id, None)

    async def headroom(self, rules: Sequence[LimitRule], now: float | None = None) -> dict[str, Headroom]:
        now_ms = _ms(now)
        win = now_ms - now_ms % WINDOW_MS
        out: dict[str, Headroom] = {}
        for r in rules:
            w = self._windows.get(r.scope)
            req, tok = (w.requests, w.tokens) if w is not None and w.start == win else (0, 0)
            live = sum(1 for exp in self._leases.get(r.scope, {}).values() if exp > now_ms)
            out[r.scope] = _headroom(r, _Count(req, tok, live, -1), now_ms, win)
        return out


# --------------------------------------------------------------------------- redis

# KEYS: per rule i, KEYS[2i-1] = window hash {w, r, t}, KEYS[2i] = lease zset (member lease id,
# score expiry ms). ARGV: now_ms ("" = server clock), then script arguments, then per rule
# rpm, tpm, max_parallel (-1 = none). Lua numbers are doubles: every value here is < 2^53.
_PRELUDE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local win = now - (now % 60000)
local function lim(i, base)
  local a = base + 3 * (i - 1)
  return tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
end
local function int(x) return string.format('%d', x) end
local function window(wk)
  local h = redis.call('HMGET', wk, 'w', 'r', 't')
  if tonumber(h[1]) == win then return tonumber(h[2]) or 0, tonumber(h[3]) or 0 end
  return 0, 0
end
local function touch_leases(lk)
  local last = redis.call('ZRANGE', lk, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIRE', lk, math.max(1, tonumber(last[2]) - now + 1000)) end
end
"""

# ARGV[2] lease id, ARGV[3] estimate, ARGV[4] lease ttl ms, rules from ARGV[5].
_ACQUIRE = Script(
    _PRELUDE
    + """
local lease, est, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local n = #KEYS / 2
local ok, st = true, {}
for i = 1, n do
  local wk, lk = KEYS[2 * i - 1], KEYS[2 * i]
  local rpm, tpm, par = lim(i, 4)
  local r, t, p, first, member = 0, 0, 0, -1, false
  if rpm >= 0 or tpm >= 0 then r, t = window(wk) end
  if par >= 0 or tpm >= 0 then redis.call('ZREMRANGEBYSCORE', lk, '-inf', now) end
  if par >= 0 then
    member = redis.call('ZSCORE', lk, lease) ~= false
    p = redis.call('ZCARD', lk)
    if member then p = p - 1 end
    local e = redis.call('ZRANGE', lk, 0, 0, 'WITHSCORES')
    if e[2] then first = tonumber(e[2]) end
  end
  if (rpm >= 0 and r + 1 > rpm) or (tpm >= 0 and t > 0 and t + est > tpm) or (par >= 0 and p + 1 > par) then
    ok = false
  end
  st[i] = {r, t, p, first, member}
end
if ok then
  for i = 1, n do
    local wk, lk = KEYS[2 * i - 1], KEYS[2 * i]
    local rpm, tpm, par = lim(i, 4)
    local s = st[i]
    if rpm >= 0 or tpm >= 0 then
      s[1] = s[1] + 1
      s[2] = s[2] + est
      redis.call('HSET', wk, 'w', int(win), 'r', int(s[1]), 't', int(s[2]))
      redis.call('PEXPIRE', wk, win + 60000 - now + 1000)
    end
    if par >= 0 or tpm >= 0 then
      redis.call('ZADD', lk, int(now + ttl), lease)
      touch_leases(lk)
      if par >= 0 and not s[5] then s[3] = s[3] + 1 end
    end
  end
end
local out = {ok and 1 or 0, win, now}
for i = 1, n do
  local s = st[i]
  table.insert(out, s[1]); table.insert(out, s[2]); table.insert(out, s[3]); table.insert(out, s[4])
end
return out
"""
)

# ARGV[2] lease id, ARGV[3] token correction, ARGV[4] admission window ms, rules from ARGV[5].
_SETTLE = Script(
    _PRELUDE
    + """
local lease, delta, at = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 1, #KEYS / 2 do
  local wk, lk = KEYS[2 * i - 1], KEYS[2 * i]
  local rpm, tpm, par = lim(i, 4)
  if (par >= 0 or tpm >= 0) and redis.call('ZREM', lk, lease) == 1 then
    if tpm >= 0 and delta ~= 0 and tonumber(redis.call('HGET', wk, 'w')) == at then
      redis.call('HINCRBY', wk, 't', int(delta))
    end
  end
end
return 1
"""
)

# ARGV[2] lease id, ARGV[3] lease ttl ms, rules from ARGV[4]. Returns 1 if every lease was still live.
_RENEW = Script(
    _PRELUDE
    + """
local lease, ttl, held = ARGV[2], tonumber(ARGV[3]), 1
for i = 1, #KEYS / 2 do
  local lk = KEYS[2 * i]
  local rpm, tpm, par = lim(i, 3)
  if par >= 0 or tpm >= 0 then
    local score = tonumber(redis.call('ZSCORE', lk, lease))
    if score and score > now then
      redis.call('ZADD', lk, int(now + ttl), lease)
      touch_leases(lk)
    else
      redis.call('ZREM', lk, lease)
      held = 0
    end
  end
end
return held
"""
)

# Read-only. Rules from ARGV[2]. Returns {win, now, r, t, live leases per rule...}.
_HEADROOM = Script(
    _PRELUDE
    + """
local out = {win, now}
for i = 1, #KEYS / 2 do
  local r, t = window(KEYS[2 * i - 1])
  table.insert(out, r); table.insert(out, t)
  table.insert(out, redis.call('ZCOUNT', KEYS[2 * i], '(' .. int(now), '+inf'))
end
return out
"""
)


class RedisLimiter:
    """The shared limiter: every call is one atomic script on one Redis."""

    def __init__(self, client: Redis, prefix: str = "kubellm:", lease_ttl: float = DEFAULT_LEASE_TTL) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_ttl_ms = round(lease_ttl * 1000)

    def _keys_args(self, rules: Sequence[LimitRule]) -> tuple[list[str], list[Arg]]:
        keys: list[str] = []
        args: list[Arg] = []
        for r in rules:
            base = f"{self.prefix}lim:{r.scope}"
            keys += (base + ":w", base + ":l")
            args += (_neg(r.rpm), _neg(r.tpm), _neg(r.max_parallel))
        return keys, args

    async def acquire(
        self, rules: Sequence[LimitRule], estimated_tokens: int, lease_id: str, now: float | None = None
    ) -> Admission:
        rules = [r for r in rules if r.active]
        if not rules:
            now_ms = _ms(now)
            return _build(rules, [], True, lease_id, now_ms, now_ms - now_ms % WINDOW_MS, estimated_tokens)
        keys, args = self._keys_args(rules)
        head: list[Arg] = [_now_arg(now), lease_id, estimated_tokens, self.lease_ttl_ms]
        res = await _ACQUIRE(self.client, keys, head + args)
        vals = [int(v) for v in res]
        allowed, win, now_ms = bool(vals[0]), vals[1], vals[2]
        counts = [_Count(*vals[3 + 4 * i : 7 + 4 * i]) for i in range(len(rules))]
        return _build(rules, counts, allowed, lease_id, now_ms, win, estimated_tokens)

    async def settle(
        self,
        rules: Sequence[LimitRule],
        lease_id: str,
        estimated_tokens: int,
        actual_tokens: int,
        window_start: float,
    ) -> None:
        rules = [r for r in rules if r.active]
        if rules:
            keys, args = self._keys_args(rules)
            delta = actual_tokens - estimated_tokens
            await _SETTLE(self.client, keys, ["", lease_id, delta, round(window_start * 1000), *args])

    async def renew(self, rules: Sequence[LimitRule], lease_id: str, now: float | None = None) -> bool:
        rules = [r for r in rules if r.active]
        if not rules:
            return True
        keys, args = self._keys_args(rules)
        return bool(await _RENEW(self.client, keys, [_now_arg(now), lease_id, self.lease_ttl_ms, *args]))

    async def release(self, rules: Sequence[LimitRule], lease_id: str) -> None:
        await self.settle(rules, lease_id, 0, 0, 0.0)

    async def headroom(self, rules: Sequence[LimitRule], now: float | None = None) -> dict[str, Headroom]:
        if not rules:
            return {}
        keys, args = self._keys_args(rules)
        vals = [int(v) for v in await _HEADROOM(self.client, keys, [_now_arg(now), *args])]
        win, now_ms = vals[0], vals[1]
        return {
            r.scope: _headroom(r, _Count(vals[2 + 3 * i], vals[3 + 3 * i], vals[4 + 3 * i], -1), now_ms, win)
            for i, r in enumerate(rules)
        }


def _neg(v: int | None) -> int:
    return -1 if v is None else v


def _now_arg(now: float | None) -> str:
    return "" if now is None else str(round(now * 1000))
