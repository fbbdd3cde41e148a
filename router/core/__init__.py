"""The core: authentication, model groups, dispatch with retries and fallbacks, the cache."""

from ._health import RedisHealthStore, rejection_reason
from ._state import build_state

__all__ = ["RedisHealthStore", "build_state", "rejection_reason"]
