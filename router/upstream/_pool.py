"""The one pooled upstream HTTP client of a router process, and the router's errors for its failures.

The client is :mod:`._httpclient`, chosen by measurement (see there): aiohttp's pool was the
largest single cost per proxied request, and httpx's collapsed under concurrency (about 165 req/s
at 32 connections where aiohttp kept about 1,500). Connections are kept alive per origin and
opened with TCP_NODELAY.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from .._errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeoutError
from ..providers import RequestContext, UpstreamRequest, UpstreamResponse
from . import _client as http


def _error(exc: http.ClientError, where: str, during: str | None) -> UpstreamError:
    """The router's error for a client failure; ``during`` names the body being received, if any."""
    if isinstance(exc, http.ConnectTimeout):
        return UpstreamTimeoutError(f"connecting to deployment {where!r} timed out", code="connect_timeout")
    if isinstance(exc, http.IdleTimeout):
        when = f"mid-{during}" if during else "before answering"
        return UpstreamTimeoutError(f"deployment {where!r} went silent {when}", code="idle_timeout")
    if isinstance(exc, http.TotalTimeout):
        if during:
            return UpstreamTimeoutError(
                f"deployment {where!r} exceeded the total timeout mid-{during}", code="total_timeout"
            )
        return UpstreamTimeoutError(f"deployment {where!r} did not answer in time", code="total_timeout")
    if isinstance(exc, http.ConnectError):
        return UpstreamConnectError(f"cannot connect to deployment {where!r}: {exc}")
    # The connection was open: what went wrong on it has a code of its own, never a connect error.
    code = next((code for kind, code in _PROTOCOL_CODES if isinstance(exc, kind)), "upstream_bad_response")
    if isinstance(exc, http.BadEncoding):
        return UpstreamProtocolError(f"cannot decode the answer of deployment {where!r}: {exc}", code=code)
    if during:
        return UpstreamProtocolError(f"deployment {where!r} broke off its {during}: {exc}", code=code)
    return UpstreamProtocolError(f"deployment {where!r} failed: {exc}", code=code)


#: Error codes of failures on an open connection, the most specific first.
_PROTOCOL_CODES: tuple[tuple[type[http.ClientError], str], ...] = (
    (http.ConnectionClosed, "upstream_connection_closed"),
    (http.HeadTooLarge, "upstream_head_too_large"),
    (http.BadEncoding, "upstream_bad_encoding"),
    (http.RemoteProtocolError, "upstream_protocol_error"),
)


class _Response:
    __slots__ = ("_resp", "_where", "headers", "status")

    def __init__(self, resp: http.Response, where: str) -> None:
        self._resp = resp
        self._where = where
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except http.ClientError as exc:
            raise _error(exc, self._where, "response") from None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._resp.iter_chunks():
                yield data
        except http.ClientError as exc:
            raise _error(exc, self._where, "stream") from None

    def close(self) -> None:
        self._resp.close()


class UpstreamPool:
    """Owns the process's connection pool; started and stopped with the app."""

    def __init__(self) -> None:
        self.pool = http.ConnectionPool()

    async def stop(self) -> None:
        await self.pool.close()

    async def send(self, request: UpstreamRequest, ctx: RequestContext) -> UpstreamResponse:
        t = ctx.effective_timeouts
        where = ctx.deployment.name
        try:
            resp = await self.pool.request(
                request.method,
                request.url,
                request.headers,
                request.body,
                connect_timeout=t.connect,
                idle_timeout=t.idle,
                total_timeout=ctx.total_timeout,
            )
        except http.ClientError as exc:
            raise _error(exc, where, None) from None
        return _Response(resp, where)
