"""Facts the operator reads from the routers' shared Redis: key spend (the usage ledger's
aggregates) and deployment circuit breakers. One pipeline per poll for all resources."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from decimal import Decimal

from kubellm.router.config import RedisSettings
from kubellm.router.core import RedisHealthStore
from kubellm.router.metering import Totals, period_window
from kubellm.router.redis_store import Client

from ._status import Health, KeyUsage

log = logging.getLogger("kubellm.operator")

#: Keys without a budget report their usage over this period.
DEFAULT_PERIOD = "monthly"


class UsageReader:
    """Reads the ledger and breakers the routers write (same prefix, same Redis)."""

    def __init__(
        self, client: Client, prefix: str = "kubellm:", settings: RedisSettings | None = None
    ) -> None:
        from kubellm.router.metering import redis_ledger

        self.client = client
        self.ledger = redis_ledger(client, settings or RedisSettings(key_prefix=prefix))
        self.health = RedisHealthStore(client, prefix)

    @classmethod
    def from_settings(cls, settings: RedisSettings) -> UsageReader | None:
        from kubellm.router.redis_connect import connect_settings

        client = connect_settings(settings, timeout=2.0)
        return cls(client, settings.key_prefix, settings) if client is not None else None

    async def close(self) -> None:
        await self.client.aclose()

    async def key_usage(
        self, keys: Iterable[tuple[str, str]], now: float | None = None
    ) -> dict[str, KeyUsage]:
        """``keys``: (key name, budget period); every key gets an entry (zero when unused)."""
        t = time.time() if now is None else now
        by_window: dict[tuple[float, float], list[str]] = {}
        for name, period in keys:
            start, end, _ = period_window(period, t)
            by_window.setdefault((start, end), []).append(name)
        out: dict[str, KeyUsage] = {}
        for (start, end), names in by_window.items():
            totals = await self.ledger.aggregate(start, end, by="key")
            for name in names:
                got = totals.get(name) or Totals()
                out[name] = KeyUsage(
                    Decimal(got.cost),
                    got.requests,
                    got.prompt_tokens,
                    got.completion_tokens,
                    start,
                    end,
                    rejected=got.rejected,
                    failed=got.failed,
                )
        return out

    async def breakers(self, names: Iterable[str]) -> dict[str, Health]:
        snapshot = await self.health.snapshot(names)
        return {name: Health(b.open_until, b.probe_until, b.rejected) for name, b in snapshot.items()}
