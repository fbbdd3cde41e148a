"""What the upstream client puts on and takes off the wire, besides the connection: its errors, the
request head, and response headers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from ._decoding import ACCEPT_ENCODING
from ._proxies import Proxy

__all__ = [
    "BadEncoding",
    "ClientError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionClosed",
    "HeadTooLarge",
    "IdleTimeout",
    "RemoteProtocolError",
    "ResponseHeaders",
    "TotalTimeout",
]


class ClientError(Exception):
    """Base of every error this client raises."""


class ConnectError(ClientError):
    """The connection could not be opened (refused, unreachable, name or TLS failure)."""


class ConnectTimeout(ClientError):
    """Opening the connection took longer than the connect timeout."""


class IdleTimeout(ClientError):
    """The server sent nothing for longer than the idle timeout."""


class TotalTimeout(ClientError):
    """The exchange took longer than the total timeout."""


class RemoteProtocolError(ClientError):
    """The server broke the protocol or the connection before the response was complete."""


class ConnectionClosed(RemoteProtocolError):
    """The connection ended (closed or reset) before the response was complete."""


class HeadTooLarge(RemoteProtocolError):
    """The response head is larger than :data:`MAX_HEAD_BYTES` or has too many fields."""


class BadEncoding(RemoteProtocolError):
    """The body is in a content coding this client does not decode, or does not decode."""


class ResponseHeaders(Mapping[str, str]):
    """Response headers, looked up without regard to case; repeated headers are joined by ``, ``."""

    __slots__ = ("_items",)

    def __init__(self, items: dict[str, str]) -> None:
        self._items = items  # keys are lower-case

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._items.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"ResponseHeaders({self._items!r})"


@dataclass(frozen=True, slots=True)
class _Target:
    origin: tuple[str, str, int]
    host: str
    port: int
    tls: bool
    #: ``Host`` header and request target, as sent
    host_header: str
    path: str
    #: ``host:port``, for a proxy's CONNECT
    authority: str


@functools.lru_cache(maxsize=4096)
def _target(url: str) -> _Target:
    # Deployments call a handful of URLs over and over: parse each once.
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConnectError(f"unsupported upstream URL scheme or host: {scheme or '(none)'}://")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ConnectError("invalid port in the upstream URL") from None
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(c in path for c in " \r\n"):
        raise ConnectError("the upstream URL path contains whitespace")
    return _Target(
        (scheme, host, port),
        host,
        port,
        scheme == "https",
        shown if port == default else f"{shown}:{port}",
        path,
        f"{shown}:{port}",
    )


#: Request headers this client writes itself (``Host`` and ``Accept-Encoding`` from the caller's, if given).
_OWN_HEADERS = frozenset(
    {"host", "accept-encoding", "content-length", "transfer-encoding", "connection", "proxy-authorization"}
)


def _request_head(
    method: str, target: _Target, headers: Mapping[str, str], body: bytes | None, forward: Proxy | None = None
) -> bytes:
    """The request line and headers; through a forward proxy (``http://`` upstreams) in absolute form."""
    if forward is None:
        lines = [f"{method} {target.path} HTTP/1.1\r\n"]
    else:
        lines = [f"{method} http://{target.host_header}{target.path} HTTP/1.1\r\n"]
        if forward.authorization:
            lines.append(f"Proxy-Authorization: {forward.authorization}\r\n")
    host = target.host_header
    accept = ACCEPT_ENCODING
    for name, value in headers.items():
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
            raise ConnectError(f"request header {name!r} contains a line break or colon")
        lowered = name.lower()
        if lowered in _OWN_HEADERS:
            if lowered == "host":
                host = value
            elif lowered == "accept-encoding":
                accept = value
            continue
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Host: {host}\r\nAccept-Encoding: {accept}\r\n")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body) if body is not None else 0}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")
