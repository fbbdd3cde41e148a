"""A sink: a bounded queue filled by the request path, drained in batches by the sink thread.

:meth:`Sink.offer` is the only method the request path calls: a length check and
a ``deque.append``, both atomic under the GIL, so it takes no lock and never
waits. When the queue is full the record is dropped and counted. Everything
else (encoding, HTTP, retries with exponential backoff and jitter) runs on the
sink thread's own event loop, never on the loop that serves requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections import deque
from typing import Any, ClassVar

import aiohttp
import orjson
from prometheus_client import Counter

from ._record import Record

log = logging.getLogger("kubellm.sinks")

SENT = Counter("kubellm_sink_events_total", "Requests delivered to an observability sink.", ["sink"])
DROPPED = Counter(
    "kubellm_sink_dropped_total",
    "Requests an observability sink dropped: its queue was full, or delivery was given up.",
    ["sink"],
)
ERRORS = Counter("kubellm_sink_errors_total", "Failed delivery attempts to an observability sink.", ["sink"])

#: First retry delay; doubles per attempt up to :data:`MAX_BACKOFF_SECONDS`, with jitter.
BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0


class SinkSetupError(Exception):
    """A sink that cannot be started (missing credential, missing optional package); it is skipped."""


class DeliveryError(Exception):
    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


def env_secret(name: str | None, what: str) -> str:
    """The value of a credential environment variable; never logged."""
    if not name:
        raise SinkSetupError(f"{what} is not configured")
    value = os.environ.get(name)
    if not value:
        raise SinkSetupError(f"environment variable {name} ({what}) is not set")
    return value


def env_headers(name: str | None) -> dict[str, str]:
    """Headers from an environment variable holding a JSON object, e.g. ``{"Authorization": "..."}``."""
    if not name:
        return {}
    raw = env_secret(name, "headersEnv")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise SinkSetupError(f"environment variable {name} (headersEnv) is not a JSON object") from None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise SinkSetupError(f"environment variable {name} (headersEnv) must map header names to strings")
    return {str(k): v for k, v in doc.items()}


class Sink:
    """Queueing, batching and retries; subclasses say how a batch is encoded and delivered."""

    kind: ClassVar[str] = ""

    def __init__(
        self,
        name: str,
        *,
        batch_size: int = 100,
        flush_interval: float = 2.0,
        max_queue: int = 10_000,
        max_retries: int = 5,
        timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.max_retries = max_retries
        self.timeout = timeout
        self._queue: deque[Record] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self.sent = SENT.labels(name)
        self.dropped = DROPPED.labels(name)
        self.errors = ERRORS.labels(name)

    # -- the request path -----------------------------------------------------------------------

    def offer(self, record: Record) -> None:
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped.inc()
            return
        queue.append(record)
        if len(queue) == self.batch_size and self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the sink loop has just been shut down
                self._loop.call_soon_threadsafe(self._wake.set)

    # -- the sink thread ------------------------------------------------------------------------

    async def open(self, session: aiohttp.ClientSession) -> None:
        """Called once on the sink loop before the first batch."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()

    async def close(self) -> None:
        """Called once on the sink loop after the last batch."""

    def encode(self, batch: list[Record]) -> Any:
        """The batch in the sink's wire format; ``None`` when there is nothing to send."""
        raise NotImplementedError

    async def deliver(self, prepared: Any) -> None:
        """Send one encoded batch; raise :class:`DeliveryError` on failure."""
        raise NotImplementedError

    def stop(self) -> None:
        """Flush what is queued (one attempt per batch, no backoff) and end :meth:`run`."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._closing and len(self._queue) < self.batch_size:
                try:
                    async with asyncio.timeout(self.flush_interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            await self._drain()
            if self._closing:
                return

    async def _drain(self) -> None:
        queue = self._queue
        while queue:
            batch = [queue.popleft() for _ in range(min(len(queue), self.batch_size))]
            try:
                prepared = self.encode(batch)
            except Exception as exc:
                log.warning("sink %s: cannot encode %d events: %s", self.name, len(batch), type(exc).__name__)
                self.errors.inc()
                self.dropped.inc(len(batch))
                continue
            if prepared is not None:
                await self._send(prepared, len(batch))

    async def _send(self, prepared: Any, count: int) -> None:
        delay = BACKOFF_SECONDS
        attempt = 0
        while True:
            try:
                await self.deliver(prepared)
            except Exception as exc:
                err = (
                    exc
                    if isinstance(exc, DeliveryError)
                    else DeliveryError(type(exc).__name__, retryable=True)
                )
                self.errors.inc()
                if not err.retryable or attempt >= self.max_retries or self._closing:
                    log.warning(
                        "sink %s: dropped %d events after %d attempts: %s", self.name, count, attempt + 1, err
                    )
                    self.dropped.inc(count)
                    return
                wait = err.retry_after if err.retry_after is not None else delay * (0.5 + random.random() / 2)
                log.info(
                    "sink %s: attempt %d failed (%s); retrying in %.2fs", self.name, attempt + 1, err, wait
                )
                await self._pause(min(wait, MAX_BACKOFF_SECONDS))
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                attempt += 1
            else:
                self.sent.inc(count)
                return

    async def _pause(self, seconds: float) -> None:
        """Sleep between retries; a shutdown cuts it short."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not self._closing:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.1))


class HttpSink(Sink):
    """A sink that POSTs one request body per batch; 408, 429 and 5xx answers are retried.

    A sink whose :meth:`encode` returns a list of bodies (vendors that take one event per request)
    gets one POST each; bodies already accepted are removed, so a retry resends only the rest.
    """

    content_type: ClassVar[str] = "application/json"

    def __init__(self, name: str, url: str, headers: dict[str, str], **options: Any) -> None:
        super().__init__(name, **options)
        self.url = url
        self.headers = {"Content-Type": self.content_type, **headers}
        self._session: aiohttp.ClientSession | None = None
        #: The body of the latest non-2xx answer, for sinks that explain a refusal in their log.
        self.last_body = b""

    async def open(self, session: aiohttp.ClientSession) -> None:
        await super().open(session)
        self._session = session

    def check(self, status: int, body: bytes) -> None:
        """Inspect a 2xx answer; vendors that report per-event errors in it override this."""

    async def deliver(self, prepared: Any) -> None:
        if not isinstance(prepared, list):
            await self._post(prepared)
            return
        while prepared:
            await self._post(prepared[0])
            prepared.pop(0)

    async def _post(self, body: bytes) -> None:
        assert self._session is not None
        try:
            async with self._session.post(
                self.url,
                data=body,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                answer = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryError(type(exc).__name__, retryable=True) from None
        if 200 <= status < 300:
            self.check(status, answer)
            return
        self.last_body = answer[:4096]
        wait: float | None = None
        if retry_after is not None:
            try:
                wait = max(0.0, float(retry_after))
            except ValueError:
                wait = None
        raise DeliveryError(
            f"HTTP {status}", retryable=status in (408, 429) or status >= 500, retry_after=wait
        )
