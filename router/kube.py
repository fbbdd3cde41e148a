"""A minimal asyncio Kubernetes API client on aiohttp, and the router's config Secret watch.

The router reads its config from one Secret the operator renders. It watches
the Secret through the API (list, then watch from the listed
``resourceVersion``; reconnect with backoff; relist on ``410 Gone``) rather
than reading a mounted volume: the kubelet refreshes mounted Secrets only on
its sync period plus cache TTL (a minute or more), while a watch event reaches
every router within milliseconds of the operator's write.

Credentials: in-cluster (the service-account token, re-read as the kubelet
rotates it, and the cluster CA), or a kubeconfig file (token, token file or
client certificate; CA path or data). Exec and auth-provider plugins are not
supported: there is no heavy client library behind this module.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import yaml

from .config._schema import ConfigError, RouterConfig, parse_config

log = logging.getLogger("kubellm.kube")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: Largest single watch event accepted (a Secret is at most 1 MiB, base64 adds a third).
MAX_EVENT_BYTES = 16 * 1024 * 1024
CONFIG_KEY = "config.json"


class KubeError(Exception):
    """The API server could not be reached or answered with an error."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class KubeConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    ca_data: bytes | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    namespace: str = "default"

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.ca_data is not None:
            ctx = ssl.create_default_context(cadata=self.ca_data.decode())
        else:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def _data_file(b64: str, suffix: str) -> str:
    """Client cert/key data from a kubeconfig go to a private temp file (ssl wants paths)."""
    fd, path = tempfile.mkstemp(prefix="kubellm-kube-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(b64))
    return path


def _named(items: Any, name: str, what: str, source: str) -> dict[str, Any]:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name and isinstance(item.get(what), dict):
            found: dict[str, Any] = item[what]
            return found
    raise KubeError(f"{source}: no {what} named {name!r}")


def load_kubeconfig(path: str | os.PathLike[str], context: str | None = None) -> KubeConfig:
    """The cluster, user and namespace of ``context`` (default: current-context) in a kubeconfig."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubeError(f"{p}: cannot read kubeconfig: {exc}") from None
    if not isinstance(doc, dict):
        raise KubeError(f"{p}: not a kubeconfig")
    ctx_name = context or doc.get("current-context")
    if not ctx_name:
        raise KubeError(f"{p}: no current-context")
    ctx = _named(doc.get("contexts"), ctx_name, "context", str(p))
    cluster = _named(doc.get("clusters"), ctx.get("cluster", ""), "cluster", str(p))
    user = _named(doc.get("users"), ctx.get("user", ""), "user", str(p)) if ctx.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise KubeError(f"{p}: exec/auth-provider credentials are not supported; use a token")
    base = p.parent

    def rel(value: str | None) -> str | None:
        return str(base / value) if value else None

    ca_data = cluster.get("certificate-authority-data")
    cert_file, key_file = rel(user.get("client-certificate")), rel(user.get("client-key"))
    if user.get("client-certificate-data"):
        cert_file = _data_file(user["client-certificate-data"], ".crt")
    if user.get("client-key-data"):
        key_file = _data_file(user["client-key-data"], ".key")
    return KubeConfig(
        server=str(cluster.get("server", "")).rstrip("/"),
        token=user.get("token"),
        token_file=rel(user.get("tokenFile")),
        ca_file=rel(cluster.get("certificate-authority")),
        ca_data=base64.b64decode(ca_data) if ca_data else None,
        cert_file=cert_file,
        key_file=key_file,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=ctx.get("namespace") or "default",
    )


def in_cluster_config(sa_dir: Path = SA_DIR) -> KubeConfig:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port or not (sa_dir / "token").is_file():
        raise KubeError("not running in a cluster (no KUBERNETES_SERVICE_HOST or service-account token)")
    if ":" in host:
        host = f"[{host}]"
    ns_file = sa_dir / "namespace"
    return KubeConfig(
        server=f"https://{host}:{port}",
        token_file=str(sa_dir / "token"),
        ca_file=str(sa_dir / "ca.crt"),
        namespace=ns_file.read_text().strip() if ns_file.is_file() else "default",
    )


def auto_config(kubeconfig: str | None = None) -> KubeConfig:
    """An explicit kubeconfig, else in-cluster, else ``$KUBECONFIG`` or ``~/.kube/config``."""
    if kubeconfig:
        return load_kubeconfig(kubeconfig)
    try:
        return in_cluster_config()
    except KubeError:
        pass
    path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(Path.home() / ".kube" / "config")
    if not Path(path).is_file():
        raise KubeError("no Kubernetes credentials: not in a cluster, and no kubeconfig given or found")
    return load_kubeconfig(path)


@dataclass(slots=True)
class WatchEvent:
    type: str
    object: dict[str, Any]


@dataclass
class KubeClient:
    """A handful of verbs over one aiohttp session. Errors raise :class:`KubeError`."""

    config: KubeConfig
    timeout: float = 10.0
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _token: str | None = field(default=None, init=False, repr=False)
    _token_read: float = field(default=0.0, init=False, repr=False)

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            conn = aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=32)
            self._session = aiohttp.ClientSession(
                connector=conn, json_serialize=lambda o: orjson.dumps(o).decode()
            )
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.config.token
        if self.config.token_file:
            # Bound service-account tokens are rotated by the kubelet: re-read the file each minute.
            now = time.monotonic()
            if self._token is None or now - self._token_read > 60:
                self._token = Path(self.config.token_file).read_text().strip()
                self._token_read = now
            token = self._token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        data = orjson.dumps(body) if body is not None else None
        try:
            async with self._session_().request(
                method,
                self.config.server + path,
                data=data,
                params=dict(params or {}),
                headers=self._headers(content_type if data is not None else None),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise _api_error(method, path, resp.status, raw)
                doc: dict[str, Any] = orjson.loads(raw) if raw else {}
                return doc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        return await self.request("GET", path, params=params)

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body)

    async def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", path, body)

    async def patch(self, path: str, body: Mapping[str, Any], *, kind: str = "merge") -> dict[str, Any]:
        types = {"merge": "application/merge-patch+json", "json": "application/json-patch+json"}
        return await self.request("PATCH", path, body, content_type=types[kind])

    async def delete(self, path: str) -> dict[str, Any]:
        return await self.request("DELETE", path)

    async def watch(
        self,
        path: str,
        resource_version: str,
        *,
        params: Mapping[str, str] | None = None,
        server_timeout: int = 290,
    ) -> AsyncIterator[WatchEvent]:
        """Events after ``resource_version`` until the server ends the watch (``server_timeout`` s).

        An ``ERROR`` event (e.g. 410 Gone: the version is too old) raises :class:`KubeError`.
        """
        query = {
            **(params or {}),
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(server_timeout),
        }
        try:
            async with self._session_().get(
                self.config.server + path,
                params=query,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.timeout, sock_read=server_timeout + 30
                ),
            ) as resp:
                if resp.status >= 400:
                    raise _api_error("WATCH", path, resp.status, await resp.read())
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            yield _event(line, path)
                    if len(buf) > MAX_EVENT_BYTES:
                        raise KubeError(f"WATCH {path}: event larger than {MAX_EVENT_BYTES} bytes")
                if buf.strip():
                    yield _event(buf, path)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(f"WATCH {path}: {type(exc).__name__}: {exc}") from None


def _event(line: bytes, path: str) -> WatchEvent:
    doc = orjson.loads(line)
    event = WatchEvent(str(doc.get("type", "")), doc.get("object") or {})
    if event.type == "ERROR":
        obj = event.object
        raise KubeError(
            f"WATCH {path}: {obj.get('message', 'error')}",
            int(obj.get("code") or 0),
            str(obj.get("reason", "")),
        )
    return event


def _api_error(method: str, path: str, status: int, raw: bytes) -> KubeError:
    message, reason = raw[:300].decode(errors="replace"), ""
    try:
        doc = orjson.loads(raw)
        if isinstance(doc, dict):
            message, reason = str(doc.get("message", message)), str(doc.get("reason", ""))
    except orjson.JSONDecodeError:
        pass
    return KubeError(f"{method} {path}: {status} {message}", status, reason)


def secret_path(namespace: str, name: str | None = None) -> str:
    base = f"/api/v1/namespaces/{quote(namespace, safe='')}/secrets"
    return f"{base}/{quote(name, safe='')}" if name else base


def secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's ``data``, base64-decoded to text (undecodable values are skipped)."""
    out: dict[str, str] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(value).decode()
        except (ValueError, UnicodeDecodeError):
            continue
    return out


def config_from_secret(secret: Mapping[str, Any], key: str = CONFIG_KEY) -> RouterConfig:
    meta = secret.get("metadata") or {}
    source = f"Secret {meta.get('namespace')}/{meta.get('name')} key {key}"
    text = secret_data(secret).get(key)
    if text is None:
        raise ConfigError(f"{source}: missing")
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from None
    return parse_config(doc, source=source)


class _Backoff:
    def __init__(self, base: float = 0.2, cap: float = 10.0) -> None:
        self.base, self.cap, self.current = base, cap, 0.0

    def reset(self) -> None:
        self.current = 0.0

    async def sleep(self) -> None:
        self.current = min(self.cap, max(self.base, self.current * 2))
        await asyncio.sleep(self.current * random.uniform(0.8, 1.2))


async def watch_config_secret(
    namespace: str,
    name: str,
    kubeconfig: str | None,
    on_config: Callable[[RouterConfig], None],
    on_error: Callable[[Exception], None],
    *,
    key: str = CONFIG_KEY,
) -> None:
    """Run forever: call ``on_config`` with each new valid config stored in Secret ``namespace/name``.

    ``on_error`` gets every problem (unreachable API, missing Secret, invalid document); the caller
    keeps serving its last good config. Only the first call, when no credentials can be found,
    raises (a :class:`KubeError`).
    """
    client = KubeClient(auto_config(kubeconfig))
    params = {"fieldSelector": f"metadata.name={name}"}
    path = secret_path(namespace)
    backoff = _Backoff()
    seen: str | None = None  # resourceVersion of the Secret last decoded

    def take(secret: dict[str, Any]) -> None:
        nonlocal seen
        rv = str((secret.get("metadata") or {}).get("resourceVersion", ""))
        if rv and rv == seen:
            return
        seen = rv
        try:
            config = config_from_secret(secret, key)
        except ConfigError as err:
            on_error(err)
            return
        on_config(config)

    try:
        while True:
            try:
                listed = await client.get(path, **params)
                items = listed.get("items") or []
                if items:
                    take(items[0])
                else:
                    on_error(KubeError(f"Secret {namespace}/{name} does not exist (yet)", 404, "NotFound"))
                rv = str((listed.get("metadata") or {}).get("resourceVersion", ""))
                backoff.reset()
                while True:  # one watch per server timeout; resume from the last version seen
                    started = time.monotonic()
                    async for event in client.watch(path, rv, params=params):
                        rv = str((event.object.get("metadata") or {}).get("resourceVersion", rv))
                        if event.type in ("ADDED", "MODIFIED"):
                            take(event.object)
                        elif event.type == "DELETED":
                            seen = None
                            on_error(KubeError(f"Secret {namespace}/{name} was deleted", 404, "NotFound"))
                    if time.monotonic() - started < 1.0:
                        await backoff.sleep()  # a proxy cutting watches short: do not spin
                    else:
                        backoff.reset()
            except KubeError as err:
                if err.status == 410:
                    log.info("config watch: %s; relisting", err)
                    continue  # our resourceVersion is too old: relist at once
                on_error(err)
                await backoff.sleep()
    finally:
        await client.close()
