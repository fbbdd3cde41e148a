"""Real servers for tests: the router as a process, fakes as threaded aiohttp apps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import yaml
from aiohttp import web


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def as_written(config: dict[str, Any]) -> dict[str, Any]:
    """The config with ``drainDelaySeconds: 0`` unless it sets one: ``stop()`` sends SIGTERM, and the
    default delay (5 s, for rollouts) would add that much to every test's teardown. What
    ``RouterProcess.write_config`` writes, so its config version is ``parse_config(as_written(c))``."""
    settings = config.get("settings", {})
    if not isinstance(settings, dict) or "drainDelaySeconds" in settings:
        return config
    return {**config, "settings": {**settings, "drainDelaySeconds": 0}}


class RouterProcess:
    """`kubellm router` started as a real process on a free loopback port."""

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        args: list[str] | None = None,
        workers: int = 1,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kubellm-test-"))
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = self.dir / "config.yaml"
            self.write_config(config)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / "router.log"
        self._env = {**os.environ, "KUBELLM_STATE_DIR": str(self.dir / "state"), **(env or {})}
        self._args = list(args or [])
        self._workers = workers
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def write_config(self, config: dict[str, Any]) -> None:
        assert self.config_path is not None
        # Write then rename, as Kubernetes does, so the watcher never sees half a file.
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(as_written(config)))
        tmp.replace(self.config_path)

    def start(self, wait: bool = True) -> RouterProcess:
        cmd = [
            sys.executable,
            "-m",
            "kubellm",
            "router",
            "--port",
            str(self.port),
            "--workers",
            str(self._workers),
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        cmd += self._args
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self._env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError):
                status, _ = http_get(self.base_url + "/health/readiness", timeout=1)
                if status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"router not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadedApp:
    """An aiohttp application served from its own thread and event loop."""

    def __init__(
        self, app: web.Application, port: int | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.app = app
        self.port = port or free_port()
        self.ssl_context = ssl_context
        self.base_url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def boot() -> None:
            self._runner = web.AppRunner(
                self.app, handle_signals=False, access_log=None, shutdown_timeout=0.5
            )
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context).start()
            self._ready.set()

        self.loop.run_until_complete(boot())
        self.loop.run_forever()

    def start(self) -> ThreadedApp:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        fut = asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        with contextlib.suppress(Exception):
            fut.result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def __enter__(self) -> ThreadedApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FakeServer:
    """What every fake upstream shares: an aiohttp app served by a :class:`ThreadedApp`.

    Subclasses build their app and assign ``self.server = ThreadedApp(app)``.
    """

    server: ThreadedApp
    #: Faults for the next requests, taken one per request under ``_lock`` by the subclass.
    faults: list[Any]
    _lock: threading.Lock

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def queue(self, *faults: Any) -> None:
        with self._lock:
            self.faults.extend(faults)

    def start(self) -> Self:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def router_process(config: dict[str, Any] | None = None, **kwargs: Any) -> Iterator[RouterProcess]:
    proc = RouterProcess(config, **kwargs)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def h11_router(state_dir: Path) -> Iterator[int]:
    """The router on its embedded default under uvicorn's own h11 protocol (so requests take the
    ASGI path, not the fast path); yields its port. On exit it must have logged no traceback."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "kubellm.router:app_from_env", "--factory", "--http", "h11"]
    proc = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "KUBELLM_STATE_DIR": str(state_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{port}/health/readiness", timeout=1)[0] == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert b"Traceback" not in stderr, stderr[-2000:]
