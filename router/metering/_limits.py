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

Round trips: ``acquire`` (every limit of a request and its budget reservation),
``settle_many`` (a whole batch of settlements and budget charges), ``settle``,
``renew``, ``release`` and ``headroom`` are each one EVALSHA (two only right
after a Redis restart, see ``_redis``). The Redis twin is in ``_limits_redis``;
it coalesces the acquires that are ready at the same time into one script,
run one after the other exactly as if sent one by one (a busy router sends
about one acquire script per round trip, an idle one each acquire at once).
"""

from __future__ import annotations

import time
from bisect import insort
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ._budget import BudgetAsk, BudgetCharge, BudgetDecision, MemoryBudgetStore

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
    #: Start of the rpm/tpm bucket the request was counted in; pass it to settle.
    window_start: float = 0.0
    #: Every scope whose limits denied (``denied_by`` names the one that frees last).
    denied_scopes: tuple[str, ...] = ()
    #: The budget reservation made (or refused) in the same atomic step, when one was asked for
    #: (the first one asked for, when several were).
    budget: BudgetDecision | None = None
    #: Every budget's decision, by scope (a key's and its team's).
    budgets: dict[str, BudgetDecision] = field(default_factory=dict, compare=False, repr=False)
    #: The rules and counts the headers were built from (see :meth:`headers_of`).
    counts: Sequence[tuple[LimitRule, _Count]] = field(default=(), compare=False, repr=False)
    now_ms: int = field(default=0, compare=False, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of the tightest of all the rules.

        Built on demand: most admissions only ever need one scope's (:meth:`headers_of`)."""
        return _rate_headers(self.counts, self.now_ms)

    def headers_of(self, *scopes: str) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of these scopes' limits (the tightest of them)."""
        return _rate_headers([(r, c) for r, c in self.counts if r.scope in scopes], self.now_ms)


#: One budget reservation, several (a key's and its team's, all or none made), or none.
BudgetAsks = BudgetAsk | Sequence[BudgetAsk] | None


def asks_of(budget: BudgetAsks) -> list[BudgetAsk]:
    """The reservations ``budget`` asks for, as a list (scopes distinct, like the rules')."""
    if budget is None:
        return []
    return [budget] if isinstance(budget, BudgetAsk) else list(budget)


def set_budgets(adm: Admission, asks: Sequence[BudgetAsk], decisions: Sequence[BudgetDecision]) -> None:
    """Record the budgets' decisions on an admission (``budget`` is the first one's)."""
    adm.budgets = {a.scope: d for a, d in zip(asks, decisions, strict=True)}
    adm.budget = decisions[0] if decisions else None


@dataclass(frozen=True, slots=True)
class Settlement:
    """One lease to settle in a batch, and the budget charge to apply with it."""

    rules: Sequence[LimitRule]
    lease_id: str
    estimated_tokens: int
    actual_tokens: int
    window_start: float
    charge: BudgetCharge | None = None


@dataclass(frozen=True, slots=True)
class Headroom:
    rpm_left: int | None
    tpm_left: int | None
    parallel_left: int | None
    reset_in: float


class Limiter(Protocol):
    @property
    def budgets(self) -> object | None:
        """The budget store whose reservations and charges this limiter makes in its own steps."""
        ...

    async def acquire(
        self,
        rules: Sequence[LimitRule],
        estimated_tokens: int,
        lease_id: str,
        now: float | None = None,
        budget: BudgetAsks = None,
    ) -> Admission: ...

    async def settle_many(self, items: Sequence[Settlement]) -> None: ...

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
        denials = _denials(rules, counts, est)
        adm.denied_scopes = tuple(dict.fromkeys(rules[i].scope for i, _ in denials))
        for i, kind in denials:
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
    adm.counts, adm.now_ms = list(zip(rules, counts, strict=True)), now_ms
    return adm


