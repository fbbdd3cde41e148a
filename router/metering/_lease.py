"""Quota leasing: admit from slices of the limits leased from Redis, not one script per request.

:class:`LeasingLimiter` sits in front of a :class:`~kubellm.router.metering._limits_redis.RedisLimiter`
and has its interface. For a request whose rules are all rpm/tpm (no ``max_parallel``), it leases,
per scope, a *slice* of the window's remaining capacity (``n`` requests, ``t`` tokens) and, for a
budget, a slice of the period's remaining dollars, all in one script (``_lease_lua.LEASE``), and
then admits locally from the slices until one runs short or expires. Everything else, and any
request the slices cannot cover, goes to the exact per-request path of the inner limiter.

What keeps the limits' guarantees (docs/keys-and-metering.md, "Quota leasing"):

* A slice is counted in the window when granted, in the current 1 s bucket, like that many
  admissions, and it *ends with that bucket* (Redis' clock; the replica's deadline is computed from
  when it sent the script, so it errs early). So every request admitted from a slice is counted in
  its own bucket, as the per-request path would count it: no 60 s interval holds more than rpm
  admissions or tpm tokens, exactly as before. Unused slice is returned (subtracted from its
  bucket) when it ends; token corrections of settled requests go to the same bucket.
* A budget slice is a reservation of the period's remaining dollars (``committed + slice <=
  limit``, checked exactly); a request is admitted from it only if its worst case fits in what is
  left. Settlement charges the real cost once per request id and shrinks the hold so that
  ``spent + reserved`` never counts a request twice. The ledger is not touched: it stays exact.
* Slices are at most ``max_fraction`` of a limit's remaining capacity and aim to last
  ``target_ms`` at the replica's recent rate; a slice smaller than ``min_slice`` requests' worth is
  not granted and that request is admitted exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config._schema import LeaseSettings
from ..redis_store import Arg
from ._budget import BudgetAsk, BudgetDecision, period_window
from ._lease_lua import APPLY, LEASE
from ._limits import (
    BUCKET_MS,
    Admission,
    BudgetAsks,
    Headroom,
    LimitRule,
    Settlement,
    _build,
    _Count,
    asks_of,
)
from ._limits_redis import RedisLimiter
from ._pricing import from_pico, to_pico

log = logging.getLogger("kubellm.router")

#: Admissions remembered for settlement at most (a request never settled is forgotten first).
MAX_TRACKED = 200_000
#: How long charges of leased admissions wait to share a script (see ``_flush_later``).
CHARGE_LINGER_SECONDS = 0.05
CHARGES_PER_OP = 1000
#: Weight of the newest rate sample in a scope's moving average.
RATE_WEIGHT = 0.5


@dataclass(slots=True)
class _Slice:
    """One scope's leased rpm/tpm capacity, counted in one bucket of its window."""

    rule: LimitRule
    window_key: str
    bucket_ms: int
    deadline: float  # monotonic
    requests: int  # left
    tokens: int  # left (negative once settled usage exceeded the estimates)
    granted_requests: int
    granted_tokens: int
    window_requests: int  # the window's counts right after the grant, the slice included
    window_tokens: int
    oldest_drop_ms: int
    server_ms: int
    mono: float  # when the grant was answered
    live: bool = True


@dataclass(slots=True)
class _BudgetSlice:
    """A reservation of a budget period's remaining dollars (pico-USD), admitted from locally."""

    scope: str
    keys: list[str]  # bk, hk, ek
    hold_id: str
    limit: int
    end: float
    period_key: str
    deadline: float
    left: int
    granted: int
    spent: int
    reserved: int
    mono: float
    live: bool = True


