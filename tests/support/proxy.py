"""A forward HTTP proxy on loopback: CONNECT tunnels and absolute-form requests, in its own thread.

Hostnames are resolved through ``hosts`` (name -> port on 127.0.0.1), so tests can name upstreams
that do not exist in DNS: only the proxy ever resolves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Self
from urllib.parse import urlsplit

from tests.support.servers import free_port


class ForwardProxy:
    def __init__(self, hosts: dict[str, int] | None = None, require: str | None = None) -> None:
        self.hosts = hosts or {}
        #: The ``Proxy-Authorization`` value required, if any (else 407).
        self.require = require
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: Request lines received (``CONNECT host:port HTTP/1.1``, ``POST http://... HTTP/1.1``).
        self.lines: list[str] = []
        self.authorizations: list[str | None] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def _resolve(self, host: str, port: int) -> int:
        return self.hosts.get(host, port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
            self.lines.append(line)
            self.authorizations.append(headers.get("proxy-authorization"))
            if self.require is not None and headers.get("proxy-authorization") != self.require:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            method, target, version = line.split(" ")
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self._resolve(host, int(port))
                )
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                url = urlsplit(target)
                assert url.hostname is not None
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self._resolve(url.hostname, url.port or 80)
                )
                self._open.add(up_writer)
                # Forward in origin form, without the proxy's own header; the rest is piped as is.
                kept = [f for f in fields if f and not f.lower().startswith("proxy-authorization:")]
                path = url.path + (f"?{url.query}" if url.query else "")
                up_writer.write(
                    ("\r\n".join([f"{method} {path} {version}", *kept]) + "\r\n\r\n").encode("latin-1")
                )
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
            self._open.discard(writer)

    def start(self) -> Self:
        self._thread.start()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(5)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._open):
                writer.close()
            await asyncio.sleep(0.05)  # let the transports finish closing

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction; at its end close the other side, as a proxied close does."""
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()
