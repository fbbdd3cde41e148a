"""Where each uploaded file and each batch lives, and whose it is.

OpenAI's file and batch ids mean something only to the upstream that issued them, so the router
remembers, per id, the deployment it lives on, the model group it was routed by and the key that
owns it (another key gets the 404 an unknown id gets), with the object as the upstream last
described it. A batch's usage is billed once: :meth:`ObjectStore.claim` is an atomic
first-caller-wins flag (``SET NX`` on Redis), taken by whichever replica first sees the batch
completed.

Backends: Redis when the router has it (every replica must find every file), under
``{prefix}files:{kind}:{id}`` with a per-owner index ``{prefix}files:{kind}-of:{owner}``; else
process memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from ..inbound.responses._store import owner_tag

if TYPE_CHECKING:
    from ..config._schema import RouterSettings
    from ..redis_store import Client

Kind = Literal["file", "batch"]
#: How long a settled-batch flag is kept (batches complete within 24 hours; their ids are not reused).
CLAIM_TTL_SECONDS = 90 * 86400


@dataclass(frozen=True, slots=True)
class Entry:
    owner: str
    deployment: str
    group: str
    doc: dict[str, Any]

    @property
    def created(self) -> float:
        value = self.doc.get("created_at")
        return float(value) if isinstance(value, int | float) else 0.0

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"owner": self.owner, "deployment": self.deployment, "group": self.group, "doc": self.doc}
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Entry:
        d = orjson.loads(raw)
        return cls(owner=d["owner"], deployment=d["deployment"], group=d["group"], doc=d["doc"])


class ObjectStore(Protocol):
    async def get(self, kind: Kind, object_id: str) -> Entry | None: ...

    async def put(self, kind: Kind, object_id: str, entry: Entry) -> None: ...

    async def delete(self, kind: Kind, object_id: str, owner: str) -> None: ...

    async def owned(self, kind: Kind, owner: str) -> list[tuple[str, Entry]]:
        """``owner``'s objects of ``kind``, newest first."""

    async def claim(self, batch_id: str) -> bool:
        """True for the first caller only: that caller settles the batch's usage."""

    async def unclaim(self, batch_id: str) -> None:
        """Give a claim back (settling failed part-way), so a later look settles it."""


class MemoryObjectStore:
    def __init__(self) -> None:
        self._entries: dict[tuple[Kind, str], Entry] = {}
        self._claims: set[str] = set()

    async def get(self, kind: Kind, object_id: str) -> Entry | None:
        return self._entries.get((kind, object_id))

    async def put(self, kind: Kind, object_id: str, entry: Entry) -> None:
        self._entries[(kind, object_id)] = entry

    async def delete(self, kind: Kind, object_id: str, owner: str) -> None:
        self._entries.pop((kind, object_id), None)

    async def owned(self, kind: Kind, owner: str) -> list[tuple[str, Entry]]:
        found = [(oid, e) for (k, oid), e in self._entries.items() if k == kind and e.owner == owner]
        return sorted(found, key=lambda item: item[1].created, reverse=True)

    async def claim(self, batch_id: str) -> bool:
        if batch_id in self._claims:
            return False
        self._claims.add(batch_id)
        return True

    async def unclaim(self, batch_id: str) -> None:
        self._claims.discard(batch_id)


class RedisObjectStore:
    def __init__(self, client: Client, prefix: str) -> None:
        self.client = client
        self.prefix = f"{prefix}files:"

    def _key(self, kind: Kind, object_id: str) -> str:
        return f"{self.prefix}{kind}:{object_id}"

    def _index(self, kind: Kind, owner: str) -> str:
        return f"{self.prefix}{kind}-of:{owner_tag(owner)}"

    async def get(self, kind: Kind, object_id: str) -> Entry | None:
        raw: Any = await self.client.get(self._key(kind, object_id))
        return Entry.from_json(raw) if raw is not None else None

    # Not transactions: on a Redis Cluster an entry and its owner's index sit in different slots.
    # The entry is written first and removed last, and listings skip ids without one.
    async def put(self, kind: Kind, object_id: str, entry: Entry) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self._key(kind, object_id), entry.to_json())
            pipe.zadd(self._index(kind, entry.owner), {object_id: entry.created or time.time()})
            await pipe.execute()

    async def delete(self, kind: Kind, object_id: str, owner: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrem(self._index(kind, owner), object_id)
            pipe.delete(self._key(kind, object_id))
            await pipe.execute()

    async def owned(self, kind: Kind, owner: str) -> list[tuple[str, Entry]]:
        ids: list[Any] = await self.client.zrevrange(self._index(kind, owner), 0, -1)
        if not ids:
            return []
        names = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        async with self.client.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.get(self._key(kind, n))
            raws: list[Any] = await pipe.execute()
        return [(n, Entry.from_json(r)) for n, r in zip(names, raws, strict=True) if r is not None]

    async def claim(self, batch_id: str) -> bool:
        won: Any = await self.client.set(
            f"{self.prefix}settled:{batch_id}", b"1", nx=True, ex=CLAIM_TTL_SECONDS
        )
        return bool(won)

    async def unclaim(self, batch_id: str) -> None:
        await self.client.delete(f"{self.prefix}settled:{batch_id}")


def object_store(settings: RouterSettings, client: Client | None) -> ObjectStore:
    if client is not None:
        return RedisObjectStore(client, settings.redis.key_prefix)
    return MemoryObjectStore()
