"""The Redis twin of :class:`~kubellm.router.metering._limits.MemoryLimiter`: the same semantics (see
``_limits``), each call one atomic Lua script on one Redis, shared by every replica."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from ..redis_store import Arg, Client, Script
from . import _budget
from ._budget import BudgetAsk, BudgetCharge, RedisBudgetStore
from ._limits import (
    BUCKET_MS,
    DEFAULT_LEASE_TTL,
    SPAN,
    Admission,
    BudgetAsks,
    Headroom,
    LimitRule,
    Settlement,
    _build,
    _Count,
    _headroom,
    _ms,
    asks_of,
    set_budgets,
)

# KEYS: per rule i, KEYS[2i-1] = window hash, KEYS[2i] = lease zset (member lease id, score expiry
# ms). The window hash holds 'o' (the oldest bucket with data), the sums 'r' and 't', and per
# bucket b the fields 'r<b>' and 't<b>'; every bucket with data lies in [o, o + SPAN - 1].
# ARGV: now_ms ("" = server clock), then script arguments, then per rule rpm, tpm, max_parallel
# (-1 = none). Lua numbers are doubles: every value here is < 2^53.
_PRELUDE = (
    f"local B, SPAN = {BUCKET_MS}, {SPAN}\n"
    + """
-- A: the arguments of the operation being run (a batch runs several, see _ACQUIRE_MANY).
local A, server_now = ARGV, nil
local now, cur, low
local function set_now(arg)
  now = tonumber(arg)
  if not now then
    if not server_now then
      local t = redis.call('TIME')
      server_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    now = server_now
  end
  cur = math.floor(now / B)
  low = cur - SPAN + 1
end
set_now(ARGV[1])
local function lim(i, base)
  local a = base + 3 * (i - 1)
  return tonumber(A[a + 1]), tonumber(A[a + 2]), tonumber(A[a + 3])
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
local function settle_lease(wk, lk, tpm, par, lease, delta, at)
  if (par >= 0 or tpm >= 0) and redis.call('ZREM', lk, lease) == 1 then
    if tpm >= 0 and delta ~= 0 and redis.call('HEXISTS', wk, 't' .. at) == 1 then
      redis.call('HINCRBY', wk, 't' .. at, int(delta))
      redis.call('HINCRBY', wk, 't', int(delta))
    end
  end
end
"""
)

# ARGV[2] lease id, ARGV[3] estimate, ARGV[4] lease ttl ms, ARGV[5] the number of budget
# reservations asked for (a key's and its team's: all are made or none), then 6 arguments per
# reservation as _budget's reserve takes them (now, limit, estimate, id, expiry, ttl); rules follow.
# KEYS: 2 per rule, then 3 per budget. Returns {limits ok, now, budgets ok, number of budgets, per
# budget its ok, spent, reserved, then per rule 7 counts}; records nothing unless every limit and
# every budget admit.
_ADMIT = (
    _PRELUDE
    + _budget.LUA
    + """
