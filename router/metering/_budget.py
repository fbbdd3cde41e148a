"""Spend budgets per scope and period, exact across replicas.

Money is :class:`~decimal.Decimal` in the API and integer pico-USD (1e-12)
in storage. In Redis the Lua scripts never do arithmetic on money: amounts
travel as decimal strings into ``HINCRBY`` (exact 64-bit integers, up to
about 9.2 million USD per bucket) and are compared as digit strings, because
Lua numbers are doubles and would round above 2^53 pico-USD (~9,007 USD).

Each (scope, period window) has a bucket: ``spent`` (settled actual cost),
``reserved`` (estimates of requests in flight) and their sum ``committed``.

* :meth:`BudgetStore.reserve` admits iff ``committed < limit`` -- the budget
  is not yet crossed -- and then adds the estimate to ``reserved``. Reserving
  the same id twice is a no-op that answers "allowed" (safe to retry).
* :meth:`BudgetStore.settle` moves the reservation's estimate out of
  ``reserved`` and the actual cost into ``spent``, exactly once per
  reservation id (a repeated settle within ``dedupe_ttl`` does nothing).
  ``settle(actual=0)`` cancels a reservation. A reservation that is never
  settled (its router died) expires after ``reservation_ttl``.

**The bound.** Let R be the last request admitted in a window, E its
reservation and A its actual cost. When R was admitted, ``spent +
reserved < limit``, and every request that will ever be charged to the window
was either settled by then (in ``spent``) or in flight (its estimate in
``reserved``). Hence::

    final spent < limit + A_R + sum over the others in flight at R of max(0, A_i - E_i)

Replicas change nothing: every decision is one atomic step on the shared
store. The metering layer (``_metering.worst_case``) makes ``E`` the worst
case, so that ``A <= E`` and the overshoot is below the actual cost of R
alone, one request. It can only fail to be when an upstream bills more than
the request allowed (more completion tokens than ``max_tokens``, or a prompt
the router's estimate undercounts); see docs/keys-and-metering.md.

Periods: ``daily``, ``weekly`` (ISO weeks from Monday 00:00 UTC), ``monthly``
(calendar months UTC) or a duration ``<n>s|m|h|d`` aligned to the Unix epoch
(``30m``, ``12h``, ``7d``). Windows are computed from the caller's clock
(the key names depend on them), so replicas need NTP-synchronized clocks; a
skew only decides which window a request at the very boundary lands in.
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Protocol

from ..redis_store import Arg, Client, Script
from ._pricing import from_pico, to_pico

_DURATION = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Buckets outlive their window by this long, so late settles still land.
GRACE = 86400.0
DEFAULT_RESERVATION_TTL = 900.0
DEFAULT_DEDUPE_TTL = 3600.0


def validate_period(period: str) -> str:
    if period in ("daily", "weekly", "monthly") or _DURATION.match(period):
        return period
    raise ValueError(
        f"invalid budget period {period!r}: expected daily, weekly, monthly or a duration "
        "like 30m, 12h, 7d (a positive integer and one of s, m, h, d)"
    )


#: The last window computed per period: every request of a period asks for the same one.
_LAST: dict[str, tuple[float, float, str]] = {}


def period_window(period: str, now: float | None = None) -> tuple[float, float, str]:
    """``(start, end, key_suffix)`` of the window of ``period`` containing ``now`` (Unix seconds)."""
    t = time.time() if now is None else now
    last = _LAST.get(period)
    if last is not None and last[0] <= t < last[1]:
        return last
    window = _period_window(period, t)
    _LAST[period] = window
    return window


def _period_window(period: str, t: float) -> tuple[float, float, str]:
    validate_period(period)
    if period in ("daily", "weekly", "monthly"):
        day = datetime.fromtimestamp(t, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        if period == "daily":
            start, end = day, day + timedelta(days=1)
            suffix = f"d:{start:%Y-%m-%d}"
        elif period == "weekly":
            start = day - timedelta(days=day.weekday())
            end = start + timedelta(days=7)
            year, week, _ = start.isocalendar()
            suffix = f"w:{year}-W{week:02d}"
        else:
            start = day.replace(day=1)
            end = (
                start.replace(year=start.year + 1, month=1)
                if start.month == 12
                else start.replace(month=start.month + 1)
            )
            suffix = f"m:{start:%Y-%m}"
        return start.timestamp(), end.timestamp(), suffix
    m = _DURATION.match(period)
    assert m is not None
    length = int(m.group(1)) * _UNIT[m.group(2)]
    begin = int(t // length) * length
    return float(begin), float(begin + length), f"p{period}:{begin}"


@dataclass(slots=True)
class BudgetDecision:
    allowed: bool
    spent: Decimal
    reserved: Decimal
    remaining: Decimal
    resets_at: float
    #: The window the reservation was made in; pass it to settle.
    period_key: str = ""


class BudgetStore(Protocol):
    async def reserve(
        self,
        scope: str,
        period: str,
        limit: Decimal,
        estimate: Decimal,
        reservation_id: str,
        now: float | None = None,
    ) -> BudgetDecision: ...

    async def settle(
        self,
        scope: str,
        period: str,
        reservation_id: str,
        estimate: Decimal,
        actual: Decimal,
        *,
        period_key: str | None = None,
        now: float | None = None,
    ) -> bool: ...

    async def spent(self, scope: str, period: str, now: float | None = None) -> Decimal: ...


def _decision(allowed: bool, spent: int, reserved: int, limit: int, end: float, key: str) -> BudgetDecision:
    return BudgetDecision(
        allowed,
        from_pico(spent),
        from_pico(reserved),
        from_pico(max(0, limit - spent - reserved)),
        end,
        key,
    )


def _ttl_ms(end: float, now: float) -> int:
    return max(1000, round((end - now + GRACE) * 1000))


# --------------------------------------------------------------------------- memory


@dataclass(slots=True)
class _Bucket:
    expires: float
    spent: int = 0
    reserved: int = 0
    #: reservation id -> (estimate, expiry)
    held: dict[str, tuple[int, float]] = field(default_factory=dict)


class MemoryBudgetStore:
    """The single-process store; each call is atomic on the event loop."""

    def __init__(
        self, reservation_ttl: float = DEFAULT_RESERVATION_TTL, dedupe_ttl: float = DEFAULT_DEDUPE_TTL
    ) -> None:
        self.reservation_ttl = reservation_ttl
        self.dedupe_ttl = dedupe_ttl
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._done: dict[tuple[str, str, str], float] = {}
        #: (expiry, id) of ``_done`` in the order settled: expired ones leave from the left, O(1) each.
        self._done_order: collections.deque[tuple[float, tuple[str, str, str]]] = collections.deque()
        self._ops = 0

    def _bucket(self, scope: str, key: str, end: float, now: float) -> _Bucket:
        self._ops += 1
        if self._ops % 1024 == 0:
            self._buckets = {k: b for k, b in self._buckets.items() if b.expires > now}
        order = self._done_order
        while order and order[0][0] <= now:
            exp, done = order.popleft()
            if self._done.get(done) == exp:
                del self._done[done]
        b = self._buckets.get((scope, key))
        if b is None or b.expires <= now:
            b = self._buckets[(scope, key)] = _Bucket(end + GRACE)
        for rid in [rid for rid, (_, exp) in b.held.items() if exp <= now]:
            b.reserved -= b.held.pop(rid)[0]
        return b

    async def reserve(
        self,
        scope: str,
        period: str,
        limit: Decimal,
        estimate: Decimal,
        reservation_id: str,
        now: float | None = None,
    ) -> BudgetDecision:
        t = time.time() if now is None else now
        return self.reserve_now(BudgetAsk(scope, period, limit, estimate, reservation_id, t), True)

    def reserve_now(self, ask: BudgetAsk, commit: bool) -> BudgetDecision:
        """Reserve synchronously (``commit=False``: only decide), for the memory limiter's one step."""
        _, end, key = period_window(ask.period, ask.now)
        lim, est = to_pico(ask.limit), to_pico(ask.estimate)
        b = self._bucket(ask.scope, key, end, ask.now)
        allowed = ask.reservation_id in b.held or b.spent + b.reserved < lim
        if commit and allowed and ask.reservation_id not in b.held:
            b.reserved += est
            b.held[ask.reservation_id] = (est, ask.now + self.reservation_ttl)
        return _decision(allowed, b.spent, b.reserved, lim, end, key)

    async def settle(
        self,
        scope: str,
        period: str,
        reservation_id: str,
        estimate: Decimal,
        actual: Decimal,
        *,
        period_key: str | None = None,
        now: float | None = None,
    ) -> bool:
        t = time.time() if now is None else now
        key = period_key or period_window(period, t)[2]
        return self.settle_now(BudgetCharge(scope, period, reservation_id, actual, key, t))

    def settle_now(self, c: BudgetCharge) -> bool:
        end = period_window(c.period, c.now)[1]
        done = (c.scope, c.period_key, c.reservation_id)
        if self._done.get(done, 0.0) > c.now:
            return False
        self._done[done] = c.now + self.dedupe_ttl
        self._done_order.append((c.now + self.dedupe_ttl, done))
        b = self._bucket(c.scope, c.period_key, end, c.now)
        held = b.held.pop(c.reservation_id, None)
        if held is not None:
            b.reserved -= held[0]
        b.spent += to_pico(c.actual)
        return True

    async def spent(self, scope: str, period: str, now: float | None = None) -> Decimal:
        t = time.time() if now is None else now
        _, _, key = period_window(period, t)
        b = self._buckets.get((scope, key))
        return from_pico(b.spent if b is not None and b.expires > t else 0)


