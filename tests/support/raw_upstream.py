"""A hostile upstream on raw sockets: each connection is handed to a plain function on its own thread.

Nothing between the test and the bytes: the handler writes exactly what a misbehaving server would
(compressed bodies, endless heads, bare LFs, resets), and the server counts connections and requests.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Self


class RawConnection:
    """One accepted connection, with the few moves a hostile server needs."""

    def __init__(self, sock: socket.socket, upstream: RawUpstream) -> None:
        self.sock = sock
        self.upstream = upstream
        self._buffer = b""

    def read_request(self) -> bytes | None:
        """One whole request (head and Content-Length body), counted; None at the end of the connection."""
        while b"\r\n\r\n" not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buffer += data
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self._buffer) < length:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buffer += data
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        request = head + b"\r\n\r\n" + body
        with self.upstream.lock:
            self.upstream.requests.append(request)
        return request

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        """A clean close: FIN after everything sent."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.sock.close()

    def reset(self) -> None:
        """Abort the connection with a TCP reset (SO_LINGER 0), as a crashed server would."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


Handler = Callable[[RawConnection], None]


class RawUpstream:
    """A loopback server calling ``handler`` for each connection, each on its own thread."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.lock = threading.Lock()
        self.requests: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed: the server stops
            with self.lock:
                self.connections += 1
                self._open.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = RawConnection(sock, self)
        with contextlib.suppress(OSError):
            self.handler(conn)
        with contextlib.suppress(OSError):
            sock.close()

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        # shutdown() wakes the threads blocked in accept() or recv(); close() alone would not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self.lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