@dataclass(slots=True)
class _Rate:
    """A scope's recent local demand: requests, tokens and pico-USD per second."""

    requests: float = 0.0
    tokens: float = 0.0
    money: float = 0.0

    def add(self, used: tuple[int, int, int], seconds: float) -> None:
        s = max(seconds, 0.01)
        self.requests += RATE_WEIGHT * (used[0] / s - self.requests)
        self.tokens += RATE_WEIGHT * (used[1] / s - self.tokens)
        self.money += RATE_WEIGHT * (used[2] / s - self.money)


@dataclass(slots=True)
class _Use:
    """One admission from slices, until it settles."""

    slices: list[_Slice]
    estimate: int
    budget: _BudgetSlice | None = None
    cost: int = 0  # the budget's worst case it took from the slice (pico)


@dataclass(slots=True)
class _Ops:
    """Ops for ``_lease_lua``'s ``apply_ops``: their keys and arguments, in order."""

    keys: list[str] = field(default_factory=list)
    args: list[Arg] = field(default_factory=list)
    count: int = 0

    def window(self, s: _Slice, requests: int, tokens: int) -> None:
        if requests or tokens:
            self.keys.append(s.window_key)
            self.args += ["w", s.bucket_ms, requests, tokens]
            self.count += 1

    def hold(self, b: _BudgetSlice, shrink: int, expiry_ms: int | None) -> None:
        self.keys += b.keys
        self.args += ["h", b.hold_id, str(max(0, shrink)), "" if expiry_ms is None else expiry_ms]
        self.count += 1


