"""The exact-match response cache.

Keyed on the model group, the operation, whether it streams, and the request
body with its keys sorted (``stream_options`` and ``user`` left out, since
they do not change the answer). A streamed answer is stored as the list of
chunk payloads the client received, and replayed as the same stream.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import orjson

from .._sse import Event
from ..config._schema import CacheSettings
from ..providers import Operation
from ._outcome import Answer, Batch, Stream

log = logging.getLogger("kubellm.router")

_IGNORED = frozenset({"stream_options", "user", "stream"})


def cache_key(group: str, operation: str, stream: bool, body: dict[str, Any]) -> str:
    normal = {k: v for k, v in body.items() if k not in _IGNORED}
    digest = hashlib.sha256(orjson.dumps(normal, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{group}:{operation}:{'s' if stream else 'j'}:{digest}"


def wants(headers: Any) -> tuple[bool, bool]:
    """(may read, may write) according to the request's Cache-Control."""
    value = (headers.get("cache-control") or "").lower()
    if "no-store" in value:
        return False, False
    if "no-cache" in value:
        return False, True
    return True, True


class ResponseCache(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes) -> None: ...


class MemoryCache:
    def __init__(self, settings: CacheSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._settings = settings
        self._clock = clock

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > self._settings.max_entry_bytes:
            return
        self._entries[key] = (self._clock() + self._settings.ttl_seconds, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._settings.max_entries:
            self._entries.popitem(last=False)


class RedisCache:
    def __init__(self, client: Any, settings: CacheSettings, prefix: str = "kubellm:") -> None:
        self._redis = client
        self._settings = settings
        self._prefix = prefix + "cache:"

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(self._prefix + key)
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > self._settings.max_entry_bytes:
            return
        await self._redis.set(self._prefix + key, value, px=int(self._settings.ttl_seconds * 1000))


def pack_answer(wire: Operation, body: bytes) -> bytes:
    return orjson.dumps({"w": wire.value, "j": body.decode()})


def pack_stream(wire: Operation, payloads: list[bytes | Event]) -> bytes:
    """A stream's payloads; named events as ``[name, data]`` pairs."""
    items = [p.decode() if isinstance(p, bytes) else [p.name, p.data.decode()] for p in payloads]
    return orjson.dumps({"w": wire.value, "s": items})


async def read_quietly(cache: ResponseCache, key: str) -> bytes | None:
    """A cache read whose failure is a miss: a cache outage must not fail requests."""
    try:
        return await cache.get(key)
    except Exception as exc:
        log.warning("cache read failed: %s", type(exc).__name__)
        return None


async def write_quietly(cache: ResponseCache, key: str, value: bytes) -> None:
    try:
        await cache.set(key, value)
    except Exception as exc:
        log.warning("cache write failed: %s", type(exc).__name__)


def replay(hit: bytes, headers: dict[str, str]) -> Answer | Stream | None:
    """A cached answer as the client asked for it: the JSON body or the stream it was; None for an
    entry this version cannot read (a cache shared with an older router), which counts as a miss."""
    try:
        doc = orjson.loads(hit)
        wire = Operation(doc["w"])
        if "j" in doc:
            return Answer(headers=headers, body=doc["j"].encode(), usage=None, wire=wire, cached=True)
        batch: Batch = [p.encode() if isinstance(p, str) else Event(p[0], p[1].encode()) for p in doc["s"]]
    except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, IndexError, AttributeError):
        return None

    async def events() -> AsyncIterator[Batch]:
        yield batch

    return Stream(headers=headers, events=events(), wire=wire, cached=True)
