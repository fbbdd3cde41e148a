"""A TCP load balancer on loopback that behaves like a Kubernetes Service during a rollout.

Each new client connection goes, round robin, to a backend whose ``/health/readiness`` answered
200 at the last poll (every ``poll`` seconds, as the endpoints controller and kube-proxy would take
a not-ready pod out). A connection, once made, stays with its backend until either side closes it:
exactly why a draining router must tell keep-alive clients to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from typing import Self

from tests.support.proxy import pipe
from tests.support.servers import free_port, http_get


class Balancer:
    def __init__(self, backends: list[int], poll: float = 0.05) -> None:
        self.backends = list(backends)
        self.poll = poll
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: Backend ports that answered ready at the last poll.
        self.ready: list[int] = []
        #: Connections handed to each backend port.
        self.connections: dict[int, int] = dict.fromkeys(self.backends, 0)
        #: Client connections refused because no backend was ready (must stay 0 in a rollout).
        self.refused = 0
        self._turn = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            ready = []
            for port in self.backends:
                with contextlib.suppress(OSError):
                    if http_get(f"http://127.0.0.1:{port}/health/readiness", timeout=1)[0] == 200:
                        ready.append(port)
            self.ready = ready
            self._stop.wait(self.poll)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ready = self.ready
        if not ready:
            self.refused += 1
            writer.close()
            return
        port = ready[next(self._turn) % len(ready)]
        self.connections[port] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            self.refused += 1
            writer.close()
            return
        self._open.update((writer, up_writer))
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._open.difference_update((writer, up_writer))

    def start(self) -> Self:
        self._poller.start()
        self._thread.start()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(5)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._poller.join(5)

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
