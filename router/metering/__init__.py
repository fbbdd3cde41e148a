"""Metering: limits, budgets, the ledger, pricing and token counts."""

from ._budget import period_window, validate_period
from ._ledger import RedisLedger, Totals, redis_ledger

__all__ = ["RedisLedger", "Totals", "period_window", "redis_ledger", "validate_period"]
