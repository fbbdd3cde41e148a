"""Outbound HTTP proxies, from the environment as most HTTP clients read it.

``HTTPS_PROXY`` (for ``https://`` upstreams, through a ``CONNECT`` tunnel) and ``HTTP_PROXY`` (for
``http://`` upstreams, in absolute form), either case; ``NO_PROXY`` lists hosts and domains to
reach directly. Loopback hosts are always reached directly, as Go's HTTP client does, so a proxy
set for the cluster never captures a sidecar on localhost. Only ``http://`` proxies are supported;
credentials in the proxy URL are sent as ``Proxy-Authorization: Basic``.
"""

from __future__ import annotations

import base64
import ipaddress
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = ["Proxy", "ProxyChooser", "environment_proxies"]


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    #: The ``Proxy-Authorization`` header value, when the proxy URL carries credentials.
    authorization: str | None = None


def environment_proxies() -> dict[str, str]:
    """``{"https": url, "http": url, "no": "hosts"}`` from the environment (either case)."""
    return urllib.request.getproxies_environment()


def parse_proxy(url: str) -> Proxy:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(
            f"unsupported proxy URL {parts.scheme}://{parts.hostname or ''}: use http://host:port"
        )
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode()
    return Proxy(parts.hostname, parts.port or 80, authorization)


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` names the host: ``*``, the host, a parent domain (``example.com`` or
    ``.example.com``), an IP address or a CIDR block; ports in entries are ignored."""
    host = host.lower().strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        if entry.startswith("[") and "]" in entry:
            entry = entry[1 : entry.index("]")]
        elif entry.count(":") == 1:
            entry = entry.split(":", 1)[0]
        entry = entry.lstrip(".")
        if not entry:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        if host == entry or host.endswith("." + entry):
            return True
    return False


class ProxyChooser:
    """Which proxy, if any, carries requests to a (scheme, host); decided once per pair."""

    def __init__(self, proxies: Mapping[str, str]) -> None:
        self.proxies = {k: v for k, v in proxies.items() if v}
        self._chosen: dict[tuple[str, str], Proxy | ValueError | None] = {}

    def __bool__(self) -> bool:
        return "https" in self.proxies or "http" in self.proxies

    def choose(self, scheme: str, host: str) -> Proxy | None:
        """The proxy for this upstream; raises ValueError for a proxy URL that cannot be used."""
        key = (scheme, host)
        if key not in self._chosen:
            self._chosen[key] = self._decide(scheme, host)
        chosen = self._chosen[key]
        if isinstance(chosen, ValueError):
            raise chosen
        return chosen

    def _decide(self, scheme: str, host: str) -> Proxy | ValueError | None:
        url = self.proxies.get(scheme)
        if url is None or is_loopback(host) or bypassed(host, self.proxies.get("no", "")):
            return None
        try:
            return parse_proxy(url)
        except ValueError as exc:
            return ValueError(f"{scheme.upper()}_PROXY: {exc}")
