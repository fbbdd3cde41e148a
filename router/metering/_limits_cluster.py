"""The shared limiter on Redis Cluster: scopes spread over the shards, admission slot by slot.

Every scope's keys carry its hash tag (``kubellm:lim:{key:team-a}:w``, the key's budget buckets
``kubellm:budget:{key:team-a}:…``), so one API key's limits and budget share a slot and a
deployment's limits sit in another, and the load spreads over the shards.

An admission whose scopes share one slot is one script, as on a single Redis. One that spans
slots (the key's limits and budget in one, the deployment's limits in another) runs the same
admission script per slot, in the order the scopes come (the caller's first), and stops at the
first refusal; the slots already reserved are then rolled back exactly (their request and token
counts, lease and budget hold are removed). Every slot counts on the clock of the first one.

Guarantee (docs/keys-and-metering.md, "Redis Cluster"): no limit and no budget ever admits past
what it would on one Redis: each slot's check-and-reserve is atomic, and a request is admitted
only when every slot reserved. The price is spurious refusals: while a request holds a slot it
will roll back (one round trip), a concurrent request may be refused there. A router dying
between a reservation and its rollback leaves the reservation until it expires (leases after
their TTL; its rpm/tpm count stays in the window, erring towards fewer admissions).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from ..redis_connect import slot, tagged
from ..redis_store import Script
from . import _budget
from ._budget import BudgetAsk
from ._limits import Admission, BudgetAsks, Headroom, LimitRule, Settlement, _build, asks_of, set_budgets
from ._limits_redis import _PRELUDE, RedisLimiter, _Queued

# Undoes one admission of _ACQUIRE on one slot. ARGV[1] the admission's now ms, ARGV[2] lease id,
# ARGV[3] estimate, ARGV[4] the number of budget reservations it held there, then their ids; rules
# follow. KEYS as _ACQUIRE's (2 per rule, 3 per budget).
_UNDO = Script(
    _PRELUDE
    + _budget.LUA
    + """