# --------------------------------------------------------------------------- redis

# A bucket is three keys: bk the bucket hash {s, r, c}, hk reservation estimates (hash id -> pico),
# ek reservation expiries (zset id -> ms); dk is the bucket's set of settled ids. Money stays in
# decimal strings. These functions are shared with the limiter's admission and settlement scripts,
# which reserve and settle budgets in the same atomic step as the limits (see ``_limits``).
LUA = """
local function b_cmp(a, b)
  local na, nb = a:sub(1, 1) == '-', b:sub(1, 1) == '-'
  if na ~= nb then return na and -1 or 1 end
  if na then a, b = b:sub(2), a:sub(2) end
  a = (a:gsub('^0+', '')); b = (b:gsub('^0+', ''))
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function b_neg(x) if x == '0' then return '0' end return '-' .. x end
local function b_unhold(bk, hk, ek, rid)
  local est = redis.call('HGET', hk, rid)
  if est then
    redis.call('HINCRBY', bk, 'r', b_neg(est))
    redis.call('HINCRBY', bk, 'c', b_neg(est))
    redis.call('HDEL', hk, rid)
  end
  redis.call('ZREM', ek, rid)
end
local function b_expire_held(bk, hk, ek, now)
  local gone = redis.call('ZRANGEBYSCORE', ek, '-inf', now, 'LIMIT', 0, 256)
  for _, rid in ipairs(gone) do b_unhold(bk, hk, ek, rid) end
end
local function b_state(bk)
  local h = redis.call('HMGET', bk, 's', 'r')
  return {h[1] or '0', h[2] or '0'}
end
-- Would a reservation be admitted? (allowed, already held). Expired reservations are dropped first.
local function b_check(bk, hk, ek, now, limit, rid)
  b_expire_held(bk, hk, ek, now)
  if redis.call('HEXISTS', hk, rid) == 1 then return true, true end
  return b_cmp(redis.call('HGET', bk, 'c') or '0', limit) < 0, false
end
local function b_hold(bk, hk, ek, est, rid, expiry, ttl)
  redis.call('HINCRBY', bk, 'r', est)
  redis.call('HINCRBY', bk, 'c', est)
  redis.call('HSET', hk, rid, est)
  redis.call('ZADD', ek, expiry, rid)
  for _, k in ipairs({bk, hk, ek}) do redis.call('PEXPIRE', k, ttl) end
end
-- Settle once per id: release the reservation, add the actual cost. Returns 0 if already settled.
local function b_settle(bk, hk, ek, dk, now, rid, actual, ttl, dedupe)
  if redis.call('SADD', dk, rid) == 0 then return 0 end
  redis.call('PEXPIRE', dk, math.max(tonumber(ttl), tonumber(dedupe)))
  b_expire_held(bk, hk, ek, now)
  b_unhold(bk, hk, ek, rid)
  redis.call('HINCRBY', bk, 's', actual)
  redis.call('HINCRBY', bk, 'c', actual)
  for _, k in ipairs({bk, hk, ek}) do redis.call('PEXPIRE', k, ttl) end
  return 1
end
"""

