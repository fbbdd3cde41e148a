"""The Lua of quota leasing (see ``_lease``): grant slices, return them, settle against them.

The scripts work on the limiter's own window hashes (``_limits_redis``) and the budget store's
buckets (``_budget``), so leased and per-request admissions count in the same windows and budgets.
"""

from __future__ import annotations

from ..redis_store import Script
from . import _budget
from ._limits import BUCKET_MS
from ._limits_redis import _PRELUDE

# Ops a script applies, encoded in KEYS/ARGV from positions ki/ai (see ``_lease._Ops``):
# 'w' KEYS wk; ARGV bucket ms, requests delta, tokens delta: corrects a window bucket still in it.
# 'h' KEYS bk hk ek; ARGV hold id, shrink (pico), new expiry ms or '': shrinks a slice's hold.
# 'c' KEYS bk hk ek dk; ARGV now, ttl, dedupe, hold id, n, their total actual and total shrink,
#     then n (request id, actual, shrink): charges each request once (by id) and shrinks the
#     slice's hold by each shrink (one request id charged before: one by one).
_OPS = """
local function shrink_hold(bk, hk, ek, id, by, expiry)
  local hold = redis.call('HGET', hk, id)
  if not hold then return end
  if b_cmp(by, hold) > 0 then by = hold end
  if by ~= '0' then
    redis.call('HINCRBY', hk, id, b_neg(by))
    redis.call('HINCRBY', bk, 'r', b_neg(by))
    redis.call('HINCRBY', bk, 'c', b_neg(by))
  end
  if b_cmp(redis.call('HGET', hk, id), '0') <= 0 then
    b_unhold(bk, hk, ek, id)
  elseif expiry ~= '' then
    redis.call('ZADD', ek, expiry, id)
  end
end
local function apply_ops(n, ki, ai)
  for _ = 1, n do
    local op = ARGV[ai]
    if op == 'w' then
      local wk, b = KEYS[ki], int(math.floor(tonumber(ARGV[ai + 1]) / B))
      local dr, dt = tonumber(ARGV[ai + 2]), tonumber(ARGV[ai + 3])
      if redis.call('HEXISTS', wk, 'r' .. b) == 1 then
        if dr ~= 0 then
          redis.call('HINCRBY', wk, 'r' .. b, int(dr)); redis.call('HINCRBY', wk, 'r', int(dr))
        end
        if dt ~= 0 then
          redis.call('HINCRBY', wk, 't' .. b, int(dt)); redis.call('HINCRBY', wk, 't', int(dt))
        end
      end
      ki, ai = ki + 1, ai + 4
    elseif op == 'h' then
      shrink_hold(KEYS[ki], KEYS[ki + 1], KEYS[ki + 2], ARGV[ai + 1], ARGV[ai + 2], ARGV[ai + 3])
      ki, ai = ki + 3, ai + 4
    else
      local bk, hk, ek, dk = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2], KEYS[ki + 3]
      local now, ttl, dedupe = ARGV[ai + 1], ARGV[ai + 2], ARGV[ai + 3]
      local id, m, total, by = ARGV[ai + 4], tonumber(ARGV[ai + 5]), ARGV[ai + 6], ARGV[ai + 7]
      ai = ai + 8
      b_expire_held(bk, hk, ek, now)
      local rids = {}
      for j = 1, m do rids[j] = ARGV[ai + 3 * (j - 1)] end
      local seen, again = redis.call('SMISMEMBER', dk, unpack(rids)), false
      for j = 1, m do if seen[j] == 1 then again = true end end
      if not again then
        -- The usual case, none charged before: the batch's sums at once.
        redis.call('SADD', dk, unpack(rids))
        redis.call('HINCRBY', bk, 's', total)
        redis.call('HINCRBY', bk, 'c', total)
        shrink_hold(bk, hk, ek, id, by, '')
      else
        for _ = 1, m do
          local rid, actual, one = ARGV[ai], ARGV[ai + 1], ARGV[ai + 2]
          if redis.call('SADD', dk, rid) == 1 then
            redis.call('HINCRBY', bk, 's', actual)
            redis.call('HINCRBY', bk, 'c', actual)
            shrink_hold(bk, hk, ek, id, one, '')
          end
          ai = ai + 3
        end
      end
      ai = ai + (again and 0 or 3 * m)
      redis.call('PEXPIRE', dk, math.max(tonumber(ttl), tonumber(dedupe)))
      for _, key in ipairs({bk, hk, ek}) do redis.call('PEXPIRE', key, ttl) end
      ki = ki + 4
    end
  end
  return ki, ai
end
"""

