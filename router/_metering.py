"""Admission and metering: key and deployment limits, budgets, and the usage ledger.

Per request, in order:

1. :meth:`Meter.admit_caller` checks the key's rpm/tpm/parallel limits and
   reserves its budget (estimated cost of the prompt plus the requested
   completion at the group's highest price);
2. :meth:`Meter.admit_deployment` takes a lease on each deployment tried, so
   saturated deployments are skipped;
3. :meth:`Meter.finish` records exactly one usage record and, off the request
   path, settles every lease and reservation to the actual usage.

Each store call is one atomic round trip (Lua in Redis, or a lock-free block
in memory). When the store is unreachable, admission fails open or closed as
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

from . import _metrics as metrics
from ._budget import BudgetDecision, BudgetStore, period_window
from ._config import RouterSettings
from ._errors import KubellmError, RateLimitError, ServiceUnavailableError
from ._ledger import LedgerStore, LedgerWriter, SqliteLedger, UsageRecord
from ._limits import Admission, Limiter, LimitRule, format_reset
from ._pricing import Price, cost, price_for
from .providers import Operation, Usage

if TYPE_CHECKING:
    from ._dispatch import Call
    from ._state import Deployment

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


@dataclass(slots=True)
class Ticket:
    """What one request holds from admission until it is settled."""

    estimated_cost: Decimal = Decimal(0)
    leases: list[Lease] = field(default_factory=list)
    budget: BudgetDecision | None = None
    budget_scope: str = ""
    budget_period: str = ""
    #: The budget store was unreachable at admission and the call was let through (fail-open):
    #: its spend is charged to the budget once the store is back.
    budget_unreserved: bool = False
    #: The client's completion allowance the budget reservation trusted (None: not the client's).
    allowance: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    finished: bool = False


def deployment_price(dep: Deployment) -> Price | None:
    return price_for(dep.config.upstream_model or dep.config.model, dep.config.pricing)


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
    return max((cost(prompt, completion, 0, p) for p in prices), default=Decimal(0)), allowance


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


class Meter:
    def __init__(
        self, limiter: Limiter, budgets: BudgetStore, ledger: LedgerWriter, *, fail_open: bool = True
    ) -> None:
        self.limiter = limiter
        self.budgets = budgets
        self.ledger = ledger
        self.fail_open = fail_open
        #: Monotonic time of the last shared-state failure (0: none); readiness reports it.
        self.last_store_error = 0.0
        self._settling: set[asyncio.Task[None]] = set()
        #: Model groups whose upstream billed more completion tokens than a request allowed: their
        #: budget reservations no longer trust the client's max_tokens (see ``worst_case``).
        self.overbilled: set[str] = set()
        #: Charges owed to budgets, by request id, applied when the store answers again.
        self.owed: dict[str, Charge] = {}
        self._charging: asyncio.Task[None] | None = None

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
        ticket = Ticket()
        key = call.key
        if key is None:
            return ticket
        key_rule = key.limit_rule
        if key_rule is not None:
            admission = await self._acquire([key_rule], call.estimated_tokens, call.request_id, "key limits")
            if admission is not None:
                if not admission.allowed:
                    raise self._limited(admission, f"API key {key.config.name!r}")
                ticket.leases.append(Lease([key_rule], admission))
                ticket.headers.update(admission.headers)
        budget = key.config.budget
        if budget is not None:
            cap = call.state.config.settings.budget_reserve_tokens
            trust = call.group.name not in self.overbilled
            ticket.estimated_cost, ticket.allowance = worst_case(call, cap, trust)
            ticket.budget_scope, ticket.budget_period = f"key:{key.config.name}", budget.period
            try:
                decision = await self.budgets.reserve(
                    ticket.budget_scope,
                    budget.period,
                    budget.amount_usd,
                    ticket.estimated_cost,
                    call.request_id,
                )
            except Exception as exc:
                self.store_failed("budget reserve", exc)
                if not self.fail_open:
                    await self.release(ticket)
                    raise self._unavailable() from None
                ticket.budget_unreserved = True
                return ticket
            if not decision.allowed:
                await self.release(ticket)
                if decision.spent < budget.amount_usd:
                    # Not spent, only reserved by calls in flight: their settlement frees the rest.
                    retry = 1
                    what = f"has the rest of its budget of ${budget.amount_usd} reserved by calls in flight"
                else:
                    retry = max(1, int(decision.resets_at - time.time() + 0.999))
                    what = f"has spent its budget of ${budget.amount_usd}"
                err = RateLimitError(
                    f"API key {key.config.name!r} {what} for this {budget.period} period",
                    code="budget_exceeded",
                    headers={"Retry-After": str(retry)},
                )
                err.type = "insufficient_quota"
                err.retryable = False
                metrics.RATE_LIMITED.labels("key", "budget").inc()
                raise err
            ticket.budget = decision
        return ticket

    async def admit_deployment(self, call: Call, ticket: Ticket, dep: Deployment) -> Admission | None:
        """A lease on the deployment's limits; None when it has none. A denied Admission means saturated."""
        dep_rule = dep.limit_rule
        if dep_rule is None:
            return None
        lease_id = f"{call.request_id}:{dep.name}"
        admission = await self._acquire([dep_rule], call.estimated_tokens, lease_id, "deployment limits")
        if admission is None:
            return None
        if admission.allowed:
            ticket.leases.append(Lease([dep_rule], admission))
        else:
            metrics.RATE_LIMITED.labels("deployment", admission.denied_by or "").inc()
        return admission

    async def _acquire(
        self, rules: list[LimitRule], estimate: int, lease_id: str, what: str
    ) -> Admission | None:
        try:
            return await self.limiter.acquire(rules, estimate, lease_id)
        except Exception as exc:
            self.store_failed(what, exc)
            if self.fail_open:
                return None
            raise self._unavailable() from None

    def _limited(self, admission: Admission, who: str) -> RateLimitError:
        metrics.RATE_LIMITED.labels("key", admission.denied_by or "").inc()
        retry = max(1, int((admission.retry_after or 1) + 0.999))
        which = (admission.denied_by or "").rsplit(" ", 1)[-1] or "limit"
        return RateLimitError(
            f"{who} is over its {which} limit; retry in {format_reset(admission.retry_after or 1)}",
            headers={**admission.headers, "Retry-After": str(retry)},
        )

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
        spend = (
            cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, price)
            if (usage is not None and price is not None)
            else Decimal(0)
        )
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
        if ticket.leases or ticket.budget is not None:
            actual = usage.total_tokens if usage is not None else 0
            task = asyncio.get_running_loop().create_task(self._settle(call, ticket, actual, spend))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        if ticket.budget_unreserved and spend:
            key = period_window(ticket.budget_period)[2]
            self._owe(
                Charge(ticket.budget_scope, ticket.budget_period, call.request_id, Decimal(0), spend, key)
            )
        return spend

    async def _settle(self, call: Call, ticket: Ticket, actual_tokens: int, spend: Decimal) -> None:
        try:
            for lease in ticket.leases:
                await self.limiter.settle(
                    lease.rules,
                    lease.admission.lease_id,
                    call.estimated_tokens,
                    actual_tokens,
                    lease.admission.window_start,
                )
        except Exception as exc:
            # Leases expire by themselves; a lost tpm correction only errs towards the estimate.
            self.store_failed("settle", exc)
        if ticket.budget is None:
            return
        charge = Charge(
            ticket.budget_scope,
            ticket.budget_period,
            call.request_id,
            ticket.estimated_cost,
            spend,
            ticket.budget.period_key,
        )
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

    def _owe(self, charge: Charge) -> None:
        if len(self.owed) >= MAX_OWED_CHARGES:
            metrics.STORE_ERRORS.labels("budget charge dropped").inc()
            return
        self.owed[charge.request_id] = charge
        if self._charging is None or self._charging.done():
            self._charging = asyncio.get_running_loop().create_task(self._apply_owed_until_done())

    async def _apply_owed_until_done(self) -> None:
        while self.owed:
            await asyncio.sleep(CHARGE_RETRY_SECONDS)
            await self.apply_owed()

    async def apply_owed(self) -> bool:
        """Charge the budgets what calls admitted during a store outage spent; True when none is owed."""
        for request_id, charge in list(self.owed.items()):
            try:
                await self._charge(charge)
            except Exception:
                return False  # still unreachable: the next round tries again
            del self.owed[request_id]
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
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        if self.owed and not await self.apply_owed():
            total = sum((c.actual for c in self.owed.values()), Decimal(0))
            log.warning(
                "budget store unreachable at shutdown: %d charges ($%s) not applied; the ledger has them",
                len(self.owed),
                total,
            )
        await self.ledger.close()