# KEYS: bk, hk, ek. ARGV: now ms, limit, estimate, reservation id, reservation expiry ms, key ttl ms.
_RESERVE = Script(
    LUA
    + """
local ok, held = b_check(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[4])
if ok and not held then b_hold(KEYS[1], KEYS[2], KEYS[3], ARGV[3], ARGV[4], ARGV[5], ARGV[6]) end
local s = b_state(KEYS[1]); return {ok and 1 or 0, s[1], s[2]}
"""
)

# KEYS: bk, hk, ek, dk. ARGV: now ms, reservation id, actual, key ttl ms, dedupe ttl ms.
_SETTLE = Script(
    LUA
    + """
return b_settle(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"""
)


@dataclass(frozen=True, slots=True)
class BudgetAsk:
    """A reservation to make in the same atomic step as a limiter's admission (see ``_limits``)."""

    scope: str
    period: str
    limit: Decimal
    estimate: Decimal
    reservation_id: str
    now: float


@dataclass(frozen=True, slots=True)
class BudgetCharge:
    """A settlement to apply in a limiter's batched settlement (see ``_limits``)."""

    scope: str
    period: str
    reservation_id: str
    actual: Decimal
    period_key: str
    now: float


class RedisBudgetStore:
    """The shared store: reserve and settle are one atomic script each."""

    def __init__(
        self,
        client: Client,
        prefix: str = "kubellm:",
        reservation_ttl: float = DEFAULT_RESERVATION_TTL,
        dedupe_ttl: float = DEFAULT_DEDUPE_TTL,
        *,
        tag_scopes: bool = False,
    ) -> None:
        self.client = client
        self.prefix = prefix
        #: Redis Cluster: a scope's buckets carry its hash tag, in the slot of the key's limits.
        self.tag_scopes = tag_scopes
        self.reservation_ttl = reservation_ttl
        self.dedupe_ttl = dedupe_ttl

    def _keys(self, scope: str, key: str) -> list[str]:
        base = (
            f"{self.prefix}budget:{{{scope}}}:{key}"
            if self.tag_scopes
            else f"{self.prefix}budget:{scope}:{key}"
        )
        return [base, base + ":held", base + ":exp"]

    def reserve_keys_args(self, ask: BudgetAsk) -> tuple[list[str], list[Arg], int, float, str]:
        """Keys and ARGV of a reservation (as ``_RESERVE`` takes them), its limit, window end and key."""
        _, end, key = period_window(ask.period, ask.now)
        lim = to_pico(ask.limit)
        args: list[Arg] = [
            round(ask.now * 1000),
            str(lim),
            str(to_pico(ask.estimate)),
            ask.reservation_id,
            round((ask.now + self.reservation_ttl) * 1000),
            _ttl_ms(end, ask.now),
        ]
        return self._keys(ask.scope, key), args, lim, end, key

    def settle_keys_args(self, c: BudgetCharge) -> tuple[list[str], list[Arg]]:
        """Keys and ARGV of a settlement, as ``_SETTLE`` takes them."""
        end = period_window(c.period, c.now)[1]
        bucket = self._keys(c.scope, c.period_key)
        keys = [*bucket, bucket[0] + ":done"]
        args: list[Arg] = [
            round(c.now * 1000),
            c.reservation_id,
            str(to_pico(c.actual)),
            _ttl_ms(end, c.now),
            round(self.dedupe_ttl * 1000),
        ]
        return keys, args

    async def reserve(
        self,
        scope: str,
        period: str,
        limit: Decimal,
        estimate: Decimal,
        reservation_id: str,
        now: float | None = None,
    ) -> BudgetDecision:
        t = time.time() if now is None else now
        ask = BudgetAsk(scope, period, limit, estimate, reservation_id, t)
        keys, args, lim, end, key = self.reserve_keys_args(ask)
        ok, spent, reserved = await _RESERVE(self.client, keys, args)
        return _decision(bool(ok), int(spent), int(reserved), lim, end, key)

    async def settle(
        self,
        scope: str,
        period: str,
        reservation_id: str,
        estimate: Decimal,
        actual: Decimal,
        *,
        period_key: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Returns False when this reservation was already settled (nothing changed)."""
        t = time.time() if now is None else now
        key = period_key or period_window(period, t)[2]
        keys, args = self.settle_keys_args(BudgetCharge(scope, period, reservation_id, actual, key, t))
        return bool(await _SETTLE(self.client, keys, args))

    async def spent(self, scope: str, period: str, now: float | None = None) -> Decimal:
        _, _, key = period_window(period, now)
        raw = await self.client.hget(self._keys(scope, key)[0], "s")
        return from_pico(int(raw or 0))