local lease, est, nb = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local n = (#KEYS - 3 * nb) / 2
for i = 1, n do
  local wk, lk = KEYS[2 * i - 1], KEYS[2 * i]
  local rpm, tpm, par = lim(i, 4 + nb)
  if (rpm >= 0 or tpm >= 0) and redis.call('HEXISTS', wk, 'r' .. int(cur)) == 1 then
    redis.call('HINCRBY', wk, 'r' .. int(cur), -1)
    redis.call('HINCRBY', wk, 'r', -1)
    redis.call('HINCRBY', wk, 't' .. int(cur), -est)
    redis.call('HINCRBY', wk, 't', -est)
  end
  if par >= 0 or tpm >= 0 then redis.call('ZREM', lk, lease) end
end
for j = 1, nb do
  local k = 2 * n + 3 * (j - 1)
  b_unhold(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[4 + j])
end
return 1
"""
)

#: One slot's part of an admission: its slot, its rules, the budgets that live there.
_Part = tuple[int, list[LimitRule], list[BudgetAsk]]


class ClusterLimiter(RedisLimiter):
    """:class:`RedisLimiter` for a Redis Cluster client (same interface, see the module docs)."""

    def _base(self, scope: str) -> str:
        return f"{self.prefix}lim:{tagged(scope)}"

    def _slot(self, r: LimitRule) -> int:
        return slot(self._base(r.scope))

    def _plan(self, rules: Sequence[LimitRule], asks: Sequence[BudgetAsk]) -> list[_Part]:
        parts: dict[int, _Part] = {}
        for r in rules:
            parts.setdefault(self._slot(r), (self._slot(r), [], []))[1].append(r)
        for ask in asks:
            if self.budgets is None:
                raise TypeError("this limiter holds no budget store to reserve in")
            s = slot(self.budgets.reserve_keys_args(ask)[0][0])
            parts.setdefault(s, (s, [], []))[2].append(ask)
        return list(parts.values())

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
        plan = self._plan(rules, asks)
        if len(plan) <= 1:  # one slot: one script, as on a single Redis
            return await super().acquire(rules, estimated_tokens, lease_id, now, asks)
        done: list[tuple[_Part, Admission]] = []
        try:
            for part in plan:
                _, sub, here = part
                adm = await super().acquire(sub, estimated_tokens, lease_id, now, here)
                if now is None:
                    now = adm.now_ms / 1000  # the other slots count on the first one's clock
                if not adm.allowed:
                    undo, done = done, []  # undone once, even if this raises
                    await self._undo(undo, estimated_tokens, lease_id)
                    return adm
                done.append((part, adm))
        except BaseException:
            # A failed or cancelled admission holds nothing: roll back what it reserved.
            rollback = asyncio.ensure_future(self._undo(done, estimated_tokens, lease_id))
            with contextlib.suppress(Exception):
                await asyncio.shield(rollback)
            raise
        first = done[0][1]
        counts = {r.scope: c for _, adm in done for r, c in adm.counts}
        merged = _build(
            rules, [counts[r.scope] for r in rules], True, lease_id, first.now_ms, estimated_tokens
        )
        decisions = {scope: d for _, adm in done for scope, d in adm.budgets.items()}
        set_budgets(merged, asks, [decisions[a.scope] for a in asks])
        return merged

    async def _undo(self, done: list[tuple[_Part, Admission]], est: int, lease_id: str) -> None:
        async def one(part: _Part, adm: Admission) -> None:
            _, sub, here = part
            keys, args = self._keys_args(sub)
            if self.budgets is not None:
                for ask in here:
                    keys += self.budgets.reserve_keys_args(ask)[0]
            rids = [ask.reservation_id for ask in here]
            await _UNDO(self.client, keys, [adm.now_ms, lease_id, est, len(rids), *rids, *args])

        await asyncio.gather(*(one(p, a) for p, a in done))

    async def _send(self, batch: list[_Queued]) -> None:
        # A batch script runs on one slot: split the batch by slot, the slots in parallel.
        by_slot: dict[int, list[_Queued]] = {}
        for q in batch:
            by_slot.setdefault(slot(q[0][0]), []).append(q)
        if len(by_slot) == 1:
            await super()._send(batch)
        else:
            await asyncio.gather(*(super(ClusterLimiter, self)._send(b) for b in by_slot.values()))

    def _split(self, it: Settlement) -> dict[int, Settlement]:
        by_slot: dict[int, list[LimitRule]] = {}
        for r in it.rules:
            if r.active:
                by_slot.setdefault(self._slot(r), []).append(r)
        out = {
            s: Settlement(rs, it.lease_id, it.estimated_tokens, it.actual_tokens, it.window_start)
            for s, rs in by_slot.items()
        }
        if it.charge is not None and self.budgets is not None:
            s = slot(self.budgets.settle_keys_args(it.charge)[0][0])
            rs = by_slot.get(s, [])
            out[s] = Settlement(
                rs, it.lease_id, it.estimated_tokens, it.actual_tokens, it.window_start, it.charge
            )
        return out

    async def settle_many(self, items: Sequence[Settlement]) -> None:
        by_slot: dict[int, list[Settlement]] = {}
        for it in items:
            for s, piece in self._split(it).items():
                by_slot.setdefault(s, []).append(piece)
        await asyncio.gather(*(RedisLimiter.settle_many(self, pieces) for pieces in by_slot.values()))

    async def settle(
        self,
        rules: Sequence[LimitRule],
        lease_id: str,
        estimated_tokens: int,
        actual_tokens: int,
        window_start: float,
    ) -> None:
        await asyncio.gather(
            *(
                RedisLimiter.settle(self, rs, lease_id, estimated_tokens, actual_tokens, window_start)
                for rs in self._by_slot(rules).values()
            )
        )

    async def renew(self, rules: Sequence[LimitRule], lease_id: str, now: float | None = None) -> bool:
        held = await asyncio.gather(
            *(RedisLimiter.renew(self, rs, lease_id, now) for rs in self._by_slot(rules).values())
        )
        return all(held)

    async def headroom(self, rules: Sequence[LimitRule], now: float | None = None) -> dict[str, Headroom]:
        parts = await asyncio.gather(
            *(RedisLimiter.headroom(self, rs, now) for rs in self._by_slot(rules).values())
        )
        return {scope: h for part in parts for scope, h in part.items()}

    def _by_slot(self, rules: Sequence[LimitRule]) -> dict[int, list[LimitRule]]:
        out: dict[int, list[LimitRule]] = {}
        for r in rules:
            if r.active:
                out.setdefault(self._slot(r), []).append(r)
        return out
