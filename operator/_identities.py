"""IdentityBindings -> the router config's ``identityBindings``, and their status.

A binding covers ServiceAccounts of its own namespace (by name, or ``*`` for all of them) and
OIDC callers of issuers the routers are configured with. One that cannot work (an unknown
issuer, a guardrail that is not defined, ServiceAccount tokens switched off in the routers'
settings, a ServiceAccount another binding already names) gets Ready=False with the reason and is
left out; the rest keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from kubellm.router.config import IdentityBindingConfig, RouterSettings

from ._build import (
    Body,
    Invalid,
    Ref,
    Verdict,
    _check_guardrails,
    _decimal,
    _pydantic,
    _sort_key,
    _spec,
    ref_of,
)

KIND = "IdentityBinding"


def binding_config(body: Body, settings: RouterSettings) -> IdentityBindingConfig:
    """One IdentityBinding as router config; raises :class:`Invalid`."""
    from kubellm.router.metering import validate_period

    ref = ref_of(KIND, body)
    spec = _spec(body)
    names = spec.get("serviceAccounts") or []
    oidc = spec.get("oidc") or []
    if not names and not oidc:
        raise Invalid(
            "InvalidSpec", "name at least one ServiceAccount (serviceAccounts) or OIDC caller (oidc)"
        )
    identity = settings.identity
    if names and not identity.kubernetes.enabled:
        raise Invalid(
            "ServiceAccountTokensDisabled",
            "the routers do not accept ServiceAccount tokens: set settings.identity.kubernetes.enabled",
        )
    issuers = {i.name for i in identity.oidc}
    unknown = sorted({str(m.get("issuer")) for m in oidc if isinstance(m, dict)} - issuers)
    if unknown:
        known = ", ".join(sorted(issuers)) or "none"
        raise Invalid(
            "IssuerNotConfigured",
            f"no OIDC issuer named {', '.join(map(repr, unknown))} in settings.identity.oidc (has: {known})",
        )
    doc: dict[str, Any] = {
        "name": ref.config_name,
        "serviceAccounts": [{"namespace": ref.namespace, "name": str(n)} for n in names],
        "oidc": oidc,
    }
    for key in ("models", "limits", "team", "disabled", "cache", "guardrails"):
        if spec.get(key) is not None:
            doc[key] = spec[key]
    budget = spec.get("budget")
    if isinstance(budget, dict) and budget.get("amountUsd") is not None:
        period = str(budget.get("period") or "monthly")
        try:
            validate_period(period)
        except ValueError as exc:
            raise Invalid("InvalidSpec", f"budget.period: {exc}") from None
        doc["budget"] = {
            "amountUsd": str(_decimal(budget["amountUsd"], "budget.amountUsd")),
            "period": period,
        }
    config: IdentityBindingConfig = _pydantic(IdentityBindingConfig, doc)
    return config


def identity_bindings(
    bodies: Iterable[Body], settings: RouterSettings, known_guardrails: set[str], verdicts: dict[Ref, Verdict]
) -> list[IdentityBindingConfig]:
    """The usable bindings (verdicts for all of them go to ``verdicts``), oldest first."""
    out: list[IdentityBindingConfig] = []
    claimed: dict[tuple[str, str], Ref] = {}
    for body in sorted(bodies, key=_sort_key):
        ref = ref_of(KIND, body)
        try:
            binding = binding_config(body, settings)
            _check_guardrails(binding.guardrails, known_guardrails)
            taken = [
                claimed[(s.namespace, s.name)]
                for s in binding.service_accounts
                if (s.namespace, s.name) in claimed
            ]
            if taken:
                raise Invalid("Conflict", f"a ServiceAccount it names is already bound by {taken[0]}")
        except Invalid as bad:
            verdicts[ref] = Verdict(False, bad.reason, bad.message)
            continue
        claimed.update({(s.namespace, s.name): ref for s in binding.service_accounts})
        out.append(binding)
        who = ", ".join(
            [f"sa:{s.namespace}/{s.name}" for s in binding.service_accounts]
            + [f"oidc:{m.issuer}" for m in binding.oidc]
        )
        verdicts[ref] = Verdict(True, "Rendered", f"the routers accept {who}")
    out.sort(key=lambda b: b.name)
    return out


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class IdentitySpend:
    identity: str
    spend: Decimal
    requests: int


def owner_of(identity: str, bindings: Mapping[str, IdentityBindingConfig]) -> str | None:
    """The binding (config name) an identity's usage belongs to, as the routers chose it.

    ServiceAccounts: the binding naming it, else the one covering its namespace. OIDC: a binding
    naming the subject; one matching claims cannot be told from the usage record (no claims there)."""
    kind, _, rest = identity.partition(":")
    scope, _, subject = rest.partition("/")
    exact = wildcard = None
    for name, b in sorted(bindings.items()):
        if kind == "sa":
            for s in b.service_accounts:
                if s.namespace == scope and s.name == subject:
                    exact = exact or name
                elif s.namespace == scope and s.name == "*":
                    wildcard = wildcard or name
        elif kind == "oidc" and any(m.issuer == scope and subject in m.subjects for m in b.oidc):
            exact = exact or name
    return exact or wildcard


def binding_period(body: Body) -> str:
    budget = (body.get("spec") or {}).get("budget") or {}
    return str(budget.get("period") or "monthly") if isinstance(budget, dict) else "monthly"


def binding_status(
    body: Body, verdict: Verdict, usage: list[IdentitySpend] | None, period_start: float | None, now: datetime
) -> dict[str, Any]:
    from ._status import _meta, _ready, rfc3339, usd

    generation, _ = _meta(body)
    status: dict[str, Any] = {"observedGeneration": generation, "conditions": [_ready(body, verdict, now)]}
    if usage is not None:
        total = sum((u.spend for u in usage), Decimal(0))
        top = sorted(usage, key=lambda u: (-u.spend, u.identity))[:50]
        status.update(
            identities=len(usage),
            spend=usd(total),
            spendSummary=f"${usd(total)} {binding_period(body)}",
            usage=[{"identity": u.identity, "spend": usd(u.spend), "requests": u.requests} for u in top],
            periodStart=rfc3339(period_start) if period_start is not None else None,
        )
    return status


class IdentityUsage:
    """Spend of the identities (``sa:``/``oidc:`` keys in the ledger) per budget period, read
    once per poll for all bindings: one aggregate per distinct period."""

    def __init__(self) -> None:
        #: period -> (period start, key name -> (spend, successful requests)).
        self.by_period: dict[str, tuple[float, dict[str, tuple[Decimal, int]]]] = {}
        self.periods: dict[str, str] = {}

    async def refresh(self, reader: Any, bodies: Iterable[Body]) -> None:
        if reader is None:
            return
        import time

        from kubellm.router.metering import period_window

        self.periods = {ref_of(KIND, b).config_name: binding_period(b) for b in bodies}
        out: dict[str, tuple[float, dict[str, tuple[Decimal, int]]]] = {}
        try:
            for period in set(self.periods.values()):
                start, end, _ = period_window(period, time.time())
                totals = await reader.ledger.aggregate(start, end, by="key")
                out[period] = (
                    start,
                    {
                        name: (Decimal(t.cost), t.requests)
                        for name, t in totals.items()
                        if name.startswith(("sa:", "oidc:"))
                    },
                )
        except Exception as exc:  # Redis down: keep the last figures
            import logging

            logging.getLogger("kubellm.operator").warning("cannot read identity usage: %s", exc)
            return
        self.by_period = out

    def of(
        self, binding: str, rendered: Mapping[str, IdentityBindingConfig]
    ) -> tuple[list[IdentitySpend], float] | None:
        period = self.periods.get(binding)
        if period is None or period not in self.by_period or binding not in rendered:
            return None
        start, totals = self.by_period[period]
        mine = [
            IdentitySpend(name, spend, requests)
            for name, (spend, requests) in totals.items()
            if owner_of(name, rendered) == binding
        ]
        return mine, start