def _rate_headers(pairs: Sequence[tuple[LimitRule, _Count]], now_ms: int) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the tightest of these rules."""
    out: dict[str, str] = {}
    req = [(r.rpm - c.requests, r.rpm, _reset_ms(c, now_ms)) for r, c in pairs if r.rpm]
    tok = [(r.tpm - c.tokens, r.tpm, _reset_ms(c, now_ms)) for r, c in pairs if r.tpm]
    for suffix, options in (("requests", req), ("tokens", tok)):
        if options:
            left, limit, reset = min(options)
            out[f"x-ratelimit-limit-{suffix}"] = str(limit)
            out[f"x-ratelimit-remaining-{suffix}"] = str(max(0, left))
            out[f"x-ratelimit-reset-{suffix}"] = format_reset(reset / 1000)
    return out


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
    """A scope's sliding window: per-bucket [requests, tokens] and their sums.

    ``order`` holds the buckets oldest first (time only moves forward, so a new bucket goes at the
    end): dropping the buckets that left the window and finding the oldest cost O(1) per request
    instead of a walk over all 61."""

    requests: int = 0
    tokens: int = 0
    buckets: dict[int, list[int]] = field(default_factory=dict)
    order: deque[int] = field(default_factory=deque)

    def add(self, bucket: int, requests: int, tokens: int) -> None:
        counts = self.buckets.get(bucket)
        if counts is None:
            counts = self.buckets[bucket] = [0, 0]
            if self.order and bucket < self.order[-1]:
                insort(self.order, bucket)  # a clock that stepped back (or a test pinning time)
            else:
                self.order.append(bucket)
        counts[0] += requests
        counts[1] += tokens
        self.requests += requests
        self.tokens += tokens

    def view(self, low: int) -> tuple[int, int, int | None]:
        """(requests, tokens, oldest bucket with data) counting only buckets >= ``low``."""
        r, t = self.requests, self.tokens
        for b in self.order:
            if b >= low:
                return r, t, b
            br, bt = self.buckets[b]
            r, t = r - br, t - bt
        return r, t, None

    def advance(self, low: int) -> None:
        order = self.order
        while order and order[0] < low:
            br, bt = self.buckets.pop(order.popleft())
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

    def __init__(
        self, lease_ttl: float = DEFAULT_LEASE_TTL, budgets: MemoryBudgetStore | None = None
    ) -> None:
        self.lease_ttl_ms = round(lease_ttl * 1000)
        self.budgets = budgets
        self._windows: dict[str, _Window] = {}
        self._leases: dict[str, dict[str, int]] = {}
        self._next_purge: dict[str, int] = {}

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
                # Without max_parallel a lease only makes settle idempotent, so expired ones may
                # linger up to a bucket: the walk over every live lease runs once per bucket, not
                # once per request.
                if r.max_parallel is not None or now_ms >= self._next_purge.get(r.scope, 0):
                    for lid in [lid for lid, exp in leases.items() if exp <= now_ms]:
                        del leases[lid]
                    self._next_purge[r.scope] = now_ms + BUCKET_MS
                if r.max_parallel is not None:
                    parallel = len(leases) - (lease_id in leases)
                    first = min(leases.values(), default=-1)
            else:
                parallel = sum(1 for exp in leases.values() if exp > now_ms)
        drop = -1 if oldest is None else (oldest + SPAN) * BUCKET_MS
        return _Count(requests, tokens, parallel, first, drop)

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
        now_ms = _ms(now)
        cur, low = _span(now_ms)
        if asks and self.budgets is None:
            raise TypeError("this limiter holds no budget store to reserve in")
        counts = [self._count(r, lease_id, now_ms, True) for r in rules]
        denials = _denials(rules, counts, estimated_tokens)
        for i, kind in denials:
            w, c = self._windows.get(rules[i].scope), counts[i]
            if w is not None and kind == "rpm":
                c.wait_requests_ms = w.wait(low, cur, 0, c.requests + 1 - (rules[i].rpm or 0))
            elif w is not None and kind == "tpm":
                need = min(c.tokens, c.tokens + estimated_tokens - (rules[i].tpm or 0))
                c.wait_tokens_ms = w.wait(low, cur, 1, need)
        decisions: list[BudgetDecision] = []
        if asks and self.budgets is not None:
            # Budgets are judged last, so they reserve only when every limit and every budget admits.
            decisions = [self.budgets.reserve_now(a, commit=False) for a in asks]
            if not denials and all(d.allowed for d in decisions):
                decisions = [self.budgets.reserve_now(a, commit=True) for a in asks]
        allowed = not denials and all(d.allowed for d in decisions)
        if allowed:
            for r, c in zip(rules, counts, strict=True):
                if r.rpm is not None or r.tpm is not None:
                    w = self._windows.get(r.scope)
                    if w is None:
                        w = self._windows[r.scope] = _Window()
                    w.add(cur, 1, estimated_tokens)
                    c.requests += 1
                    c.tokens += estimated_tokens
                    if c.oldest_drop_ms < 0:
                        c.oldest_drop_ms = (cur + SPAN) * BUCKET_MS
                if r.max_parallel is not None or r.tpm is not None:
                    leases = self._leases.setdefault(r.scope, {})
                    if r.max_parallel is not None and lease_id not in leases:
                        c.parallel += 1
                    leases[lease_id] = now_ms + self.lease_ttl_ms
        adm = _build(rules, counts, allowed, lease_id, now_ms, estimated_tokens)
        set_budgets(adm, asks, decisions)
        return adm

    async def settle_many(self, items: Sequence[Settlement]) -> None:
        self.settle_now(items)

    def settle_now(self, items: Sequence[Settlement]) -> None:
        """:meth:`settle_many`, synchronously (it does no I/O)."""
        for it in items:
            self._settle(it.rules, it.lease_id, it.estimated_tokens, it.actual_tokens, it.window_start)
            if it.charge is not None:
                if self.budgets is None:
                    raise TypeError("this limiter holds no budget store to charge")
                self.budgets.settle_now(it.charge)

    async def settle(
        self,
        rules: Sequence[LimitRule],
        lease_id: str,
        estimated_tokens: int,
        actual_tokens: int,
        window_start: float,
    ) -> None:
        self._settle(rules, lease_id, estimated_tokens, actual_tokens, window_start)

    def _settle(
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
