"""Admission control: rpm, tpm and parallel-request limits, exact across replicas.

Each :class:`LimitRule` names a scope (``"key:team-a"``, ``"deployment:gpt-a"``).
A request is admitted only if *every* rule admits it, and the check and the
bookkeeping happen in one atomic step (one Lua script in Redis, one
synchronous block in memory), so N router replicas behave like one.

Semantics, identical for :class:`MemoryLimiter` and :class:`RedisLimiter`:

* **rpm** and **tpm** are sliding windows of 60 s, exact in the direction that
  matters: *no 60 s interval, wherever it starts, ever holds more than rpm
  admissions* (or more than tpm counted tokens), across minute boundaries and
  across replicas. Admissions are counted in 1 s buckets; a request admitted at
  ``t`` is counted until the end of bucket ``floor(t) + 60``, i.e. for 60 to
  61 s. Counting one partial bucket too many is what makes the bound hold for
  every interval; the price is that a slot may reopen up to 1 s later than a
  per-request log would reopen it. Why buckets and not a log of admissions or
  GCRA: a log costs memory and a sorted-set update per request and grows with
  rpm, and GCRA admits up to 2x rpm in some 60 s interval unless it forbids
  bursts. Buckets cost a handful of hash commands per request whatever the
  limit, and at most one walk over 61 fields per scope per second.
* **tpm** reserves then settles: admission reserves ``estimated_tokens`` and is
  denied if ``counted + estimate > tpm``, where ``counted`` is settled usage
  plus outstanding reservations in the window. One exception prevents
  starvation: a window with nothing counted admits a request even if its
  estimate alone exceeds ``tpm`` (otherwise a large prompt could never run).
  :meth:`Limiter.settle` corrects the admission's bucket by ``actual -
  estimate``; a bucket that has already left the window is left alone.
* ``Retry-After`` (``Admission.retry_after``) is when the next slot opens: when
  enough admissions (rpm) or tokens (tpm) have left the window for the request
  to fit. ``x-ratelimit-reset-*`` is when the oldest counted bucket leaves it.
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
#: Window resolution: admissions are counted per bucket of this many ms.
BUCKET_MS = 1_000
#: Buckets counted at any instant: the current one and the 60 before it (see the module docs).
SPAN = WINDOW_MS // BUCKET_MS + 1
DEFAULT_LEASE_TTL = 30.0


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
    """One rule's state as the atomic step saw it: sliding-window usage and live leases."""

    requests: int
    tokens: int
    parallel: int
    first_expiry_ms: int  # earliest live lease expiry, -1 if none
    #: When the oldest bucket holding data leaves the window (ms, -1: nothing counted).
    oldest_drop_ms: int = -1
    #: Only for a denial: when enough requests / tokens have left the window (ms, -1: not computed).
    wait_requests_ms: int = -1
    wait_tokens_ms: int = -1


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


def _reset_ms(c: _Count, now_ms: int) -> int:
    return max(0, c.oldest_drop_ms - now_ms) if c.oldest_drop_ms >= 0 else 0


def _build(
    rules: Sequence[LimitRule],
    counts: Sequence[_Count],
    allowed: bool,
    lease_id: str,
    now_ms: int,
    est: int,
) -> Admission:
    """Build the answer. ``counts`` are post-admission when allowed, pre-admission when denied."""
    adm = Admission(allowed, lease_id, window_start=(now_ms - now_ms % BUCKET_MS) / 1000)
    if not allowed:
        worst: tuple[float, str] | None = None
        for i, kind in _denials(rules, counts, est):
            c = counts[i]
            if kind == "parallel":
                first = c.first_expiry_ms
                wait = min(1.0, max(0.001, (first - now_ms) / 1000)) if first >= 0 else 1.0
            else:
                at = c.wait_requests_ms if kind == "rpm" else c.wait_tokens_ms
                wait = max(0.001, (at - now_ms) / 1000)
            if worst is None or wait > worst[0]:
                worst = (wait, f"{rules[i].scope} {kind}")
        if worst is not None:
            adm.retry_after, adm.denied_by = worst
    pairs = list(zip(rules, counts, strict=True))
    req = [(r.rpm - c.requests, r.rpm, _reset_ms(c, now_ms)) for r, c in pairs if r.rpm]
    tok = [(r.tpm - c.tokens, r.tpm, _reset_ms(c, now_ms)) for r, c in pairs if r.tpm]
    for suffix, options in (("requests", req), ("tokens", tok)):
        if options:
            left, limit, reset = min(options)
            adm.headers[f"x-ratelimit-limit-{suffix}"] = str(limit)
            adm.headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, left))
            adm.headers[f"x-ratelimit-reset-{suffix}"] = format_reset(reset / 1000)
    return adm