local function admit(K)
  local lease, est, ttl, nb = A[2], tonumber(A[3]), tonumber(A[4]), tonumber(A[5])
  local rbase = 5 + 6 * nb
  local n = (#K - 3 * nb) / 2
  local ok, st = true, {}
  for i = 1, n do
    local wk, lk = K[2 * i - 1], K[2 * i]
    local rpm, tpm, par = lim(i, rbase)
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
  local bok, bs = true, {}
  for j = 1, nb do
    local k, a = 2 * n + 3 * (j - 1), 5 + 6 * (j - 1)
    local jok, jheld = b_check(K[k + 1], K[k + 2], K[k + 3], A[a + 1], A[a + 2], A[a + 4])
    bs[j] = {jok, jheld}
    bok = bok and jok
  end
  if ok and bok then
    for j = 1, nb do
      local k, a = 2 * n + 3 * (j - 1), 5 + 6 * (j - 1)
      if not bs[j][2] then b_hold(K[k + 1], K[k + 2], K[k + 3], A[a + 3], A[a + 4], A[a + 5], A[a + 6]) end
    end
    for i = 1, n do
      local wk, lk = K[2 * i - 1], K[2 * i]
      local rpm, tpm, par = lim(i, rbase)
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
        redis.call('HINCRBY', wk, 't' .. int(cur), est)
        -- The newest bucket sets the key's lifetime: renew it once per bucket, not per request.
        if redis.call('HINCRBY', wk, 'r' .. int(cur), 1) == 1 then
          redis.call('PEXPIRE', wk, (cur + SPAN) * B - now + 1000)
        end
      end
      if par >= 0 or tpm >= 0 then
        redis.call('ZADD', lk, int(now + ttl), lease)
        -- Every lease lives ttl: the one just added expires last, so the key outlives it by 1 s.
        redis.call('PEXPIRE', lk, ttl + 1000)
        if par >= 0 and not s[8] then s[3] = s[3] + 1 end
      end
    end
  end
  local out = {ok and 1 or 0, now, bok and 1 or 0, nb}
  for j = 1, nb do
    local state = b_state(K[2 * n + 3 * (j - 1) + 1])
    table.insert(out, bs[j][1] and 1 or 0); table.insert(out, state[1]); table.insert(out, state[2])
  end
  for i = 1, n do
    for j = 1, 7 do table.insert(out, st[i][j]) end
  end
  return out
end
"""
)
# Answers travel as one string ("n,n,...", batches joined by ";"): a client parsing a RESP array
# element by element in Python spends more on a 40-element reply than Redis spends on the script.
_PACK = """
local function pack(r)
  for i, v in ipairs(r) do if type(v) == 'number' then r[i] = int(v) end end
  return table.concat(r, ',')
end
"""
_ACQUIRE = Script(_ADMIT + _PACK + "return pack(admit(KEYS))\n")

# Several acquires in one script, run one after the other as if sent one by one: ARGV[1] their
# number, then per acquire its key count, its argument count and its ARGV as _ACQUIRE takes it;
# KEYS are theirs, in order. Returns their answers, packed (see _PACK).
_ACQUIRE_MANY = Script(
    _ADMIT
    + _PACK
    + """
local out, k, a = {}, 1, 2
for _ = 1, tonumber(ARGV[1]) do
  local nk, na = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local ks, as = {}, {}
  for i = 1, nk do ks[i] = KEYS[k + i - 1] end
  for i = 1, na do as[i] = ARGV[a + 1 + i] end
  k, a = k + nk, a + 2 + na
  A = as
  set_now(as[1])
  out[#out + 1] = pack(admit(ks))
end
return table.concat(out, ';')
"""
)

# ARGV[2] lease id, ARGV[3] token correction, ARGV[4] admission bucket start ms, rules from ARGV[5].
_SETTLE = Script(
    _PRELUDE
    + """
local lease, delta, at = ARGV[2], tonumber(ARGV[3]), int(math.floor(tonumber(ARGV[4]) / B))
for i = 1, #KEYS / 2 do
  local rpm, tpm, par = lim(i, 4)
  settle_lease(KEYS[2 * i - 1], KEYS[2 * i], tpm, par, lease, delta, at)
end
return 1
"""
)

# A batch. ARGV[2] the number of settlements; then per settlement: its rule count, 1 if it carries
# a budget charge, lease id, token correction, admission bucket start ms; per rule rpm, tpm,
# max_parallel; for a charge the 5 arguments of _budget's settle. KEYS in the same order: 2 per
# rule, then the charge's 4. Returns how many charges were new.
_SETTLE_MANY = Script(
    _PRELUDE
    + _budget.LUA
    + """
local a, k, new = 3, 1, 0
-- Token corrections are summed per window and bucket and applied once per batch; budget buckets
-- drop their expired reservations and renew their ttl once per batch.
local corr, wins, seen = {}, {}, {}
for _ = 1, tonumber(ARGV[2]) do
  local nr, hb, lease, delta = tonumber(ARGV[a]), ARGV[a + 1] == '1', ARGV[a + 2], tonumber(ARGV[a + 3])
  local at = int(math.floor(tonumber(ARGV[a + 4]) / B))
  a = a + 5
  for _ = 1, nr do
    local wk, lk, tpm, par = KEYS[k], KEYS[k + 1], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    if (par >= 0 or tpm >= 0) and redis.call('ZREM', lk, lease) == 1 and tpm >= 0 and delta ~= 0 then
      local w = corr[wk]
      if not w then w = {}; corr[wk] = w; wins[#wins + 1] = wk end
      w[at] = (w[at] or 0) + delta
    end
    k, a = k + 2, a + 3
  end
  if hb then
    local bk, hk, ek, dk = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
    local now_b, rid, actual, ttl, dedupe = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
    if redis.call('SADD', dk, rid) == 1 then
      if not seen[bk] then
        seen[bk] = true
        redis.call('PEXPIRE', dk, math.max(tonumber(ttl), tonumber(dedupe)))
        b_expire_held(bk, hk, ek, now_b)
        for _, key in ipairs({bk, hk, ek}) do redis.call('PEXPIRE', key, ttl) end
      end
      b_unhold(bk, hk, ek, rid)
      redis.call('HINCRBY', bk, 's', actual)
      redis.call('HINCRBY', bk, 'c', actual)
      new = new + 1
    end
    k, a = k + 4, a + 5
  end
end
for _, wk in ipairs(wins) do
  local total = 0
  for at, d in pairs(corr[wk]) do
    if d ~= 0 and redis.call('HEXISTS', wk, 't' .. at) == 1 then
      redis.call('HINCRBY', wk, 't' .. at, int(d))
      total = total + d
    end
  end
  if total ~= 0 then redis.call('HINCRBY', wk, 't', int(total)) end
end
return new
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

    def __init__(
        self,
        client: Client,
        prefix: str = "kubellm:",
        lease_ttl: float = DEFAULT_LEASE_TTL,
        budgets: RedisBudgetStore | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_ttl_ms = round(lease_ttl * 1000)
        #: Must live on the same Redis: its reservations are made inside this limiter's scripts.
        self.budgets = budgets
        #: Acquires waiting for the next batch: (keys, args, their answer, how to undo an admission).
        self._queue: list[_Queued] = []
        self._sending = False

    async def _admit(self, keys: list[str], args: list[Arg], undo: list[Settlement]) -> list[Any]:
        """Run one acquire script, sharing the round trip with the acquires that are ready with it.

        While a batch is in flight, new acquires queue; the next batch takes them all. So an idle
        limiter sends each acquire at once, and a busy one about one script per round trip."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, future, undo))
        if not self._sending:
            self._sending = True
            asyncio.get_running_loop().create_task(self._send_batches())
        return await future

    async def _send_batches(self) -> None:
        try:
            await asyncio.sleep(0)  # the acquires ready now join the first batch
            while self._queue:
                batch = [q for q in self._queue[:MAX_BATCH] if not q[2].done()]  # skip cancelled
                del self._queue[:MAX_BATCH]
                if batch:
                    await self._send(batch)
        finally:
            self._sending = False

    async def _send(self, batch: list[_Queued]) -> None:
        try:
            if len(batch) == 1:
                answers = [(await _ACQUIRE(self.client, batch[0][0], batch[0][1])).split(b",")]
            else:
                keys: list[str] = []
                args: list[Arg] = [len(batch)]
                for k, a, _, _ in batch:
                    keys += k
                    args += [len(k), len(a), *a]
                packed = await _ACQUIRE_MANY(self.client, keys, args)
                answers = [answer.split(b",") for answer in packed.split(b";")]
        except Exception as exc:
            for _, _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        undo: list[Settlement] = []
        for (_, _, future, items), answer in zip(batch, answers, strict=True):
            if not future.done():
                future.set_result(answer)
            elif int(answer[0]) and int(answer[2]):  # admitted, but its caller is gone: undo it
                undo += items
        if undo:
            with contextlib.suppress(Exception):  # else the leases expire, the reservations too
                await self.settle_many(undo)

    def _base(self, scope: str) -> str:
        """Where a scope's keys start (Redis Cluster tags them, see ``_limits_cluster``)."""
        return f"{self.prefix}lim:{scope}"

    def _keys_args(self, rules: Sequence[LimitRule]) -> tuple[list[str], list[Arg]]:
        keys: list[str] = []
        args: list[Arg] = []
        for r in rules:
            base = self._base(r.scope)
            keys += (base + ":w", base + ":l")
            args += (_neg(r.rpm), _neg(r.tpm), _neg(r.max_parallel))
        return keys, args

    async def acquire(
        self,
        rules: Sequence[LimitRule],
        estimated_tokens: int,
        lease_id: str,
        now: float | None = None,
        budget: BudgetAsks = None,
    ) -> Admission:
        rules = [r for r in rules if r.active]
        asks = asks_of(budget)
        if not rules and not asks:
            return _build(rules, [], True, lease_id, _ms(now), estimated_tokens)
        keys, args = self._keys_args(rules)
        head: list[Arg] = [_now_arg(now), lease_id, estimated_tokens, self.lease_ttl_ms, len(asks)]
        undo = [Settlement(rules, lease_id, 0, 0, 0.0)]
        windows: list[tuple[int, float, str]] = []
        if asks and self.budgets is None:
            raise TypeError("this limiter holds no budget store to reserve in")
        for ask in asks:
            assert self.budgets is not None
            bkeys, bargs, limit, end, period_key = self.budgets.reserve_keys_args(ask)
            keys += bkeys
            head += bargs
            windows.append((limit, end, period_key))
            undo.append(Settlement((), ask.reservation_id, 0, 0, 0.0, _zero_charge(ask, period_key)))
        vals = await self._admit(keys, head + args, undo)
        allowed, now_ms, budget_ok = bool(int(vals[0])), int(vals[1]), bool(int(vals[2]))
        nb = int(vals[3])
        nums = [int(v) for v in vals[4 + 3 * nb :]]
        counts = [_Count(*nums[7 * i : 7 * i + 7]) for i in range(len(rules))]
        adm = _build(rules, counts, allowed and budget_ok, lease_id, now_ms, estimated_tokens)
        decisions = [
            _budget._decision(
                bool(int(vals[4 + 3 * j])), int(vals[5 + 3 * j]), int(vals[6 + 3 * j]), limit, end, key
            )
            for j, (limit, end, key) in enumerate(windows)
        ]
        set_budgets(adm, asks, decisions)
        return adm

    async def settle_many(self, items: Sequence[Settlement]) -> None:
        """Every settlement and budget charge of ``items`` in one script (one round trip)."""
        keys: list[str] = []
        args: list[Arg] = ["", len(items)]
        for it in items:
            rules = [r for r in it.rules if r.active]
            rkeys, rargs = self._keys_args(rules)
            keys += rkeys
            delta = it.actual_tokens - it.estimated_tokens
            args += [len(rules), 1 if it.charge else 0, it.lease_id, delta, round(it.window_start * 1000)]
            args += rargs
            if it.charge is not None:
                if self.budgets is None:
                    raise TypeError("this limiter holds no budget store to charge")
                ckeys, cargs = self.budgets.settle_keys_args(it.charge)
                keys += ckeys
                args += cargs
        if items:
            await _SETTLE_MANY(self.client, keys, args)

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


#: Acquires in one batch at most.
MAX_BATCH = 64
#: A queued acquire: its keys, its arguments, its answer, and how to undo its admission.
_Queued = tuple[list[str], list[Arg], "asyncio.Future[list[Any]]", list[Settlement]]


def _zero_charge(ask: BudgetAsk, period_key: str) -> BudgetCharge:
    """Cancels a reservation (settles it at no cost)."""
    return BudgetCharge(ask.scope, ask.period, ask.reservation_id, Decimal(0), period_key, ask.now)


def _neg(v: int | None) -> int:
    return -1 if v is None else v


def _now_arg(now: float | None) -> str:
    return "" if now is None else str(round(now * 1000))