# ARGV[1] now ('' = server clock), ARGV[2] op count, the ops (KEYS/ARGV from the start), then:
# rule count n, fraction, budget flag; per rule rpm, tpm, want requests, need requests, want tokens,
# need tokens; with a budget: limit, want, need (pico, decimal strings), hold id, hold expiry ms,
# key ttl ms. KEYS after the ops: per rule its window hash, then the budget's bk hk ek.
# All or nothing: a slice is granted for every rule and the budget, or for none. A grant is counted
# in the current bucket like that many admissions. Returns, packed: granted (1/0), now, then per
# rule: requests granted, tokens granted, window requests, window tokens, oldest drop ms; then the
# budget's granted, spent, reserved.
LEASE = Script(
    _PRELUDE
    + _budget.LUA
    + _OPS
    + """
local ki, ai = apply_ops(tonumber(ARGV[2]), 1, 3)
local n, frac, hb = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]), ARGV[ai + 2] == '1'
ai = ai + 3
local ok, st = true, {}
for i = 1, n do
  local a = ai + 6 * (i - 1)
  local rpm, tpm = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local o, r, t = window(KEYS[ki + i - 1], true)
  local gr, gt = 0, 0
  if rpm >= 0 then
    gr = math.min(tonumber(ARGV[a + 2]), math.floor(frac * (rpm - r)))
    if gr < tonumber(ARGV[a + 3]) then ok = false end
  end
  if tpm >= 0 then
    gt = math.min(tonumber(ARGV[a + 4]), math.floor(frac * (tpm - t)))
    if gt < tonumber(ARGV[a + 5]) then ok = false end
  end
  st[i] = {math.max(gr, 0), math.max(gt, 0), r, t, o and (o + SPAN) * B or -1}
end
local bi, bk, hk, ek = ai + 6 * n, KEYS[ki + n], KEYS[ki + n + 1], KEYS[ki + n + 2]
local bg, bs = '0', {'0', '0'}
if hb then
  b_expire_held(bk, hk, ek, now)
  if ok then
    local c = redis.call('HGET', bk, 'c') or '0'
    local g = math.min(tonumber(ARGV[bi + 1]), math.floor(frac * (tonumber(ARGV[bi]) - tonumber(c))))
    if g < tonumber(ARGV[bi + 2]) then ok = false else bg = string.format('%d', g) end
    -- Doubles only size the slice; whether it fits is decided on Redis' exact integers.
    if ok then
      redis.call('HINCRBY', bk, 'c', bg)
      if b_cmp(redis.call('HGET', bk, 'c'), ARGV[bi]) > 0 then
        redis.call('HINCRBY', bk, 'c', b_neg(bg)); ok = false
      end
    end
    if ok then
      redis.call('HINCRBY', bk, 'r', bg)
      redis.call('HSET', hk, ARGV[bi + 3], bg)
      redis.call('ZADD', ek, ARGV[bi + 4], ARGV[bi + 3])
      for _, k in ipairs({bk, hk, ek}) do redis.call('PEXPIRE', k, ARGV[bi + 5]) end
    else
      bg = '0'
    end
  end
  bs = b_state(bk)
end
local out = {ok and 1 or 0, now}
for i = 1, n do
  local s, wk = st[i], KEYS[ki + i - 1]
  if ok then
    if s[5] < 0 then s[5] = (cur + SPAN) * B; redis.call('HSET', wk, 'o', int(cur)) end
    redis.call('HINCRBY', wk, 'r', s[1])
    redis.call('HINCRBY', wk, 't', s[2])
    redis.call('HINCRBY', wk, 't' .. int(cur), s[2])
    if redis.call('HINCRBY', wk, 'r' .. int(cur), s[1]) == s[1] then
      redis.call('PEXPIRE', wk, (cur + SPAN) * B - now + 1000)
    end
    s[3], s[4] = s[3] + s[1], s[4] + s[2]
  else
    s[1], s[2] = 0, 0
  end
  for j = 1, 5 do out[#out + 1] = int(s[j]) end
end
out[#out + 1] = bg; out[#out + 1] = bs[1]; out[#out + 1] = bs[2]
return table.concat(out, ',')
"""
)

# ARGV[1] now, ARGV[2] op count, the ops. Returns 1.
# Without the limiter's prelude: on this Redis every function a script defines costs on every run.
APPLY = Script(
    f"local B = {BUCKET_MS}\n"
    + "local function int(x) return string.format('%d', x) end\n"
    + _budget.LUA
    + _OPS
    + "apply_ops(tonumber(ARGV[2]), 1, 3)\nreturn 1\n"
)
