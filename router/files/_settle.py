"""Billing a completed batch: its output file's usage, summed, lands in the ledger exactly once.

The first retrieve (or list) of the batch, on any replica, that sees ``status: completed`` takes
the store's claim for it (an atomic first-caller-wins flag), reads the output file, and writes one
ledger record (id ``batch:{batch_id}``, which the ledger stores also keep unique) and charges the
owner's budget. A failure while reading gives the claim back, so a later retrieve settles it.
Batch prices: the deployment's prices times :data:`BATCH_PRICE_FACTOR` (OpenAI and Azure OpenAI
bill batches at half the synchronous price).
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from ..metering._ledger import UsageRecord
from ..metering._meter import deployment_price
from ..metering._pricing import usage_cost
from ..observability import _metrics as metrics
from ..providers import Usage
from ..providers._openai_responses import usage_from_responses
from ._platform import call, path_id
from ._store import Entry

if TYPE_CHECKING:
    from ..core._router import Caller, Router
    from ..core._state import Deployment

log = logging.getLogger("kubellm.router")

BATCH_PRICE_FACTOR = Decimal("0.5")


def _line_usage(line: bytes) -> Usage | None:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    response = doc.get("response") if isinstance(doc, dict) else None
    body = response.get("body") if isinstance(response, dict) else None
    if not isinstance(body, dict):
        return None
    usage: Any = body.get("usage")
    if body.get("object") == "response":
        return usage_from_responses(usage)
    return Usage.from_openai(usage)


def output_usage(raw: bytes) -> tuple[Usage, int]:
    """The usage of every answer in a batch output file, summed, and how many answers carried one."""
    total = Usage()
    counted = 0
    for line in raw.splitlines():
        usage = _line_usage(line) if line.strip() else None
        if usage is None:
            continue
        counted += 1
        total = Usage(
            prompt_tokens=total.prompt_tokens + usage.prompt_tokens,
            completion_tokens=total.completion_tokens + usage.completion_tokens,
            cached_tokens=total.cached_tokens + usage.cached_tokens,
        )
    return total, counted


async def settle(
    router: Router, caller: Caller, dep: Deployment, batch_id: str, entry: Entry, doc: dict[str, Any]
) -> None:
    """Bill a completed batch once; the caller is its owner (checked by the route)."""
    store = router.services.files
    if doc.get("status") != "completed" or not await store.claim(batch_id):
        return
    try:
        usage, answers = Usage(), 0
        output = doc.get("output_file_id")
        if isinstance(output, str) and output:
            resp = await call(router, dep, entry.group, "GET", f"/files/{path_id(output)}/content")
            usage, answers = output_usage(await resp.read())
    except Exception as exc:
        await store.unclaim(batch_id)
        log.warning(
            "batch %s: its output could not be read to bill it (%s); a later retrieve will", batch_id, exc
        )
        return
    price = deployment_price(dep)
    spend = usage_cost(usage, price) * BATCH_PRICE_FACTOR if price is not None else Decimal(0)
    record = UsageRecord(
        id=f"batch:{batch_id}",
        ts=time.time(),
        request_id=batch_id,
        key=entry.owner,
        model_group=entry.group,
        deployment=dep.name,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        cost=spend,
        status=200,
    )
    router.meter.ledger.submit(record)
    if caller.key is not None:
        router.meter.charge_budget(caller.key, record.id, record.cost)
    if record.cost:
        metrics.SPEND.labels(entry.group, entry.owner).inc(float(record.cost))
    log.info("batch %s settled: %d answers, %s USD", batch_id, answers, record.cost)
