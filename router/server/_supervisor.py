"""The supervisor of ``kubellm router --workers N``: uvicorn's, with SIGTERM passed on at once.

uvicorn's supervisor only queues a signal; its loop reads the queue every half second, and not
while it health-checks the workers (up to ``timeout_worker_healthcheck`` each). Until then the
workers do not know the pod is terminating: they answer without ``Connection: close`` and their
readiness stays 200, so the drain delay (router/server/_app.py ``_drain_on_sigterm``) starts late. Here
the signal handler itself sends SIGTERM to every worker, and the shutdown does not send a second
one (to a draining worker uvicorn takes a second SIGTERM as "force exit", cutting off streams).
"""

from __future__ import annotations

import os
import signal
import socket
from types import FrameType

from uvicorn import Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process


class Supervisor(Multiprocess):
    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        #: Workers already sent SIGTERM by the handler.
        self._signalled: set[int] = set()
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Exit the loop first, so no health check kills a worker that is draining.
        self.should_exit.set()
        for process in list(self.processes):
            pid = process.pid
            if pid is not None and process.exitcode is None and pid not in self._signalled:
                self._signalled.add(pid)
                os.kill(pid, signal.SIGTERM)
        self.signal_queue.append(signum)

    def terminate_all(self) -> None:
        for process in self.processes:
            if process.pid in self._signalled:
                _close_pipes(process)
            else:
                process.terminate()


def _close_pipes(process: Process) -> None:
    """What ``Process.terminate`` does besides the SIGTERM already sent."""
    process.parent_conn.close()
    process.child_conn.close()


def run(config: Config) -> None:
    """``uvicorn.run`` for ``workers > 1``, with this supervisor."""
    sock = config.bind_socket()
    try:
        Supervisor(config, sockets=[sock]).run()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