def _headroom(r: LimitRule, c: _Count, now_ms: int) -> Headroom:
    return Headroom(
        None if r.rpm is None else max(0, r.rpm - c.requests),
        None if r.tpm is None else max(0, r.tpm - c.tokens),
        None if r.max_parallel is None else max(0, r.max_parallel - c.parallel),
        _reset_ms(c, now_ms) / 1000,
    )


def _ms(now: float | None) -> int:
    return round((time.time() if now is None else now) * 1000)


def _span(now_ms: int) -> tuple[int, int]:
    """(current bucket, lowest bucket still in the window)."""
    cur = now_ms // BUCKET_MS
    return cur, cur - SPAN + 1


# --------------------------------------------------------------------------- memory


@dataclass(slots=True)
class _Window:
    """A scope's sliding window: per-bucket [requests, tokens] and their sums."""

    requests: int = 0
    tokens: int = 0
    buckets: dict[int, list[int]] = field(default_factory=dict)

    def view(self, low: int) -> tuple[int, int, int | None]:
        """(requests, tokens, oldest bucket with data) counting only buckets >= ``low``."""
        r, t, oldest = self.requests, self.tokens, None
        for b, (br, bt) in self.buckets.items():
            if b < low:
                r, t = r - br, t - bt
            elif oldest is None or b < oldest:
                oldest = b
        return r, t, oldest

    def advance(self, low: int) -> None:
        for b in [b for b in self.buckets if b < low]:
            br, bt = self.buckets.pop(b)
            self.requests, self.tokens = self.requests - br, self.tokens - bt

    def wait(self, low: int, cur: int, index: int, need: int) -> int:
        """When (ms) at least ``need`` of the requests (index 0) or tokens (1) have left the window."""
        freed = 0
        for b in range(low, cur + 1):
            freed += self.buckets.get(b, (0, 0))[index]
            if freed >= need:
                return (b + SPAN) * BUCKET_MS
        return (cur + SPAN) * BUCKET_MS


class MemoryLimiter:
    """The single-process limiter: same semantics, no I/O (each call is atomic on the event loop)."""

    def __init__(self, lease_ttl: float = DEFAULT_LEASE_TTL) -> None:
        self.lease_ttl_ms = round(lease_ttl * 1000)
        self._windows: dict[str, _Window] = {}
        self._leases: dict[str, dict[str, int]] = {}

    def _count(self, r: LimitRule, lease_id: str, now_ms: int, write: bool) -> _Count:
        low = _span(now_ms)[1]
        requests = tokens = 0
        oldest: int | None = None
        w = self._windows.get(r.scope)
        if w is not None:
            if write:
                w.advance(low)
            requests, tokens, oldest = w.view(low)
            if write and not w.buckets:
                del self._windows[r.scope]
        parallel, first = 0, -1
        leases = self._leases.get(r.scope)
        if leases:
            if write:
                for lid in [lid for lid, exp in leases.items() if exp <= now_ms]:
                    del leases[lid]
                if r.max_parallel is not None:
                    parallel = len(leases) - (lease_id in leases)
                    first = min(leases.values(), default=-1)
            else:
                parallel = sum(1 for exp in leases.values() if exp > now_ms)
        drop = -1 if oldest is None else (oldest + SPAN) * BUCKET_MS
        return _Count(requests, tokens, parallel, first, drop)

    async def acquire(
        self, rules: Sequence[LimitRule], estimated_tokens: int, lease_id: str, now: float | None = None
    ) -> Admission:
        rules = [r for r in rules if r.active]
        now_ms = _ms(now)
        cur, low = _span(now_ms)
        counts = [self._count(r, lease_id, now_ms, True) for r in rules]
        denials = _denials(rules, counts, estimated_tokens)
        for i, kind in denials:
            w, c = self._windows.get(rules[i].scope), counts[i]
            if w is not None and kind == "rpm":
                c.wait_requests_ms = w.wait(low, cur, 0, c.requests + 1 - (rules[i].rpm or 0))
            elif w is not None and kind == "tpm":
                need = min(c.tokens, c.tokens + estimated_tokens - (rules[i].tpm or 0))
                c.wait_tokens_ms = w.wait(low, cur, 1, need)
        if not denials:
            for r, c in zip(rules, counts, strict=True):
                if r.rpm is not None or r.tpm is not None:
                    w = self._windows.setdefault(r.scope, _Window())
                    bucket = w.buckets.setdefault(cur, [0, 0])
                    bucket[0] += 1
                    bucket[1] += estimated_tokens
                    w.requests += 1
                    w.tokens += estimated_tokens
                    c.requests += 1
                    c.tokens += estimated_tokens
                    if c.oldest_drop_ms < 0:
                        c.oldest_drop_ms = (cur + SPAN) * BUCKET_MS
                if r.max_parallel is not None or r.tpm is not None:
                    leases = self._leases.setdefault(r.scope, {})
                    if r.max_parallel is not None and lease_id not in leases:
                        c.parallel += 1
                    leases[lease_id] = now_ms + self.lease_ttl_ms
        return _build(rules, counts, not denials, lease_id, now_ms, estimated_tokens)

    async def settle(
        self,
        rules: Sequence[LimitRule],
        lease_id: str,
        estimated_tokens: int,
        actual_tokens: int,
        window_start: float,
    ) -> None:
        bucket = round(window_start * 1000) // BUCKET_MS
        for r in rules:
            leases = self._leases.get(r.scope)
            if leases is None or leases.pop(lease_id, None) is None:
                continue
            w = self._windows.get(r.scope)
            if r.tpm is not None and w is not None and bucket in w.buckets:
                w.buckets[bucket][1] += actual_tokens - estimated_tokens
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
        return {r.scope: _headroom(r, self._count(r, "", now_ms, False), now_ms) for r in rules}


