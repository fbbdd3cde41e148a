"""Admission and metering: key and deployment limits, budgets, and the usage ledger.

Per request, in order:

1. :meth:`Meter.admit_caller` prices the budget reservation (the worst case, see
   :func:`worst_case`) and returns the request's :class:`Ticket`; nothing is sent yet;
2. :meth:`Meter.admit_deployment`, with the first attempt, admits the key's
   limits, reserves its budget and admits the deployment's limits in one atomic
   step (one Lua script in Redis); later attempts admit only their deployment,
   and a saturated deployment is skipped;
3. :meth:`Meter.finish` records exactly one usage record and queues the
   settlement of every lease and reservation: batches of them go to the store in
   one script each, off the request path.

A call the cache may answer is admitted in step 1 instead (it may reach no
deployment). When the store is unreachable, admission fails open or closed as
configured, and the ledger journals records locally until it returns.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import KubellmError, RateLimitError, ServiceUnavailableError
from ..config._schema import Budget, RouterSettings
from ..observability import _metrics as metrics
from ..providers import Operation, Usage
from ._budget import BudgetAsk, BudgetCharge, BudgetDecision, BudgetStore, MemoryBudgetStore, period_window
from ._ledger import LedgerStore, LedgerWriter, SqliteLedger, UsageRecord
from ._limits import Admission, Limiter, LimitRule, MemoryLimiter, Settlement, format_reset, set_budgets
from ._pricing import Price, cost, price_for, unit_cost, usage_cost
from ._units import requested_units

if TYPE_CHECKING:
    from ..core._dispatch import Call
    from ..core._state import Deployment, VirtualKey

log = logging.getLogger("kubellm.router")


@dataclass(slots=True)
class Lease:
    rules: list[LimitRule]
    admission: Admission


@dataclass(slots=True)
class Charge:
    """Spend owed to a budget whose store was unreachable when the request settled."""

    scope: str
    period: str
    request_id: str
    estimate: Decimal
    actual: Decimal
    period_key: str


#: Seconds between two attempts to apply owed charges while the budget store is unreachable.
CHARGE_RETRY_SECONDS = 1.0
#: Owed charges kept in memory at most (their records are in the ledger whatever happens).
MAX_OWED_CHARGES = 100_000
#: How long a settlement waits for others to share its round trip, and how many share one at most.
SETTLE_LINGER_SECONDS = 0.005
MAX_SETTLE_BATCH = 256


@dataclass(slots=True)
class Ticket:
    """What one request holds from admission until it is settled."""

    estimated_cost: Decimal = Decimal(0)
    leases: list[Lease] = field(default_factory=list)
    #: The budgets the request reserves in, scope -> period: its key's, then its team's.
    budget_scopes: dict[str, str] = field(default_factory=dict)
    #: Their reservations once made, by scope.
    budgets: dict[str, BudgetDecision] = field(default_factory=dict)
    #: The budget store was unreachable at admission and the call was let through (fail-open):
    #: its spend is charged to the budget once the store is back.
    budget_unreserved: bool = False
    #: The caller's limits and budget are still to be admitted (with the first deployment tried).
    pending: bool = False
    #: The client's completion allowance the budget reservation trusted (None: not the client's).
    allowance: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    finished: bool = False

    @property
    def budget(self) -> BudgetDecision | None:
        """The first budget's reservation (the key's, when it has a budget)."""
        return next(iter(self.budgets.values()), None)


def caller_budgets(key: VirtualKey) -> list[tuple[str, Budget, str]]:
    """(scope, budget, who) of every budget a key's request reserves in: its own, then its team's."""
    out = []
    if key.config.budget is not None:
        out.append((f"key:{key.config.name}", key.config.budget, f"API key {key.config.name!r}"))
    team = key.team
    if team is not None and team.config.budget is not None:
        who = f"team {team.config.name!r} of API key {key.config.name!r}"
        out.append((team.scope, team.config.budget, who))
    return out


def caller_rules(key: VirtualKey) -> list[LimitRule]:
    """The limits a key's request passes: its own, then its team's (both must admit)."""
    rules = [key.limit_rule] if key.limit_rule is not None else []
    if key.team is not None and key.team.limit_rule is not None:
        rules.append(key.team.limit_rule)
    return rules


#: Prices by deployment object (a config reload makes new ones): every request asks again.
_PRICES: dict[int, tuple[Deployment, Price | None]] = {}


def deployment_price(dep: Deployment) -> Price | None:
    hit = _PRICES.get(id(dep))
    if hit is not None and hit[0] is dep:
        return hit[1]
    price = price_for(dep.config.upstream_model or dep.config.model, dep.config.pricing)
    if len(_PRICES) >= 4096:
        _PRICES.clear()  # deployments of old configs: no longer asked for
    _PRICES[id(dep)] = (dep, price)
    return price


def _client_max_completion(body: dict[str, Any]) -> int | None:
    """The completion tokens the client allows: ``max_completion_tokens``/``max_tokens`` times ``n``."""
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return None
    n = body.get("n")
    return value * n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else value


def worst_case(call: Call, cap: int, trust_client: bool) -> tuple[Decimal, int | None]:
    """The most a request can cost, and the client's completion allowance it relied on (if any).

    Completion: the client's ``max_tokens`` (times ``n``) when given and trusted, else ``cap``;
    either way at most the room every deployment's context window leaves after the prompt. Priced
    at whichever deployment of the group would charge the most for it."""
    deps = call.group.deployments
    prompt = call.prompt_tokens
    if call.operation is Operation.EMBEDDING:
        completion, allowance = 0, None
    else:
        allowance = _client_max_completion(call.body) if trust_client else None
        completion = cap if allowance is None else allowance
        windows = [d.config.context_window for d in deps]
        if windows and all(w is not None for w in windows):
            completion = min(completion, max(0, max(w or 0 for w in windows) - prompt))
    prices = [p for p in (deployment_price(d) for d in deps) if p is not None]
    images, units = requested_units(call.operation, call.body)
    worst = (cost(prompt, completion, 0, p) + unit_cost(images, units, p) for p in prices)
    return max(worst, default=Decimal(0)), allowance


def state_dir(settings: RouterSettings) -> Path:
    """Where this router keeps local state: the embedded ledger and its journal."""
    path = Path(
        os.environ.get("KUBELLM_STATE_DIR") or settings.state_dir or "~/.local/state/kubellm"
    ).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _claim_slot(directory: Path) -> int:
    """A journal slot no other live process of this host holds (one per uvicorn worker)."""
    for slot in range(256):
        handle = open(directory / f"journal-{slot}.lock", "a")  # noqa: SIM115 - held for the process' life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _HELD_LOCKS.append(handle)
        return slot
    raise RuntimeError(f"no free ledger journal slot in {directory}")


_HELD_LOCKS: list[Any] = []


def ledger_writer(store: LedgerStore, settings: RouterSettings) -> LedgerWriter:
    """A writer whose journal survives this process, replayed by whichever process takes its slot next."""
    directory = state_dir(settings)
    slot = _claim_slot(directory)
    return LedgerWriter(store, directory / f"journal-{slot}.jsonl")


def local_ledger(settings: RouterSettings) -> LedgerWriter:
    """The embedded default: a SQLite ledger in the state directory."""
    return ledger_writer(SqliteLedger(state_dir(settings) / "ledger.sqlite"), settings)


class CallerRefused(Exception):
    """The caller's own limits or budget refused the request, found while admitting a deployment."""

    def __init__(self, error: KubellmError) -> None:
        super().__init__(error.message)
        self.error = error


