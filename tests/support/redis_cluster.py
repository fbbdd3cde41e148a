"""A real 3-master Redis Cluster, and a Sentinel-watched master + replica, on loopback, for tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.servers import free_port


def cluster_port() -> int:
    """A free loopback port at most 55535: a cluster node also listens 10000 above its port."""
    import random

    while True:
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


def _ask(port: int, command: bytes) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(command)
            return sock.recv(65536)
    except OSError:
        return b""


def _wait(cond: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class _Procs:
    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, port: int, args: list[str], binary: str = "redis-server") -> None:
        exe = shutil.which(binary)
        if exe is None:
            raise RuntimeError(f"{binary} is not installed")
        d = self.dir / str(port)
        d.mkdir(exist_ok=True)
        log = open(d / "log", "ab")  # noqa: SIM115 - the child holds it
        self.procs[port] = subprocess.Popen([exe, *args], cwd=d, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)


def _server_args(port: int) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--protected-mode", "no"]


class RedisClusterServers(_Procs):
    """Three masters (no replicas), every slot assigned: ``with RedisClusterServers() as c: c.nodes``."""

    def __init__(self) -> None:
        super().__init__("kubellm-rcluster-")
        self.ports = [cluster_port() for _ in range(3)]

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def __enter__(self) -> RedisClusterServers:
        try:
            for p in self.ports:
                args = [*_server_args(p), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                self.spawn(p, [*args, "--appendonly", "yes", "--appendfsync", "always"])
            for p in self.ports:
                _wait(lambda p=p: _ask(p, b"PING\r\n").startswith(b"+PONG"), f"redis {p}")
            subprocess.run(
                ["redis-cli", "--cluster", "create", *self.nodes, "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            for p in self.ports:
                _wait(lambda p=p: b"cluster_state:ok" in _ask(p, b"CLUSTER INFO\r\n"), f"cluster ok on {p}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SentinelServers(_Procs):
    """A master, one replica and three sentinels (quorum 2, failover after 1 s down)."""

    MASTER = "kubellm"

    def __init__(self) -> None:
        super().__init__("kubellm-sentinel-")
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    def start_data(self, port: int, replica_of: int | None) -> None:
        # No diskless-sync delay (5 s by default): a replica is in sync about at once.
        args = [*_server_args(port), "--appendonly", "yes", "--appendfsync", "always"]
        args += ["--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.spawn(port, args)
        _wait(lambda: _ask(port, b"PING\r\n").startswith(b"+PONG"), f"redis {port}")
        if replica_of is not None:
            _wait(
                lambda: b"master_link_status:up" in _ask(port, b"INFO replication\r\n"),
                f"replica {port} in sync",
            )

    def __enter__(self) -> SentinelServers:
        try:
            self.start_data(self.master_port, None)
            self.start_data(self.replica_port, self.master_port)
            for p in self.sentinel_ports:
                conf = self.dir / f"sentinel-{p}.conf"
                conf.write_text(
                    f"port {p}\nbind 127.0.0.1\nprotected-mode no\n"
                    f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master_port} 2\n"
                    f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                    f"sentinel failover-timeout {self.MASTER} 10000\n"
                    f"sentinel parallel-syncs {self.MASTER} 1\n"
                )
                self.spawn(p, [str(conf)], binary="redis-sentinel")
            for p in self.sentinel_ports:
                _wait(
                    lambda p=p: b"num-other-sentinels" in _ask(p, b"SENTINEL MASTER kubellm\r\n"),
                    f"sentinel {p}",
                )
        except BaseException:
            self.close()
            raise
        return self

    def master(self) -> int | None:
        """The port the sentinels name as master now."""
        raw = _ask(self.sentinel_ports[0], b"SENTINEL GET-MASTER-ADDR-BY-NAME kubellm\r\n")
        parts = [x for x in raw.split(b"\r\n") if x and x[:1] not in b"*$"]
        return int(parts[1]) if len(parts) == 2 else None

    def __exit__(self, *exc: object) -> None:
        self.close()