# --------------------------------------------------------------------------- redis

# KEYS: per rule i, KEYS[2i-1] = window hash, KEYS[2i] = lease zset (member lease id, score expiry
# ms). The window hash holds 'o' (the oldest bucket with data), the sums 'r' and 't', and per
# bucket b the fields 'r<b>' and 't<b>'; every bucket with data lies in [o, o + SPAN - 1].
# ARGV: now_ms ("" = server clock), then script arguments, then per rule rpm, tpm, max_parallel
# (-1 = none). Lua numbers are doubles: every value here is < 2^53.
_PRELUDE = (
    f"local B, SPAN = {BUCKET_MS}, {SPAN}\n"
    + """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local cur = math.floor(now / B)
local low = cur - SPAN + 1
local function lim(i, base)
  local a = base + 3 * (i - 1)
  return tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
end
local function int(x) return string.format('%d', x) end
local function fields(kind, from, to)
  local f = {}
  for b = from, to do f[#f + 1] = kind .. int(b) end
  return f
end
-- The window's (oldest bucket with data or nil, requests, tokens), counting buckets >= low.
-- With write, buckets that left the window are deleted (a bounded walk: at most SPAN buckets).
local function window(wk, write)
  local h = redis.call('HMGET', wk, 'o', 'r', 't')
  local o = tonumber(h[1])
  if not o then return nil, 0, 0 end
  local r, t = tonumber(h[2]), tonumber(h[3])
  if o >= low then return o, r, t end
  if low > o + SPAN - 1 then
    if write then redis.call('DEL', wk) end
    return nil, 0, 0
  end
  local fr, ft = fields('r', o, low - 1), fields('t', o, low - 1)
  local vr, vt = redis.call('HMGET', wk, unpack(fr)), redis.call('HMGET', wk, unpack(ft))
  for i = 1, #fr do r = r - (tonumber(vr[i]) or 0); t = t - (tonumber(vt[i]) or 0) end
  local rest = redis.call('HMGET', wk, unpack(fields('r', low, o + SPAN - 1)))
  o = nil
  for i = 1, #rest do if rest[i] then o = low + i - 1; break end end
  if write then
    if o then
      redis.call('HDEL', wk, unpack(fr)); redis.call('HDEL', wk, unpack(ft))
      redis.call('HSET', wk, 'o', int(o), 'r', int(r), 't', int(t))
    else
      redis.call('DEL', wk)
    end
  end
  return o, r, t
end
-- When (ms) at least `need` requests ('r') or tokens ('t') have left the window.
local function wait(wk, kind, from, need)
  local v = redis.call('HMGET', wk, unpack(fields(kind, from, cur)))
  local freed = 0
  for i = 1, #v do
    freed = freed + (tonumber(v[i]) or 0)
    if freed >= need then return (from + i - 1 + SPAN) * B end
  end
  return (cur + SPAN) * B
end
local function touch_leases(lk)
  local last = redis.call('ZRANGE', lk, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIRE', lk, math.max(1, tonumber(last[2]) - now + 1000)) end
end
"""
)

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
  local o, r, t, p, first, member = nil, 0, 0, 0, -1, false
  if rpm >= 0 or tpm >= 0 then o, r, t = window(wk, true) end
  if par >= 0 or tpm >= 0 then redis.call('ZREMRANGEBYSCORE', lk, '-inf', now) end
  if par >= 0 then
    member = redis.call('ZSCORE', lk, lease) ~= false
    p = redis.call('ZCARD', lk)
    if member then p = p - 1 end
    local e = redis.call('ZRANGE', lk, 0, 0, 'WITHSCORES')
    if e[2] then first = tonumber(e[2]) end
  end
  local wr, wt = -1, -1
  if rpm >= 0 and r + 1 > rpm then ok = false; wr = wait(wk, 'r', o or cur, r + 1 - rpm) end
  if tpm >= 0 and t > 0 and t + est > tpm then
    ok = false; wt = wait(wk, 't', o or cur, math.min(t, t + est - tpm))
  end
  if par >= 0 and p + 1 > par then ok = false end
  st[i] = {r, t, p, first, o and (o + SPAN) * B or -1, wr, wt, member}