class LeasingLimiter:
    """:class:`RedisLimiter`'s interface, admitting from leased slices where it can."""

    def __init__(self, inner: RedisLimiter, settings: LeaseSettings) -> None:
        self.inner = inner
        self.settings = settings
        self.client = inner.client
        self.replica = secrets.token_hex(6)
        self._serial = 0
        self._slices: dict[str, _Slice] = {}
        self._budgets: dict[tuple[str, str], _BudgetSlice] = {}
        self._rates: dict[str, _Rate] = {}
        #: Scope sets whose last lease was refused: admitted exactly until then (monotonic).
        self._blocked: dict[tuple[str, ...], float] = {}
        self._leasing: dict[tuple[str, ...], asyncio.Future[None]] = {}
        self._uses: OrderedDict[str, _Use] = OrderedDict()  # by lease id
        self._charges: OrderedDict[str, _Use] = OrderedDict()  # by budget reservation id
        #: Ended slices whose unused part is still to be given back.
        self._ended: list[_Slice | _BudgetSlice] = []
        self._returner: asyncio.Task[None] | None = None
        #: Budget charges of leased admissions by slice hold (keys, arguments), and late token
        #: corrections, waiting for the next flush.
        self._queued_charges: dict[str, tuple[list[str], list[Arg]]] = {}
        self._late: dict[tuple[str, int], int] = {}
        self._flusher: asyncio.Task[None] | None = None
        #: Server ms minus local wall ms, from the last lease answer.
        self._offset_ms = 0.0
        self.leases = 0  # lease scripts sent (for the bench and tests)

    @property
    def budgets(self) -> object | None:
        return self.inner.budgets

    # -- admission ---------------------------------------------------------------------------

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
        # Slices cover rpm/tpm limits and one budget: a request with a parallel limit, or with two
        # budgets (a key's and its team's), is admitted exactly, one script, as without leasing.
        exact = now is not None or not (rules or asks) or len(asks) > 1
        if exact or any(r.max_parallel is not None for r in rules):
            return await self.inner.acquire(rules, estimated_tokens, lease_id, now, asks)
        budget = asks[0] if asks else None
        cost = to_pico(budget.estimate) if budget is not None else 0
        pkey = period_window(budget.period, budget.now)[2] if budget is not None else ""
        group = (*(r.scope for r in rules), *((f"budget:{budget.scope}:{pkey}",) if budget else ()))
        for _ in range(2):
            adm = self._local(rules, estimated_tokens, lease_id, budget, cost, pkey)
            if adm is not None:
                return adm
            if self._blocked.get(group, 0.0) > time.monotonic():
                break
            pending = self._leasing.get(group)
            if pending is None:
                # A task of its own: a caller that goes away must not lose a grant on the way back.
                pending = asyncio.get_running_loop().create_task(
                    self._lease(group, rules, estimated_tokens, budget, cost, pkey)
                )
                self._leasing[group] = pending
                pending.add_done_callback(functools.partial(self._lease_done, group))
            await asyncio.shield(pending)
        return await self.inner.acquire(rules, estimated_tokens, lease_id, now, budget)

    def _lease_done(self, group: tuple[str, ...], task: asyncio.Task[None]) -> None:
        if self._leasing.get(group) is task:
            del self._leasing[group]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter has seen it already

    def _local(
        self,
        rules: Sequence[LimitRule],
        est: int,
        lease_id: str,
        budget: BudgetAsk | None,
        cost: int,
        pkey: str,
    ) -> Admission | None:
        """Admit from the live slices if they cover every rule and the budget, else None."""
        mono = time.monotonic()
        slices: list[_Slice] = []
        for r in rules:
            s = self._slices.get(r.scope)
            if s is None or not s.live or s.deadline <= mono or s.rule != r:
                return None
            if (r.rpm is not None and s.requests < 1) or (r.tpm is not None and s.tokens < est):
                return None
            slices.append(s)
        b: _BudgetSlice | None = None
        if budget is not None:
            b = self._budgets.get((budget.scope, pkey))
            if b is None or not b.live or b.deadline <= mono or b.left < cost:
                return None
            if b.limit != to_pico(budget.limit):  # the config changed the budget: lease anew
                return None
        for s in slices:
            s.requests -= 1 if s.rule.rpm is not None else 0
            s.tokens -= est if s.rule.tpm is not None else 0
        use = _Use(slices, est)
        _remember(self._uses, lease_id, use)
        # The window as of the grant, less what this replica has not used yet.
        counts = [
            _Count(s.window_requests - max(0, s.requests), s.window_tokens - max(0, s.tokens), 0, -1)
            for s in slices
        ]
        for c, s in zip(counts, slices, strict=True):
            c.oldest_drop_ms = s.oldest_drop_ms
        first = slices[0] if slices else None
        now_ms = round(time.time() * 1000 + self._offset_ms)
        adm = _build(rules, counts, True, lease_id, now_ms, est)
        if first is not None:
            adm.window_start = first.bucket_ms / 1000
        if budget is not None and b is not None:
            b.left -= cost
            use.budget, use.cost = b, cost
            _remember(self._charges, budget.reservation_id, use)
            adm.budget = BudgetDecision(
                True,
                from_pico(b.spent),
                from_pico(b.reserved),
                from_pico(max(0, b.limit - b.spent - b.reserved + max(0, b.left))),
                b.end,
                b.period_key,
            )
            adm.budgets = {budget.scope: adm.budget}
        return adm

    def _want(self, scope: str, horizon: float, per_request: int, kind: int) -> int:
        rate = self._rates.get(scope)
        if rate is None:
            return 4 * per_request * self.settings.min_slice
        per_second = (rate.requests, rate.tokens, rate.money)[kind]
        return max(self.settings.min_slice * per_request, math.ceil(per_second * horizon * 1.5))

    async def _lease(
        self,
        group: tuple[str, ...],
        rules: Sequence[LimitRule],
        est: int,
        budget: BudgetAsk | None,
        cost: int,
        pkey: str,
    ) -> None:
        """One script: give back what ended, then lease a slice for every rule and the budget."""
        st = self.settings
        held = self._budgets.get((budget.scope, pkey)) if budget is not None else None
        if held is not None and held.live and held.left >= cost and held.deadline > time.monotonic() + 0.05:
            budget = None  # the budget's slice still covers this request: lease only the rules
        ops = self._end_slices([r.scope for r in rules], (budget.scope, pkey) if budget else None)
        wall_ms = time.time() * 1000 + self._offset_ms
        bucket_left = (BUCKET_MS - wall_ms % BUCKET_MS) / 1000
        horizon = min(st.target_ms / 1000, bucket_left, st.ttl_seconds)
        keys, args = list(ops.keys), ["", ops.count, *ops.args]
        rkeys, _ = self.inner._keys_args(rules)
        keys += rkeys[0::2]  # the window hashes (the parallel-lease sets are not used)
        args += [len(rules), st.max_fraction, 1 if budget else 0]
        for r in rules:
            need_t = st.min_slice * est if r.tpm is not None else 0
            args += [_neg(r.rpm), _neg(r.tpm), self._want(r.scope, horizon, 1, 0), st.min_slice]
            args += [max(need_t, self._want(r.scope, horizon, est, 1) if r.tpm is not None else 0), need_t]
        hold_id, limit, end = "", 0, 0.0
        bkeys: list[str] = []
        if budget is not None and self.inner.budgets is not None:
            bkeys, bargs, limit, end, _ = self.inner.budgets.reserve_keys_args(budget)
            keys += bkeys
            self._serial += 1
            hold_id = f"lease:{self.replica}:{self._serial}"
            need = st.min_slice * cost
            want = max(need, self._want(f"budget:{budget.scope}", st.ttl_seconds, cost, 2))
            expiry = round(time.time() * 1000 + st.ttl_seconds * 1000)
            args += [str(limit), str(want), str(need), hold_id, expiry, bargs[5]]
        sent = time.monotonic()
        self.leases += 1
        reply = (await LEASE(self.client, keys, args)).split(b",")
        got = time.monotonic()
        granted, server_ms = reply[0] == b"1", int(reply[1])
        self._offset_ms = server_ms - time.time() * 1000
        if not granted:
            # Until the next bucket at least: the window will not have changed before it.
            self._blocked[group] = sent + (BUCKET_MS - server_ms % BUCKET_MS) / 1000 + 0.001
            return
        self._blocked.pop(group, None)
        bucket_ms = server_ms - server_ms % BUCKET_MS
        deadline = sent + min(st.ttl_seconds, (bucket_ms + BUCKET_MS - server_ms) / 1000)
        for i, r in enumerate(rules):
            gr, gt, wr, wt, drop = (int(v) for v in reply[2 + 5 * i : 7 + 5 * i])
            s = _Slice(r, rkeys[2 * i], bucket_ms, deadline, gr, gt, gr, gt, wr, wt, drop, server_ms, got)
            self._replace(r.scope, s)
        if budget is not None and hold_id:
            tail = reply[2 + 5 * len(rules) :]
            g = int(tail[0])
            b = _BudgetSlice(
                budget.scope,
                bkeys,
                hold_id,
                limit,
                end,
                pkey,
                sent + st.ttl_seconds,
                g,
                g,
                int(tail[1]),
                int(tail[2]),
                got,
            )
            old = self._budgets.get((budget.scope, pkey))
            if old is not None and old.live:  # another group's lease replaced it meanwhile
                old.live = False
                self._ended.append(old)
            self._budgets[(budget.scope, pkey)] = b
        self._start_returner()

    def _replace(self, scope: str, s: _Slice) -> None:
        old = self._slices.get(scope)
        if old is not None and old.live:  # another group's lease replaced it meanwhile
            old.live = False
            self._ended.append(old)
        self._slices[scope] = s

    def _end_slices(self, scopes: Sequence[str], budget: tuple[str, str] | None) -> _Ops:
        """End the current slices of these scopes (they are being replaced) and the expired ones."""
        for scope in scopes:
            s = self._slices.pop(scope, None)
            if s is not None and s.live:
                s.live = False
                self._ended.append(s)
        if budget is not None:
            b = self._budgets.pop(budget, None)
            if b is not None and b.live:
                b.live = False
                self._ended.append(b)
        self._collect_expired(time.monotonic())
        return self._return_ops()

    def _collect_expired(self, mono: float) -> None:
        for scope, s in list(self._slices.items()):
            if s.deadline <= mono:
                del self._slices[scope]
                s.live = False
                self._ended.append(s)
        for key, b in list(self._budgets.items()):
            if b.deadline <= mono:
                del self._budgets[key]
                b.live = False
                self._ended.append(b)

    def _return_ops(self) -> _Ops:
        """Give back what the ended slices did not use; note their rates."""
        ops, ended, self._ended = _Ops(), self._ended, []
        mono = time.monotonic()
        for e in ended:
            if isinstance(e, _Slice):
                rate = self._rates.setdefault(e.rule.scope, _Rate())
                used = (e.granted_requests - e.requests, e.granted_tokens - e.tokens, 0)
                rate.add(used, mono - e.mono)
                ops.window(e, -e.requests, -e.tokens)
            else:
                rate = self._rates.setdefault(f"budget:{e.scope}", _Rate())
                rate.add((0, 0, e.granted - e.left), mono - e.mono)
                # The worst cases of its requests still in flight stay held, as long as any
                # per-request reservation would; their settlements shrink the hold.
                expiry = round(time.time() * 1000 + self._reservation_ttl() * 1000)
                ops.hold(e, e.left, expiry)
        return ops

    def _reservation_ttl(self) -> float:
        b = self.inner.budgets
        return b.reservation_ttl if b is not None else 900.0

    def _start_returner(self) -> None:
        if self._returner is None or self._returner.done():
            self._returner = asyncio.get_running_loop().create_task(self._return_loop())

    async def _return_loop(self) -> None:
        """Give back expired slices that no new lease replaced, soon after they end."""
        while self._slices or self._budgets or self._ended:
            mono = time.monotonic()
            deadlines = [s.deadline for s in self._slices.values()]
            deadlines += [b.deadline for b in self._budgets.values()]
            wait = min(deadlines, default=mono) - mono
            await asyncio.sleep(max(0.005, wait + 0.002))
            self._collect_expired(time.monotonic())
            await self._send_returns()

    async def _send_returns(self) -> None:
        ops = self._return_ops()
        if ops.count:
            try:
                await APPLY(self.client, ops.keys, ["", ops.count, *ops.args])
            except Exception as exc:  # what was not given back stays counted: fewer admissions
                log.warning("could not return leased capacity: %s", type(exc).__name__)

    async def close(self) -> None:
        """Give back every slice (at shutdown)."""
        if self._returner is not None:
            self._returner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._returner
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
        self._collect_expired(math.inf)
        await self._flush()
        await self._send_returns()

    # -- settling ------------------------------------------------------------------------------

    async def settle_many(self, items: Sequence[Settlement]) -> None:
        rest: list[Settlement] = []
        charges = self._queued_charges
        for it in items:
            use = self._uses.pop(it.lease_id, None) if it.rules else None
            charge_use = self._charges.pop(it.charge.reservation_id, None) if it.charge is not None else None
            if use is None and charge_use is None:
                rest.append(it)
                continue
            if use is not None:
                delta = it.actual_tokens - it.estimated_tokens
                for s in use.slices:
                    if s.rule.tpm is None or not delta:
                        continue
                    if s.live:
                        s.tokens -= delta
                    else:  # summed per bucket until the next flush
                        at = (s.window_key, s.bucket_ms)
                        self._late[at] = self._late.get(at, 0) + delta
            elif it.rules:
                est, actual = it.estimated_tokens, it.actual_tokens
                rest.append(Settlement(it.rules, it.lease_id, est, actual, it.window_start))
            if it.charge is not None:
                if charge_use is None or charge_use.budget is None:
                    rest.append(Settlement((), it.lease_id, 0, 0, 0.0, it.charge))
                    continue
                b, actual = charge_use.budget, to_pico(it.charge.actual)
                if b.live:
                    b.left += charge_use.cost - actual
                    shrink = actual  # the hold keeps the rest of the slice
                else:
                    shrink = charge_use.cost  # the hold kept this worst case for it
                entry = charges.get(b.hold_id)
                if entry is None and self.inner.budgets is not None:
                    ckeys, cargs = self.inner.budgets.settle_keys_args(it.charge)
                    entry = charges[b.hold_id] = (ckeys, [cargs[0], cargs[3], cargs[4], b.hold_id])
                if entry is not None:
                    entry[1].extend([it.charge.reservation_id, str(actual), str(shrink)])
        if self._queued_charges or self._late:
            self._start_flusher()
        if rest:
            await self.inner.settle_many(rest)

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        # Charges of leased admissions wait longer than the meter's batches: a slice's hold covers
        # their worst case meanwhile, so the budget's bound does not depend on when they land, and
        # Redis pays a script's fixed cost once per many requests.
        while self._queued_charges or self._late:
            await asyncio.sleep(CHARGE_LINGER_SECONDS)
            await self._flush()

    async def _flush(self) -> None:
        """Send the queued charges and late token corrections in one script; kept for the next try
        when Redis fails (they apply once per request id whenever they land)."""
        charges, self._queued_charges = self._queued_charges, {}
        late, self._late = self._late, {}
        ops = _Ops()
        for (window_key, bucket_ms), delta in late.items():
            if delta:
                ops.keys.append(window_key)
                ops.args += ["w", bucket_ms, 0, delta]
                ops.count += 1
        for ckeys, cargs in charges.values():
            for at in range(4, len(cargs), 3 * CHARGES_PER_OP):  # Lua's unpack takes ~8000 at most
                each = cargs[at : at + 3 * CHARGES_PER_OP]
                total = sum(int(v) for v in each[1::3])
                shrunk = sum(int(v) for v in each[2::3])
                ops.keys += ckeys
                ops.args += ["c", *cargs[:4], len(each) // 3, str(total), str(shrunk), *each]
                ops.count += 1
        if not ops.count:
            return
        try:
            await APPLY(self.client, ops.keys, ["", ops.count, *ops.args])
        except Exception as exc:
            log.warning("could not settle leased admissions, retrying: %s", type(exc).__name__)
            for hold, (ckeys, cargs) in charges.items():
                queued = self._queued_charges.setdefault(hold, (ckeys, cargs[:4]))
                queued[1].extend(cargs[4:])
            for where, delta in late.items():
                self._late[where] = self._late.get(where, 0) + delta
            if sum(len(c[1]) for c in self._queued_charges.values()) > 3 * MAX_TRACKED:
                self._queued_charges.clear()  # the ledger has every record; budgets err low here
                log.error("dropped leased budget charges after repeated Redis failures")

    async def settle(
        self,
        rules: Sequence[LimitRule],
        lease_id: str,
        estimated_tokens: int,
        actual_tokens: int,
        window_start: float,
    ) -> None:
        await self.settle_many([Settlement(rules, lease_id, estimated_tokens, actual_tokens, window_start)])

    async def renew(self, rules: Sequence[LimitRule], lease_id: str, now: float | None = None) -> bool:
        if lease_id in self._uses:
            return True  # leased admissions hold no parallel slot
        return await self.inner.renew(rules, lease_id, now)

    async def release(self, rules: Sequence[LimitRule], lease_id: str) -> None:
        if self._uses.pop(lease_id, None) is None:
            await self.inner.release(rules, lease_id)

    async def headroom(self, rules: Sequence[LimitRule], now: float | None = None) -> dict[str, Headroom]:
        return await self.inner.headroom(rules, now)


def _remember(table: OrderedDict[str, _Use], key: str, use: _Use) -> None:
    table[key] = use
    if len(table) > MAX_TRACKED:
        table.popitem(last=False)


def _neg(v: int | None) -> int:
    return -1 if v is None else v


__all__ = ["LeasingLimiter"]
