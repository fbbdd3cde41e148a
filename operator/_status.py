"""Pure status computation: what each resource's ``.status`` should say, and the patch to get there.

The reconciler owns every field computed here; it patches a resource only when
one of them differs, so a steady state costs no API writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from kubellm.router.core import rejection_reason

from ._build import Body, Verdict, budget_amount, budget_period, key_prefix, key_secret_name

Status = dict[str, Any]


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """One key's usage in its current period, from the ledger."""

    spend: Decimal
    #: Successful requests; ``rejected`` were refused with 429 (rate limit, budget), ``failed``
    #: ended in any other error (router/metering/_ledger.py ``outcome``).
    requests: int
    prompt_tokens: int
    completion_tokens: int
    period_start: float
    period_end: float
    rejected: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Health:
    """A deployment's shared circuit breaker, as the routers see it."""

    open_until: float = 0.0
    probe_until: float = 0.0
    #: 401 or 403 when the upstream's last answer rejected the deployment's credentials, else 0.
    rejected: int = 0


def rfc3339(ts: float | datetime) -> str:
    when = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def usd(amount: Decimal) -> str:
    """Money for display: cents, or up to six decimals below a cent (never scientific notation)."""
    if amount == 0:
        return "0.00"
    places = Decimal("0.01") if abs(amount) >= Decimal("0.01") else Decimal("0.000001")
    return format(amount.quantize(places, rounding=ROUND_HALF_UP), "f")


def condition(
    kind: str,
    ok: bool | None,
    reason: str,
    message: str,
    generation: int | None,
    previous: list[Mapping[str, Any]] | None,
    now: datetime,
) -> dict[str, Any]:
    """A condition; ``lastTransitionTime`` moves only when the status value changes."""
    status = "Unknown" if ok is None else ("True" if ok else "False")
    before = next((c for c in previous or [] if c.get("type") == kind), None)
    since = before.get("lastTransitionTime") if before and before.get("status") == status else None
    out: dict[str, Any] = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or rfc3339(now),
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def _meta(body: Body) -> tuple[int | None, list[Mapping[str, Any]]]:
    generation = (body.get("metadata") or {}).get("generation")
    previous = (body.get("status") or {}).get("conditions") or []
    return (int(generation) if generation is not None else None), list(previous)


def _ready(body: Body, verdict: Verdict, now: datetime) -> dict[str, Any]:
    generation, previous = _meta(body)
    return condition("Ready", verdict.ok, verdict.reason, verdict.message, generation, previous, now)


def deployment_status(
    body: Body, verdict: Verdict, config_name: str, health: Health | None, now: datetime
) -> Status:
    """``health`` None: no shared breaker state (no Redis configured)."""
    generation, previous = _meta(body)
    if not verdict.ok:
        healthy = condition(
            "Healthy", None, "NotRendered", "not in the router config", generation, previous, now
        )
        open_until = None
    elif health is None:
        message = "circuit breakers are per router replica without Redis (settings.redis)"
        healthy = condition("Healthy", None, "NoSharedState", message, generation, previous, now)
        open_until = None
    elif health.rejected:
        open_until = rfc3339(health.open_until) if health.open_until > now.timestamp() else None
        message = (
            f"{rejection_reason(health.rejected)}: check the credentials Secret; traffic skips this "
            "deployment until a call succeeds (one request probes it after each cooldown)"
        )
        healthy = condition("Healthy", False, "CredentialsRejected", message, generation, previous, now)
    elif health.open_until > now.timestamp():
        open_until = rfc3339(health.open_until)
        message = f"circuit breaker open after upstream failures; traffic resumes after {open_until}"
        healthy = condition("Healthy", False, "CircuitOpen", message, generation, previous, now)
    elif health.probe_until > now.timestamp():
        open_until = None
        message = "a probe request is testing the upstream after a cooldown"
        healthy = condition("Healthy", False, "Probing", message, generation, previous, now)
    else:
        open_until = None
        healthy = condition("Healthy", True, "CircuitClosed", "taking traffic", generation, previous, now)
    return {
        "observedGeneration": generation,
        "deploymentName": config_name,
        "openUntil": open_until,
        "conditions": [_ready(body, verdict, now), healthy],
    }


def group_status(body: Body, verdict: Verdict, now: datetime) -> Status:
    generation, _ = _meta(body)
    return {
        "observedGeneration": generation,
        "deployments": verdict.deployments or 0,
        "conditions": [_ready(body, verdict, now)],
    }


def api_key_status(
    body: Body, verdict: Verdict, key: str | None, usage: KeyUsage | None, now: datetime
) -> Status:
    """``key`` is the key itself (for its non-secret prefix); ``usage`` None when unknown."""
    generation, _ = _meta(body)
    spec = body.get("spec") or {}
    state = verdict.state
    if state is None:
        state = "Disabled" if spec.get("disabled") else None
    status: Status = {
        "observedGeneration": generation,
        "state": state,
        "secretName": key_secret_name(body),
        "keyPrefix": key_prefix(key) if key else None,
        "conditions": [_ready(body, verdict, now)],
    }
    try:
        amount = budget_amount(body)
    except Exception:  # an invalid amount is already reported by the Ready condition
        amount = None
    if usage is not None:
        status.update(
            spend=usd(usage.spend),
            usage={
                "requests": usage.requests,
                "rejected": usage.rejected,
                "failed": usage.failed,
                "promptTokens": usage.prompt_tokens,
                "completionTokens": usage.completion_tokens,
            },
            periodStart=rfc3339(usage.period_start),
            nextReset=rfc3339(usage.period_end),
            remainingBudget=usd(max(Decimal(0), amount - usage.spend)) if amount is not None else None,
            spendSummary=(
                f"${usd(usage.spend)}/${usd(amount)} {budget_period(body)}"
                if amount is not None
                else f"${usd(usage.spend)} {budget_period(body)}"
            ),
        )
    return status


def status_patch(current: Mapping[str, Any] | None, desired: Status) -> Status | None:
    """The merge patch of ``.status`` that makes ``current`` match ``desired`` (None: nothing to do).

    A desired None removes the field; fields not in ``desired`` are left to their owners."""
    current = current or {}
    patch = {k: v for k, v in desired.items() if current.get(k) != v}
    return patch or None
