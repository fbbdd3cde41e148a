"""Stored responses, for ``previous_response_id``, ``GET`` and ``DELETE /v1/responses/{id}``.

A stored response is the Response object and the input items of its own request; a chain of
turns is walked back through ``previous_response_id`` (storing each turn's whole history would
grow with the square of the conversation). Reading a response renews its TTL, so a conversation
in use does not lose its first turns while its last ones are fresh.

Isolation: every entry is keyed by its owner (the API key that created it) as well as its id. A
response is found only by the owner that stored it; another key gets the same 404 as for an id
that never existed, as from OpenAI.

Backends: Redis when the router has it (shared by every replica: a turn may land on any), under
``{prefix}responses:{owner}:{id}`` with a TTL; else process memory, with the TTL and a bound on
the number of entries (the oldest go first).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from ...config._schema import RouterSettings
    from ...redis_store import Client

#: How far back a chain of previous_response_id is followed (a loop cannot form, but a runaway
#: client could build a very long chain).
MAX_CHAIN = 1000


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A Response object and the input items of its request (with ids)."""

    response: dict[str, Any]
    input: list[dict[str, Any]]

    @property
    def id(self) -> str:
        return str(self.response["id"])

    def to_json(self) -> bytes:
        return orjson.dumps({"response": self.response, "input": self.input})

    @classmethod
    def from_json(cls, raw: bytes) -> StoredResponse:
        doc = orjson.loads(raw)
        return cls(response=doc["response"], input=doc["input"])


class ResponseStore(Protocol):
    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """The response ``owner`` stored under ``response_id`` (its TTL renewed), or None."""

    async def put(self, owner: str, stored: StoredResponse) -> None: ...

    async def delete(self, owner: str, response_id: str) -> bool:
        """Whether there was such a response of ``owner`` (now deleted)."""


def owner_tag(owner: str) -> str:
    """A fixed-length tag for an owner: key names stay short and never carry a key's name."""
    return hashlib.sha256(owner.encode()).hexdigest()[:32]


class MemoryResponseStore:
    """Process memory: TTL, and at most ``max_entries`` responses (the least recently used go)."""

    def __init__(self, ttl_seconds: float, max_entries: int) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        # Serialized, so that a caller mutating what it got back cannot change what is stored.
        self._entries: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        key = (owner_tag(owner), response_id)
        entry = self._entries.get(key)
        now = time.monotonic()
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        self._entries[key] = (now + self.ttl, entry[1])
        self._entries.move_to_end(key)
        return StoredResponse.from_json(entry[1])

    async def put(self, owner: str, stored: StoredResponse) -> None:
        key = (owner_tag(owner), stored.id)
        self._entries[key] = (time.monotonic() + self.ttl, stored.to_json())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def delete(self, owner: str, response_id: str) -> bool:
        entry = self._entries.pop((owner_tag(owner), response_id), None)
        return entry is not None and entry[0] > time.monotonic()


class RedisResponseStore:
    """Redis, shared by the router's replicas; entries expire after the TTL (renewed on read)."""

    def __init__(self, client: Client, prefix: str, ttl_seconds: float) -> None:
        self.client = client
        self.prefix = f"{prefix}responses:"
        self.ttl_ms = max(1, int(ttl_seconds * 1000))

    def _key(self, owner: str, response_id: str) -> str:
        return f"{self.prefix}{owner_tag(owner)}:{response_id}"

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        raw: Any = await self.client.getex(self._key(owner, response_id), px=self.ttl_ms)
        return StoredResponse.from_json(raw) if raw is not None else None

    async def put(self, owner: str, stored: StoredResponse) -> None:
        await self.client.set(self._key(owner, stored.id), stored.to_json(), px=self.ttl_ms)

    async def delete(self, owner: str, response_id: str) -> bool:
        removed: int = await self.client.delete(self._key(owner, response_id))
        return removed > 0


def _text_part(role: Any, text: str) -> dict[str, Any]:
    if role == "assistant":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "input_text", "text": text}


def responses_store(settings: RouterSettings, client: Client | None) -> ResponseStore:
    """The store ``settings.responses`` describes: in Redis when the router has a client."""
    options = settings.responses
    if client is not None:
        return RedisResponseStore(client, settings.redis.key_prefix, options.ttl_seconds)
    return MemoryResponseStore(options.ttl_seconds, options.max_entries)


class BrokenChainError(LookupError):
    """A response of the chain is gone (deleted, expired, or stored by another key)."""

    def __init__(self, response_id: str) -> None:
        super().__init__(response_id)
        self.response_id = response_id


async def history(store: ResponseStore, owner: str, response_id: str) -> list[dict[str, Any]]:
    """Every item of the conversation up to and including ``response_id``: each turn's input
    items, then its output items, oldest turn first. Raises :class:`BrokenChainError`."""
    turns: list[StoredResponse] = []
    current: str | None = response_id
    while current is not None and len(turns) < MAX_CHAIN:
        stored = await store.get(owner, current)
        if stored is None:
            raise BrokenChainError(current)
        turns.append(stored)
        previous = stored.response.get("previous_response_id")
        current = previous if isinstance(previous, str) and previous else None
    items: list[dict[str, Any]] = []
    for turn in reversed(turns):
        items += [as_input(item) for item in turn.input]
        items += [item for item in turn.response.get("output") or [] if isinstance(item, dict)]
    return items


def as_input(item: dict[str, Any]) -> dict[str, Any]:
    """A stored input item as a request carries it again: without the id and status it was
    stored with (an upstream would look for an item of that id)."""
    if item.get("type") == "function_call_output" or item.get("role") in ("user", "system", "developer"):
        return {k: v for k, v in item.items() if k not in ("id", "status")}
    return item


def with_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as stored (and listed by ``input_items``): each with an id and a status."""
    from ._render import new_id

    out = []
    for item in items:
        kind = item.get("type", "message")
        stamped = {**item, "type": kind}
        if kind == "message" and isinstance(stamped.get("content"), str):
            stamped["content"] = [_text_part(stamped.get("role"), stamped["content"])]
        if not stamped.get("id"):
            prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}.get(
                kind, "item"
            )
            stamped["id"] = new_id(prefix)
        stamped.setdefault("status", "completed")
        out.append(stamped)
    return out
