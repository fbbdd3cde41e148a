"""Key self-service and admin reporting endpoints.

``GET /v1/key/info`` tells a key holder its own limits, usage and remaining
budget, and its team's (``teamPolicy``). ``GET /admin/spend`` (master key only)
aggregates the usage ledger by key, team, model group or deployment over a time range.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from .._errors import InvalidRequestError, KubellmError, PermissionDeniedError
from ..core._router import JSON, authenticate, authenticate_caller, error_response
from ..metering._budget import period_window
from ..metering._ledger import Totals
from ..metering._pricing import format_usd

if TYPE_CHECKING:
    from ..config._schema import Budget
    from ..core._router import Router


def _plain(obj: object) -> str:
    if isinstance(obj, Decimal):
        return format_usd(obj)
    return str(obj)


def _json(doc: Any) -> Response:
    return Response(orjson.dumps(doc, default=_plain), media_type=JSON)


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts is not None else None


def _totals(t: Totals) -> dict[str, Any]:
    return {
        "requests": t.requests,
        "rejected": t.rejected,
        "failed": t.failed,
        "promptTokens": t.prompt_tokens,
        "completionTokens": t.completion_tokens,
        "spendUsd": format_usd(t.cost),
    }


def _time_param(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        try:
            value = datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except ValueError:
            value = -1.0
    if not 0 <= value <= _LATEST:  # also refuses nan and inf, which no date can show
        raise InvalidRequestError(
            f"'{name}' must be Unix seconds or an RFC 3339 time, from 1970 to 9999",
            param=name,
            code="invalid_value",
        )
    return value


#: 9999-12-31T23:59:59Z, the last instant a datetime can show.
_LATEST = 253402300799.0


async def _budget_doc(router: Router, scope: str, budget: Budget, now: float) -> dict[str, Any]:
    start, end, _ = period_window(budget.period, now)
    spent = await router.meter.budgets.spent(scope, budget.period, now)
    return {
        "amountUsd": format_usd(budget.amount_usd),
        "period": budget.period,
        "periodStart": _iso(start),
        "resetsAt": _iso(end),
        "spentUsd": format_usd(spent),
        "remainingUsd": format_usd(max(Decimal(0), budget.amount_usd - spent)),
    }


def _by_team(router: Router, by_key: dict[str, Totals]) -> dict[str, Totals]:
    """Per-key totals summed by each key's team *now* (the ledger records keys, not teams): a key
    that moved team moves its history too, and keys without a team (or not in the config any more,
    such as a ServiceAccount's identity) sum under ``""``."""
    team_of = {k.config.name: k.config.team or "" for k in router.state.keys.values()}
    out: dict[str, Totals] = {}
    for name, t in by_key.items():
        out.setdefault(team_of.get(name, ""), Totals()).merge(t)
    return out


def register_admin_routes(app: FastAPI, router: Router) -> None:
    async def key_info(request: Request) -> Response:
        try:
            caller = await authenticate_caller(router.state, request.headers, router.identities)
        except KubellmError as err:
            return error_response(err)
        key = caller.key
        if key is None:
            doc: dict[str, Any] = {"key": caller.label, "master": caller.is_master}
            return _json(doc)
        cfg = key.config
        doc = {
            "key": cfg.name,
            "keyPrefix": cfg.key_prefix,
            "owner": cfg.owner,
            "team": cfg.team,
            "models": cfg.models,
            "limits": cfg.limits.model_dump(by_alias=True, exclude_none=True),
            "expiresAt": cfg.expires_at.isoformat() if cfg.expires_at else None,
            "disabled": cfg.disabled,
        }
        now = time.time()
        since = now - 86400
        if cfg.budget is not None:
            since = period_window(cfg.budget.period, now)[0]
            doc["budget"] = await _budget_doc(router, f"key:{cfg.name}", cfg.budget, now)
        await router.meter.ledger.flush()
        usage = await router.meter.ledger.store.aggregate(since, now + 1, "key")
        doc["usage"] = {"since": _iso(since), **_totals(usage.get(cfg.name, Totals()))}
        if key.team is not None:
            team = key.team.config
            doc["teamPolicy"] = {
                "name": team.name,
                "models": team.models,
                "limits": team.limits.model_dump(by_alias=True, exclude_none=True),
            }
            if team.budget is not None:
                doc["teamPolicy"]["budget"] = await _budget_doc(router, key.team.scope, team.budget, now)
        return _json(doc)

    async def spend(request: Request) -> Response:
        try:
            caller = authenticate(router.state, request.headers)
            if not caller.is_master:
                raise PermissionDeniedError("this endpoint needs the master key")
            now = time.time()
            since = _time_param(request, "since", now - 86400)
            until = _time_param(request, "until", now + 1)
            by = request.query_params.get("by", "key")
            if by not in ("key", "team", "model_group", "deployment"):
                raise InvalidRequestError(
                    "'by' must be key, team, model_group or deployment", param="by", code="invalid_value"
                )
        except KubellmError as err:
            return error_response(err)
        await router.meter.ledger.flush()
        if by == "team":
            rows = _by_team(router, await router.meter.ledger.store.aggregate(since, until, "key"))
        else:
            rows = await router.meter.ledger.store.aggregate(since, until, by)  # type: ignore[arg-type]
        total = Totals()
        for t in rows.values():
            total.merge(t)
        return _json(
            {
                "since": _iso(since),
                "until": _iso(until),
                "by": by,
                "groups": {name: _totals(t) for name, t in sorted(rows.items())},
                "total": _totals(total),
            }
        )

    for prefix in ("/v1", ""):
        app.add_api_route(
            prefix + "/key/info",
            key_info,
            methods=["GET"],
            include_in_schema=prefix == "/v1",
            summary="The calling key's limits, usage and remaining budget",
        )
    app.add_api_route(
        "/admin/spend",
        spend,
        methods=["GET"],
        summary="Spend and usage by key, model group or deployment (master key)",
        openapi_extra={
            "parameters": [
                {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                for name in ("since", "until", "by")
            ]
        },
    )