def _may_be_cached(call: Call) -> bool:
    """Whether the dispatcher may answer from the cache, before any deployment is admitted.

    Mirrors ``Dispatcher._cache_key``'s opt-in; erring towards True only costs a round trip."""
    opted = call.group.caches or (call.key is not None and call.key.config.cache)
    return bool(opted) and call.options.cache_read


class Meter:
    def __init__(
        self, limiter: Limiter, budgets: BudgetStore, ledger: LedgerWriter, *, fail_open: bool = True
    ) -> None:
        if isinstance(limiter, MemoryLimiter) and isinstance(budgets, MemoryBudgetStore):
            limiter.budgets = limiter.budgets or budgets  # reserve in the limiter's own atomic step
        self.limiter = limiter
        self.budgets = budgets
        self.ledger = ledger
        self.fail_open = fail_open
        #: Monotonic time of the last shared-state failure (0: none); readiness reports it.
        self.last_store_error = 0.0
        #: Model groups whose upstream billed more completion tokens than a request allowed: their
        #: budget reservations no longer trust the client's max_tokens (see ``worst_case``).
        self.overbilled: set[str] = set()
        #: Settlements waiting for the next batch, and the task that sends batches.
        self._batch: list[Settlement] = []
        self._flusher: asyncio.Task[None] | None = None
        #: Charges owed to budgets, by (scope, request id), applied when the store answers again.
        self.owed: dict[tuple[str, str], Charge] = {}
        self._charging: asyncio.Task[None] | None = None

    @property
    def fused(self) -> bool:
        """Budgets are reserved and charged inside the limiter's own atomic steps (one script)."""
        return self.limiter.budgets is self.budgets

    @property
    def degraded(self) -> bool:
        return self.last_store_error > 0 and time.monotonic() - self.last_store_error < 10

    def store_failed(self, what: str, exc: Exception) -> None:
        self.last_store_error = time.monotonic()
        metrics.STORE_ERRORS.labels(what).inc()
        log.warning("shared state unavailable during %s: %s", what, type(exc).__name__)

    def _unavailable(self) -> KubellmError:
        return ServiceUnavailableError(
            "the shared rate-limit store is unreachable and limits are configured to fail closed",
            code="limits_unavailable",
            headers={"Retry-After": "1"},
        )

    # -- admission ---------------------------------------------------------------------------

    async def admit_caller(self, call: Call) -> Ticket:
        """The request's ticket. The key's limits and budget are admitted later, in the same round
        trip as the first deployment (:meth:`admit_deployment`); only a call the cache may answer,
        which might reach no deployment, is admitted here and now (and may raise here)."""
        ticket = Ticket()
        key = call.key
        if key is None:
            return ticket
        budgets = caller_budgets(key)
        if budgets:
            cap = call.state.config.settings.budget_reserve_tokens
            trust = call.group.name not in self.overbilled
            ticket.estimated_cost, ticket.allowance = worst_case(call, cap, trust)
            ticket.budget_scopes = {scope: b.period for scope, b, _ in budgets}
        if key.limit_rule is None and not budgets and (key.team is None or key.team.limit_rule is None):
            return ticket
        ticket.pending = True
        if _may_be_cached(call):
            await self._admit(call, ticket, None)
        return ticket

    async def admit_deployment(self, call: Call, ticket: Ticket, dep: Deployment) -> Admission | None:
        """Admit the deployment, and the caller if still pending, in one atomic step.

        None: nothing to admit, or the store failed open. A denied Admission: the deployment is
        saturated (skip it). :class:`CallerRefused`: the caller's own limit or budget refused."""
        if dep.limit_rule is None and not ticket.pending:
            return None
        if not ticket.pending:
            return await self._admit(call, ticket, dep)
        try:
            return await self._admit(call, ticket, dep)
        except KubellmError as err:
            raise CallerRefused(err) from None

    async def _admit(self, call: Call, ticket: Ticket, dep: Deployment | None) -> Admission | None:
        key, caller = call.key, ticket.pending
        rules: list[LimitRule] = []
        asks: list[BudgetAsk] = []
        if caller and key is not None:
            rules += caller_rules(key)
            now = time.time()
            est, rid = ticket.estimated_cost, call.request_id
            asks += [BudgetAsk(s, b.period, b.amount_usd, est, rid, now) for s, b, _ in caller_budgets(key)]
        if dep is not None and dep.limit_rule is not None:
            rules.append(dep.limit_rule)
        lease_id = call.request_id if dep is None else f"{call.request_id}:{dep.name}"
        try:
            adm = await self._acquire(rules, call.estimated_tokens, lease_id, asks)
        except Exception as exc:
            self.store_failed("admission", exc)
            if not self.fail_open:
                raise self._unavailable() from None
            if caller:
                ticket.pending, ticket.budget_unreserved = False, bool(asks)
            return None
        if not adm.allowed:
            if caller and key is not None:
                self._refuse_caller(adm, key)
            metrics.RATE_LIMITED.labels("deployment", adm.denied_by or "").inc()
            return adm
        if rules:
            ticket.leases.append(Lease(rules, adm))
        if caller:
            ticket.pending = False
            ticket.budgets = dict(adm.budgets)
            if key is not None:
                # The key's own x-ratelimit headers, or its team's where the team has less left.
                scopes = [r.scope for r in caller_rules(key)]
                if scopes:
                    ticket.headers.update(adm.headers_of(*scopes))
        return adm

    def _refuse_caller(self, adm: Admission, key: VirtualKey) -> None:
        """Raise the refusal of the key's or its team's limit or budget, if one refused."""
        if key.limit_rule is not None and key.limit_rule.scope in adm.denied_scopes:
            raise self._limited(adm, key.limit_rule.scope, f"API key {key.config.name!r}", "key")
        team = key.team
        if team is not None and team.limit_rule is not None and team.scope in adm.denied_scopes:
            who = f"team {team.config.name!r} of API key {key.config.name!r}"
            raise self._limited(adm, team.scope, who, "team")
        for scope, budget, who in caller_budgets(key):
            decision = adm.budgets.get(scope)
            if decision is not None and not decision.allowed:
                raise self._over_budget(decision, budget, who, "key" if scope.startswith("key:") else "team")

    async def _acquire(
        self, rules: list[LimitRule], estimate: int, lease_id: str, asks: list[BudgetAsk]
    ) -> Admission:
        if not asks or self.fused:
            return await self.limiter.acquire(rules, estimate, lease_id, budget=asks)
        # A limiter and a budget store that do not share a store: several steps, the lease and the
        # reservations made undone when a budget refuses (the rpm count stays, erring towards fewer
        # admissions).
        adm = await self.limiter.acquire(rules, estimate, lease_id)
        if not adm.allowed:
            return adm
        decisions: list[BudgetDecision] = []
        for ask in asks:
            decision = await self.budgets.reserve(
                ask.scope, ask.period, ask.limit, ask.estimate, ask.reservation_id, ask.now
            )
            decisions.append(decision)
            if not decision.allowed:
                adm.allowed = False
                for made in asks[: len(decisions) - 1]:
                    await self.budgets.settle(
                        made.scope, made.period, made.reservation_id, made.estimate, Decimal(0)
                    )
                await self.limiter.release(rules, lease_id)
                break
        set_budgets(adm, asks[: len(decisions)], decisions)
        return adm

    def _limited(self, admission: Admission, scope: str, who: str, kind: str) -> RateLimitError:
        metrics.RATE_LIMITED.labels(kind, admission.denied_by or "").inc()
        retry = max(1, int((admission.retry_after or 1) + 0.999))
        which = (admission.denied_by or "").rsplit(" ", 1)[-1] or "limit"
        err = RateLimitError(
            f"{who} is over its {which} limit; retry in {format_reset(admission.retry_after or 1)}",
            headers={**admission.headers_of(scope), "Retry-After": str(retry)},
        )
        err.retryable = False  # the caller's own limit: no deployment or fallback would change it
        return err

    def _over_budget(self, decision: BudgetDecision, budget: Budget, who: str, kind: str) -> RateLimitError:
        if decision.spent < budget.amount_usd:
            # Not spent, only reserved by calls in flight: their settlement frees the rest.
            retry = 1
            what = f"has the rest of its budget of ${budget.amount_usd} reserved by calls in flight"
        else:
            retry = max(1, int(decision.resets_at - time.time() + 0.999))
            what = f"has spent its budget of ${budget.amount_usd}"
        err = RateLimitError(
            f"{who} {what} for this {budget.period} period",
            code="budget_exceeded",
            headers={"Retry-After": str(retry)},
        )
        err.type = "insufficient_quota"
        err.retryable = False
        metrics.RATE_LIMITED.labels(kind, "budget").inc()
        return err

    # -- settling ------------------------------------------------------------------------------

    def finish(
        self,
        call: Call,
        ticket: Ticket,
        dep: Deployment | None,
        status: int,
        usage: Usage | None,
        latency: float,
        ttft: float | None,
    ) -> Decimal:
        """Record the request once, then settle its leases and budget in the background; return its cost."""
        if ticket.finished:
            return Decimal(0)
        ticket.finished = True
        price = deployment_price(dep) if dep is not None else None
        spend = usage_cost(usage, price) if (usage is not None and price is not None) else Decimal(0)
        self.ledger.submit(
            UsageRecord(
                id=call.request_id,
                ts=time.time(),
                request_id=call.request_id,
                key=call.caller_label,
                model_group=call.group.name,
                deployment=dep.name if dep is not None else "",
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                cached_tokens=usage.cached_tokens if usage else 0,
                cache_write_tokens=usage.cache_write_tokens if usage else 0,
                cost=spend,
                latency_ms=round(latency * 1000, 3),
                ttft_ms=round(ttft * 1000, 3) if ttft is not None else None,
                status=status,
                estimated=bool(usage and usage.estimated),
            )
        )
        if (
            ticket.allowance is not None
            and usage is not None
            and not usage.estimated
            and usage.completion_tokens > ticket.allowance
            and call.group.name not in self.overbilled
        ):
            self.overbilled.add(call.group.name)
            log.warning(
                "deployment %r billed %d completion tokens for a request allowing %d: budgets now "
                "reserve the worst case for model %r whatever max_tokens says",
                dep.name if dep is not None else "",
                usage.completion_tokens,
                ticket.allowance,
                call.group.name,
            )
        if ticket.leases or ticket.budgets:
            self._settle(call, ticket, usage.total_tokens if usage is not None else 0, spend)
        if ticket.budget_unreserved and spend:
            for scope, period in ticket.budget_scopes.items():
                key = period_window(period)[2]
                self._owe(Charge(scope, period, call.request_id, Decimal(0), spend, key))
        return spend

    def _settle(self, call: Call, ticket: Ticket, actual_tokens: int, spend: Decimal) -> None:
        """Queue the ticket's settlements for the next batch (one script for many requests)."""
        est = call.estimated_tokens
        for lease in ticket.leases:
            adm = lease.admission
            self._batch.append(Settlement(lease.rules, adm.lease_id, est, actual_tokens, adm.window_start))
        now = time.time()
        for scope, decision in ticket.budgets.items():
            period = ticket.budget_scopes[scope]
            charge = BudgetCharge(scope, period, call.request_id, spend, decision.period_key, now)
            self._batch.append(Settlement((), call.request_id, 0, 0, 0.0, charge))
        if isinstance(self.limiter, MemoryLimiter) and self.fused:
            batch, self._batch = self._batch, []
            self.limiter.settle_now(batch)  # no I/O: nothing to batch for
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_batches())

    async def _flush_batches(self) -> None:
        # Lingering a little lets the settlements of concurrent requests share one round trip;
        # leases (and concurrency slots) are freed at most this much later.
        while self._batch:
            await asyncio.sleep(SETTLE_LINGER_SECONDS)
            batch, self._batch = self._batch[:MAX_SETTLE_BATCH], self._batch[MAX_SETTLE_BATCH:]
            await self._apply(batch)

    async def _apply(self, batch: list[Settlement]) -> None:
        charges = [
            Charge(c.scope, c.period, c.reservation_id, Decimal(0), c.actual, c.period_key)
            for c in (s.charge for s in batch)
            if c is not None
        ]
        try:
            await self.limiter.settle_many(batch if self.fused else [s for s in batch if s.charge is None])
        except Exception as exc:
            # Leases expire by themselves; a lost tpm correction only errs towards the estimate.
            # Budget charges are owed, and applied (idempotently) once the store is back.
            self.store_failed("settle", exc)
            if self.fused:
                for charge in charges:
                    self._owe(charge)
                return
        if self.fused:
            return
        for charge in charges:
            try:
                await self._charge(charge)
            except Exception as exc:
                self.store_failed("budget settle", exc)
                self._owe(charge)

    async def _charge(self, c: Charge) -> None:
        # Idempotent by request id: a charge applied twice counts once.
        await self.budgets.settle(
            c.scope, c.period, c.request_id, c.estimate, c.actual, period_key=c.period_key
        )

    def charge_budget(self, key: VirtualKey, request_id: str, spend: Decimal) -> None:
        """Charge ``key``'s budget and its team's for spend no request admitted (a batch's, once it
        completes); idempotent by ``request_id``, applied in the background."""
        if spend <= 0:
            return
        for scope, budget, _ in caller_budgets(key):
            period_key = period_window(budget.period)[2]
            self._owe(Charge(scope, budget.period, request_id, Decimal(0), spend, period_key))

    def _owe(self, charge: Charge) -> None:
        if len(self.owed) >= MAX_OWED_CHARGES:
            metrics.STORE_ERRORS.labels("budget charge dropped").inc()
            return
        self.owed[(charge.scope, charge.request_id)] = charge
        if self._charging is None or self._charging.done():
            self._charging = asyncio.get_running_loop().create_task(self._apply_owed_until_done())

    async def _apply_owed_until_done(self) -> None:
        while self.owed:
            await asyncio.sleep(CHARGE_RETRY_SECONDS)
            await self.apply_owed()

    async def apply_owed(self) -> bool:
        """Charge the budgets what calls admitted during a store outage spent; True when none is owed."""
        for owed, charge in list(self.owed.items()):
            try:
                await self._charge(charge)
            except Exception:
                return False  # still unreachable: the next round tries again
            del self.owed[owed]
        return True

    async def release(self, ticket: Ticket) -> None:
        for lease in ticket.leases:
            try:
                await self.limiter.release(lease.rules, lease.admission.lease_id)
            except Exception as exc:
                self.store_failed("release", exc)
        ticket.leases.clear()

    async def renew(self, ticket: Ticket) -> None:
        for lease in ticket.leases:
            try:
                await self.limiter.renew(lease.rules, lease.admission.lease_id)
            except Exception as exc:
                self.store_failed("renew", exc)

    async def drain(self) -> None:
        while self._flusher is not None and not self._flusher.done():
            await asyncio.gather(self._flusher, return_exceptions=True)
        close = getattr(self.limiter, "close", None)  # a leasing limiter gives back its slices
        if close is not None:
            await close()
        if self.owed and not await self.apply_owed():
            total = sum((c.actual for c in self.owed.values()), Decimal(0))
            log.warning(
                "budget store unreachable at shutdown: %d charges ($%s) not applied; the ledger has them",
                len(self.owed),
                total,
            )
        await self.ledger.close()