end
if ok then
  for i = 1, n do
    local wk, lk = KEYS[2 * i - 1], KEYS[2 * i]
    local rpm, tpm, par = lim(i, 4)
    local s = st[i]
    if rpm >= 0 or tpm >= 0 then
      s[1] = s[1] + 1
      s[2] = s[2] + est
      if s[5] < 0 then
        s[5] = (cur + SPAN) * B
        redis.call('HSET', wk, 'o', int(cur))
      end
      redis.call('HINCRBY', wk, 'r', 1)
      redis.call('HINCRBY', wk, 't', est)
      redis.call('HINCRBY', wk, 'r' .. int(cur), 1)
      redis.call('HINCRBY', wk, 't' .. int(cur), est)
      redis.call('PEXPIRE', wk, (cur + SPAN) * B - now + 1000)
    end
    if par >= 0 or tpm >= 0 then
      redis.call('ZADD', lk, int(now + ttl), lease)
      touch_leases(lk)
      if par >= 0 and not s[8] then s[3] = s[3] + 1 end
    end
  end
end
local out = {ok and 1 or 0, now}
for i = 1, n do
  for j = 1, 7 do table.insert(out, st[i][j]) end
end
return out
"""
)

# ARGV[2] lease id, ARGV[3] token correction, ARGV[4] admission bucket start ms, rules from ARGV[5].
_SETTLE = Script(
    _PRELUDE
    + """
local lease, delta, at = ARGV[2], tonumber(ARGV[3]), int(math.floor(tonumber(ARGV[4]) / B))
for i = 1, #KEYS / 2 do
  local wk, lk = KEYS[2 * i - 1], KEYS[2 * i]
  local rpm, tpm, par = lim(i, 4)
  if (par >= 0 or tpm >= 0) and redis.call('ZREM', lk, lease) == 1 then
    if tpm >= 0 and delta ~= 0 and redis.call('HEXISTS', wk, 't' .. at) == 1 then
      redis.call('HINCRBY', wk, 't' .. at, int(delta))
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

# Read-only. Rules from ARGV[2]. Returns {now, then per rule r, t, live leases, oldest drop ms}.
_HEADROOM = Script(
    _PRELUDE
    + """
local out = {now}
for i = 1, #KEYS / 2 do
  local o, r, t = window(KEYS[2 * i - 1], false)
  table.insert(out, r); table.insert(out, t)
  table.insert(out, redis.call('ZCOUNT', KEYS[2 * i], '(' .. int(now), '+inf'))
  table.insert(out, o and (o + SPAN) * B or -1)
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
            return _build(rules, [], True, lease_id, _ms(now), estimated_tokens)
        keys, args = self._keys_args(rules)
        head: list[Arg] = [_now_arg(now), lease_id, estimated_tokens, self.lease_ttl_ms]
        res = await _ACQUIRE(self.client, keys, head + args)
        vals = [int(v) for v in res]
        allowed, now_ms = bool(vals[0]), vals[1]
        counts = [_Count(*vals[2 + 7 * i : 9 + 7 * i]) for i in range(len(rules))]
        return _build(rules, counts, allowed, lease_id, now_ms, estimated_tokens)

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
        now_ms = vals[0]
        return {
            r.scope: _headroom(
                r, _Count(vals[1 + 4 * i], vals[2 + 4 * i], vals[3 + 4 * i], -1, vals[4 + 4 * i]), now_ms
            )
            for i, r in enumerate(rules)
        }


def _neg(v: int | None) -> int:
    return -1 if v is None else v


def _now_arg(now: float | None) -> str:
    return "" if now is None else str(round(now * 1000))
